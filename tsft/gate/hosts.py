"""Gated versions of the PEFT layers: one small class per method, each saying how its update factors.

A gated layer is the peft layer itself with its class swapped for a subclass whose ``forward``
computes the frozen output once, asks the method for its low-rank factors ``(u, B, k)`` and hands
them to the layer's ``token_gate``. Keeping the peft object (rather than wrapping it) keeps its
parameter names, so ``save_pretrained``, AdaLoRA's allocator and optimizers see nothing new.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from peft.tuners.adalora.layer import SVDLinear
from peft.tuners.lora import layer as lora_layer
from peft.utils.integrations import dequantize_module_weight
from torch.distributed.tensor import DTensor, Partial, Replicate

from tsft.gate.adapter import ParallelAdapterLayer

# u, B, the branch's constant scaling of B (applied inside the gate's autograd function), DoRA k
Factors = tuple[torch.Tensor, torch.Tensor, Union[float, torch.Tensor], Optional[torch.Tensor]]


_PLAIN = (torch.nn.Parameter, torch.Tensor)


def whole(weight: torch.Tensor) -> torch.Tensor:
    """A weight read outside its own module's forward, as the gated layers read B (and DoRA's A and W0).

    Sharded data parallelism gathers a module's weights around that module's forward. When the gated
    layer is inside a sharded unit (FSDP2 on each transformer block, the usual wrapping), the weights are
    already whole here; when a LoRA factor is a unit of its own, it is still a sharded DTensor and is
    gathered here, differentiably (its gradient is averaged over ranks and reduce-scattered back).
    DeepSpeed ZeRO-3 instead gathers what a layer registers as external parameters (``external_weights``;
    tsft.lit.sharding).
    """
    if type(weight) in _PLAIN or not isinstance(weight, DTensor):  # the common case first: it is on the hot path
        return weight
    # Not full_tensor(): its backward would keep each rank's own gradient chunk (Replicate -> Shard is a
    # slice), and no FSDP hook averages it, since the unit's forward never ran; declaring the gradient a
    # partial average makes autograd reduce-scatter it as FSDP would (tests/gate/test_sharding.py).
    mesh_dims = weight.device_mesh.ndim
    gathered = weight.redistribute(placements=[Replicate()] * mesh_dims)
    return gathered.to_local(grad_placements=[Partial("avg")] * mesh_dims)


class GatedLayerMixin:
    """Routes a PEFT layer's forward through its token gate; refuses to merge."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("mixed-adapter batches (adapter_names=...) are not supported by token gates")
        kwargs.pop("alora_offsets", None)
        base = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return base
        factors = self.update_factors(x)
        if factors is None:
            return base
        u, B, scale, k = factors
        bias = getattr(self.get_base_layer(), "bias", None) if k is not None else None  # DoRA's k (W0 x)
        bias = None if bias is None else whole(bias)
        return self.token_gate(base, u, B, scale, k, bias)

    def update_factors(self, x: torch.Tensor) -> Optional[Factors]:
        raise NotImplementedError

    def external_weights(self) -> list[torch.nn.Parameter]:
        """The parameters of submodules that ``update_factors`` reads without calling their module."""
        raise NotImplementedError

    def merge(self, *args, **kwargs) -> None:
        raise RuntimeError(
            f"{type(self).__name__} is token-gated: merging would apply its update to every token. "
            "Keep the adapter unmerged (tsft.integrations.export saves it with its gates)."
        )

    def _single_adapter(self) -> Optional[str]:
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) > 1:
            raise ValueError(f"token gates support one active adapter per layer, found {active}")
        return active[0] if active else None


class GatedLoraLinear(GatedLayerMixin, lora_layer.Linear):
    """LoRA ``delta = B A dropout(x) * scaling``; DoRA adds ``k * W0 x`` with ``k = m / ||W0 + s B A||_c - 1``.

    DoRA note: during training with dropout, peft recomputes ``W0 dropout(x)`` for the magnitude
    term, a second base matmul. Here the magnitude rescales the frozen output ``W0 x`` computed
    once, which is DoRA's formula with dropout confined to the low-rank branch; with dropout off
    (or in eval) the update equals peft's exactly (tests/gate/test_peft_equivalence.py); with dropout 0.05
    the two updates differ by 0.2-1.1 % (docs/gate.md, "DoRA with dropout").
    """

    def update_factors(self, x: torch.Tensor) -> Optional[Factors]:
        adapter = self._single_adapter()
        if adapter is None:
            return None
        lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
        scaling = self.scaling[adapter]
        u = lora_A(self.lora_dropout[adapter](self._cast_input_dtype(x, lora_A.weight.dtype)))
        B = whole(lora_B.weight)
        if adapter not in self.lora_variant:
            return u, B, scaling, None
        dora = self.lora_magnitude_vector[adapter]
        with torch.no_grad():  # the column norm is a constant in DoRA's gradient (DoRA §4.3, as in peft)
            weight = whole(dequantize_module_weight(self.get_base_layer())).to(u.dtype)
            norm = dora.get_weight_norm(weight, B @ whole(lora_A.weight), scaling, adapter_name=adapter)
        magnitude_scale = whole(dora.weight) / norm  # trainable, so it goes into B through autograd
        return u, B * (scaling * magnitude_scale.unsqueeze(1)), 1.0, magnitude_scale - 1

    def external_weights(self) -> list[torch.nn.Parameter]:
        adapter = self._single_adapter()
        if adapter is None:
            return []
        weights = [self.lora_B[adapter].weight]
        if adapter in self.lora_variant:
            base = self.get_base_layer()
            weights += [self.lora_A[adapter].weight, base.weight] + ([base.bias] if base.bias is not None else [])
            weights += list(self.lora_magnitude_vector[adapter].parameters())
        return weights


class GatedSVDLinear(GatedLayerMixin, SVDLinear):
    """AdaLoRA ``delta = B (A * E) dropout(x) * scaling / ranknum``."""

    def update_factors(self, x: torch.Tensor) -> Optional[Factors]:
        adapter = self._single_adapter()
        if adapter is None:
            return None
        lora_A, lora_E = self.lora_A[adapter], self.lora_E[adapter]
        x = self._cast_input_dtype(self.lora_dropout[adapter](x), lora_A.dtype)
        u = x @ (lora_A * lora_E).t()
        return u, self.lora_B[adapter], self.scaling[adapter] / (self.ranknum[adapter] + 1e-5), None

    def external_weights(self) -> list[torch.nn.Parameter]:
        return []  # lora_A, lora_E and lora_B are this module's own parameters: gathered around its forward


class GatedParallelAdapter(GatedLayerMixin, ParallelAdapterLayer):
    """Parallel Adapter ``delta = up(act(down(dropout(x)))) * scale``."""

    def update_factors(self, x: torch.Tensor) -> Optional[Factors]:
        return self.bottleneck(x), whole(self.adapter_up.weight), self.scale, None

    def external_weights(self) -> list[torch.nn.Parameter]:
        return [self.adapter_up.weight]


# Checked in order: AdaLoRA's SVDLinear is also a LoraLayer, so it must come before lora.Linear.
GATED_CLASSES: list[tuple[type, type]] = [
    (SVDLinear, GatedSVDLinear),
    (lora_layer.Linear, GatedLoraLinear),
    (ParallelAdapterLayer, GatedParallelAdapter),
]
