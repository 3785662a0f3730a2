"""Lightning callback: step the thresholds once per optimizer step, log and report sparsity."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import lightning.pytorch as pl

from tsft.gate.attach import find_token_gates
from tsft.gate.config import GateConfig
from tsft.gate.report import sparsity_summary
from tsft.gate.threshold import ThresholdOptimizer


class TokenGateCallback(pl.Callback):
    """Drives the gates that ``add_token_gates`` put on the LightningModule's model.

    ``on_before_optimizer_step`` runs after the last micro-batch's backward of an accumulation
    window and before the PEFT optimizer steps, so tau moves exactly once per optimizer step with
    g summed over the window (and over DDP ranks, inside ``ThresholdOptimizer.step``).
    Train statistics cover the current training epoch; eval statistics the latest validation or
    test loop. After each loop ``pl_module.sparsity_report`` holds ``sparsity_summary(gates)``.
    """

    def __init__(self, config: Union[GateConfig, Mapping[str, Any], None] = None, log_modules: bool = True) -> None:
        super().__init__()
        self.config = GateConfig.from_mapping(config) if isinstance(config, Mapping) else config
        self.log_modules = log_modules
        self.thresholds: Optional[ThresholdOptimizer] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        gates = find_token_gates(pl_module)
        if not gates:
            raise RuntimeError("TokenGateCallback found no token gates: call tsft.gate.add_token_gates on the model")
        self.thresholds = ThresholdOptimizer(gates, self.config)

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        for gate in self.thresholds.gates:
            gate.reset_stats("train")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.thresholds.step(*loss_scale_of_step(getattr(trainer.precision_plugin, "scaler", None), optimizer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Reading counts synchronises with the device: do it only when Lightning logs anyway.
        if (trainer.global_step % max(trainer.log_every_n_steps, 1)) == 0:
            summary = sparsity_summary(self.thresholds.gates, splits=("train",))
            if summary["train_overall"] is not None:
                pl_module.log("sparsity/train", summary["train_overall"], prog_bar=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._log_and_store(pl_module, "train")

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset_eval()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._log_and_store(pl_module, "eval")

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._reset_eval()

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log_and_store(pl_module, "eval")

    def _reset_eval(self) -> None:
        for gate in self.thresholds.gates:
            gate.reset_stats("eval")

    def _log_and_store(self, pl_module: pl.LightningModule, split: str) -> None:
        summary = sparsity_summary(self.thresholds.gates)
        pl_module.sparsity_report = summary
        overall = summary["overall" if split == "eval" else "train_overall"]
        if overall is None:
            return
        prefix = "val" if split == "eval" else "train"
        pl_module.log(f"sparsity/{prefix}", overall)
        if self.log_modules:
            key = "sparsity" if split == "eval" else "train_sparsity"
            for module in summary["modules"]:
                if module[key] is not None:
                    pl_module.log(f"sparsity_{prefix}/{module['name']}", module[key])
                pl_module.log(f"tau/{module['name']}", module["tau"])


def loss_scale_of_step(scaler, optimizer) -> tuple[float, bool]:
    """(loss scale, whether the scaler found inf/NaN gradients) for the step ``optimizer`` is about to take.

    Lightning's "16-mixed" unscales the PEFT gradients before ``on_before_optimizer_step`` (and updates
    the scale only after the step), so here ``get_scale()`` is the scale the backward used and the
    scaler has already looked for inf/NaN. Its verdict is only kept in ``_found_inf_per_device``
    (private, but what ``GradScaler.step`` itself reads); a later torch without it falls back to the
    threshold optimizer's own check of g.
    """
    if scaler is None or not scaler.is_enabled():
        return 1.0, False
    found = getattr(scaler, "_found_inf_per_device", None)
    found_inf = False
    if found is not None:
        try:
            found_inf = any(bool(flag.item()) for flag in found(optimizer).values())
        except (KeyError, RuntimeError):  # not unscaled for this optimizer (e.g. a closure that skipped backward)
            found_inf = False
    return scaler.get_scale(), found_inf
