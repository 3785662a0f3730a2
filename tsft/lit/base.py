"""What every tsft LightningModule shares, whatever the task.

- AdamW over the trainable parameters only (PEFT weights and task heads; the backbone is frozen),
  with linear warm-up then linear decay over the Trainer's estimated optimizer steps.
- AdaLoRA: the rank allocator runs after every optimizer step (it scores weights by |w * grad|,
  so it must see this step's gradients) and its state is saved with the checkpoint.
- Checkpoints hold only what training changes (trainable weights, buffers such as the gates'
  thresholds) plus the RNG states, so they are small and a resumed run continues exactly.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from peft.tuners.adalora import AdaLoraModel
from torch import nn
from transformers import get_linear_schedule_with_warmup

from tsft.checkpoint import SETTINGS_KEY
from tsft.errors import InputError
from tsft.models.peft_methods import adalora_schedule, find_adalora


class PeftModule(L.LightningModule):
    def __init__(self, model: nn.Module, optim_cfg: DictConfig, peft_cfg: DictConfig) -> None:
        super().__init__()
        # from_pretrained returns eval mode and Lightning keeps each module's mode: train like the
        # HF Trainer does, with the frozen backbone's dropout active.
        self.model = model.train()
        self.optim_cfg = optim_cfg
        self.peft_cfg = peft_cfg
        # Checkpoints leave out the frozen backbone (rebuilt from its source); on_load_checkpoint
        # checks that every trainable tensor is there instead.
        self.strict_loading = False
        self.run_settings: dict[str, Any] | None = None  # set by the pipeline (tsft.checkpoint.run_settings)

    @property
    def adalora(self) -> AdaLoraModel | None:
        # Looked up, not stored: an nn.Module attribute would register the submodule a second time.
        return find_adalora(self.model)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            self._param_groups(), lr=self.optim_cfg.lr, weight_decay=self.optim_cfg.weight_decay
        )
        total_steps = int(self.trainer.estimated_stepping_batches)
        if self.adalora is not None:
            # The model was built with a planned step count; the Trainer's estimate is authoritative.
            schedule = adalora_schedule(total_steps, self.peft_cfg.tinit_ratio, self.peft_cfg.tfinal_ratio)
            for key, value in schedule.items():
                setattr(self._adalora_config(), key, value)
        warmup_steps = int(self.optim_cfg.warmup_ratio * total_steps)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _param_groups(self) -> list[dict[str, Any]]:
        """The trainable weights; with ``optim.head_lr`` the heads trained in full (peft's modules_to_save, e.g.
        LLaVA's projector at 2e-5 beside LoRA's 2e-4) are a group of their own at that learning rate."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        head_lr = self.optim_cfg.get("head_lr")
        if head_lr is None:
            return [{"params": [p for _, p in named]}]
        heads = [p for n, p in named if "modules_to_save" in n]
        rest = [p for n, p in named if "modules_to_save" not in n]
        return [group for group in ({"params": rest}, {"params": heads, "lr": head_lr}) if group["params"]]

    def configure_model(self) -> None:
        # A sharding strategy shards the model here, once processes exist and before the optimizer is built
        # (trainer=fsdp: tsft.lit.sharding.FSDP2Strategy); every other strategy leaves it whole.
        parallelize = getattr(self.trainer.strategy, "parallelize", None)
        if parallelize is not None:
            parallelize(self.model)

    def on_fit_start(self) -> None:
        from tsft.lit.sharding import is_zero3, register_external_weights

        if is_zero3(self.trainer.strategy):  # the weights gated layers read directly, gathered by DeepSpeed
            register_external_weights(self.model)

    def on_train_start(self) -> None:
        # Lightning hands a resumable loader its saved state only if the loader is built after the checkpoint is
        # restored; configure_optimizers' estimated_stepping_batches builds it before, so the state is handed over
        # here, before the first batch is drawn (tsft.data.loading).
        self.trainer.fit_loop._load_combined_loader_states()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.adalora is not None:
            # Gradients are still in place: Lightning zeroes them before the next backward. The
            # step passed is the count of steps taken (1 after the first), so the final
            # allocation at step total_step - tfinal happens even when tfinal is 0.
            self.adalora.update_and_allocate(self.trainer.global_step + 1)

    def _adalora_config(self) -> Any:
        adalora = self.adalora
        return adalora.peft_config[adalora.trainable_adapter_name]

    def _trained_keys(self) -> set[str]:
        params = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        return params | {n for n, _ in self.named_buffers()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self._trained_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["rng_states"] = _collect_rng_states()
        if self.run_settings is not None:
            checkpoint[SETTINGS_KEY] = self.run_settings
        if self.adalora is not None:
            allocator = self.adalora.rankallocator
            checkpoint["adalora"] = {
                "ipt": allocator.ipt,
                "exp_avg_ipt": allocator.exp_avg_ipt,
                "exp_avg_unc": allocator.exp_avg_unc,
                "rank_pattern": self._adalora_config().rank_pattern,
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        missing = sorted(trainable - checkpoint["state_dict"].keys())
        if missing:
            raise InputError(
                f"checkpoint lacks {len(missing)} trained tensors (e.g. {missing[0]}); "
                "resume with the model, peft and sparsity settings it was saved with"
            )
        _set_rng_states(checkpoint["rng_states"])
        if self.adalora is not None:
            state = checkpoint["adalora"]
            allocator = self.adalora.rankallocator
            allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = (
                state["ipt"],
                state["exp_avg_ipt"],
                state["exp_avg_unc"],
            )
            self._adalora_config().rank_pattern = state["rank_pattern"]


def _collect_rng_states() -> dict[str, Any]:
    # Plain Python values and tensors only: Lightning loads checkpoints with torch.load(weights_only=True).
    _, key, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (key.tolist(), pos, has_gauss, gauss),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state(("MT19937", np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
