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

from tsft.gate.adapter import ParallelAdapterLayer

# u, B, the branch's constant scaling of B (applied inside the gate's autograd function), DoRA k
Factors = tuple[torch.Tensor, torch.Tensor, Union[float, torch.Tensor], Optional[torch.Tensor]]


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
        bias = getattr(self.get_base_layer(), "bias", None) if k is not None else None
        return self.token_gate(base, u, B, scale, k, bias)

    def update_factors(self, x: torch.Tensor) -> Optional[Factors]:
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
        if adapter not in self.lora_variant:
            return u, lora_B.weight, scaling, None
        dora = self.lora_magnitude_vector[adapter]
        with torch.no_grad():  # the column norm is a constant in DoRA's gradient (DoRA §4.3, as in peft)
            weight = dequantize_module_weight(self.get_base_layer()).to(u.dtype)
            norm = dora.get_weight_norm(weight, lora_B.weight @ lora_A.weight, scaling, adapter_name=adapter)
        magnitude_scale = dora.weight / norm  # trainable, so it goes into B through autograd
        return u, lora_B.weight * (scaling * magnitude_scale.unsqueeze(1)), 1.0, magnitude_scale - 1


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


class GatedParallelAdapter(GatedLayerMixin, ParallelAdapterLayer):
    """Parallel Adapter ``delta = up(act(down(dropout(x)))) * scale``."""

    def update_factors(self, x: torch.Tensor) -> Optional[Factors]:
        return self.bottleneck(x), self.adapter_up.weight, self.scale, None

    def get_base_layer(self) -> torch.nn.Module:
        return self.base_layer


# Checked in order: AdaLoRA's SVDLinear is also a LoraLayer, so it must come before lora.Linear.
GATED_CLASSES: list[tuple[type, type]] = [
    (SVDLinear, GatedSVDLinear),
    (lora_layer.Linear, GatedLoraLinear),
    (ParallelAdapterLayer, GatedParallelAdapter),
]
