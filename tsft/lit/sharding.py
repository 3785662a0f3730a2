"""Sharded data parallelism with token gates: FSDP2 (``trainer=fsdp``), DeepSpeed ZeRO-3 (``trainer=deepspeed_zero3``).

What the gates need from a sharding strategy:
- their state (tau, its Adam moments, the step) stays float32 and the same on every rank. It is made of
  module buffers, which FSDP2 neither shards nor casts (its mixed-precision policy covers parameters), and
  every rank takes the same threshold step from the all-reduced g (tsft.gate.threshold);
- the weights a gated layer reads without calling their module (B; for DoRA also A, W0 and the magnitude)
  are whole when read. FSDP2 gathers a unit's weights around the unit's forward, so every transformer block
  is one unit (``FSDP2Strategy.parallelize``) and the LoRA layers inside it are whole during its forward; a
  factor sharded on its own is gathered by tsft.gate.hosts.whole. ZeRO-3 gathers a module's parameters in
  that module's hooks, so the gated layers register those weights as external parameters
  (``register_external_weights``).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from tsft.gate.hosts import GatedLayerMixin


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all ranks (no tensor parallelism), one shard unit per transformer block, and checkpoints
    in one file holding what training changes (gathered from the shards), as every other tsft run's.

    ``reshard_after_forward``: free each block's gathered weights after its forward (less memory, one more
    all-gather in backward); false keeps them, ZeRO-2-like.
    """

    def __init__(self, reshard_after_forward: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_distributed_checkpoint", False)
        super().__init__(**kwargs)
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # data parallel over every rank: Lightning's "auto" would split nodes x GPUs into data x tensor parallel
        if self._data_parallel_size == "auto" and self._tensor_parallel_size == "auto":
            self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    def parallelize(self, model: nn.Module) -> None:
        """Shard ``model`` in place: each transformer block, then the rest as the root unit. Idempotent
        (Lightning calls configure_model again for the evaluation after fit)."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(model, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=self.reshard_after_forward)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The trained tensors only, gathered whole (on every rank: gathering is collective); the frozen
        backbone, which the checkpoint leaves out anyway (PeftModule.on_save_checkpoint), is never gathered."""
        from torch.distributed.tensor import DTensor

        module = self.lightning_module
        keep = module._trained_keys()
        state = {}
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if name in keep:
                whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
                state[name] = whole.detach().cpu()
        return state

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loader puts the weights into the shards and drops them from the dict it returns; they are
        kept in it, so PeftModule.on_load_checkpoint can check that every trained tensor was there."""
        trained = torch.load(self.broadcast(checkpoint_path), map_location="cpu", weights_only=True)["state_dict"]
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        checkpoint.setdefault("state_dict", trained)
        return checkpoint


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model: instances of the classes it names in ``_no_split_modules``
    (LlamaDecoderLayer, CLIPEncoderLayer, ...), which are exactly the units it allows to be placed whole."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} names no transformer block classes (_no_split_modules); "
            "FSDP2 shards per block, so use trainer=ddp for this model"
        )
    return blocks


def register_external_weights(model: nn.Module) -> int:
    """ZeRO-3: declare the weights each gated layer reads outside their own module's forward, so DeepSpeed
    gathers them around the gated layer's forward. Returns how many were registered."""
    import deepspeed

    count = 0
    for module in model.modules():
        if isinstance(module, GatedLayerMixin):
            for weight in module.external_weights():
                deepspeed.zero.register_external_parameter(module, weight)
                count += 1
    return count


def is_zero3(strategy: Any) -> bool:
    config = getattr(strategy, "config", None)
    return isinstance(config, dict) and config.get("zero_optimization", {}).get("stage") == 3
