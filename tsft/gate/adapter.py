"""Parallel Adapter (He et al. 2022; the LLM-Adapters variant used by the paper): peft has none.

A bottleneck ``up(act(down(dropout(x)))) * scale`` runs beside a frozen linear layer and is added to
its output. ``up`` starts at zero, so a fresh adapter leaves the model unchanged (as LoRA's ``B = 0``).
Both projections are bias-free so the update factors as ``u @ B^T`` like LoRA's, which is the form
the token gate works on (tsft.gate.function).
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class ParallelAdapterLayer(nn.Module):
    """``base_layer(x) + scale * up(act(down(dropout(x))))`` around a frozen ``nn.Linear``."""

    def __init__(
        self, base_layer: nn.Linear, hidden_size: int, scale: float, activation: str = "relu", dropout: float = 0.0
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"a Parallel Adapter wraps nn.Linear layers, not {type(base_layer).__name__}")
        if hidden_size <= 0:
            raise ValueError(f"peft.hidden_size must be > 0 (got {hidden_size})")
        if activation not in ACTIVATIONS:
            raise ValueError(f"peft.activation must be one of {sorted(ACTIVATIONS)} (got {activation!r})")
        self.base_layer = base_layer
        self.scale = scale
        self.activation_name, self.dropout_rate = activation, dropout  # kept for export
        weight = base_layer.weight
        self.adapter_down = nn.Linear(base_layer.in_features, hidden_size, bias=False, device=weight.device)
        self.adapter_up = nn.Linear(hidden_size, base_layer.out_features, bias=False, device=weight.device)
        nn.init.zeros_(self.adapter_up.weight)
        self.adapter_act = ACTIVATIONS[activation]()
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disable_adapters = False

    def get_base_layer(self) -> nn.Linear:
        """The frozen layer, as peft's tuner layers name it (gated layers and exports read it the same way)."""
        return self.base_layer

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The rank-``hidden_size`` activation ``u`` of the update ``u @ (scale * up)^T``."""
        x = x.to(self.adapter_down.weight.dtype)
        return self.adapter_act(self.adapter_down(self.adapter_dropout(x)))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return base
        return base + (self.adapter_up(self.bottleneck(x)) * self.scale).to(base.dtype)


def add_parallel_adapters(
    model: nn.Module,
    target_modules: list[str],
    hidden_size: int,
    scale: float,
    activation: str = "relu",
    dropout: float = 0.0,
) -> list[ParallelAdapterLayer]:
    """Wrap every ``nn.Linear`` whose name ends with one of ``target_modules`` in a Parallel Adapter.

    The caller freezes the base model first (as ``peft.get_peft_model`` does); the adapter weights
    are created trainable. A target that matches nothing raises, naming what the model does have.
    """
    targets = list(target_modules)
    found: list[tuple[nn.Module, str, nn.Linear, str]] = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and _matches(full, targets):
                found.append((module, child_name, child, full))
    missing = [t for t in targets if not any(_matches(full, [t]) for *_, full in found)]
    if missing:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target module(s) {missing} not found in the model; its linear layers are {linear_names}")
    layers = []
    for parent, child_name, child, _ in found:
        layer = ParallelAdapterLayer(child, hidden_size, scale, activation, dropout)
        setattr(parent, child_name, layer)
        layers.append(layer)
    return layers


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith(f".{t}") for t in targets)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights and whatever else trains (the task heads), for export beside the base model."""
    return {n: p.detach().cpu() for n, p in model.named_parameters() if ".adapter_" in f".{n}" or p.requires_grad}


def find_adapter_layers(model: nn.Module) -> list[ParallelAdapterLayer]:
    return [m for m in model.modules() if isinstance(m, ParallelAdapterLayer)]
