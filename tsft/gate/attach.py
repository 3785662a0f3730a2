"""Put token gates on every PEFT layer of a model, find them again, take them off."""

from __future__ import annotations

from typing import Any, Collection, Mapping, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from tsft.gate.config import GateConfig
from tsft.gate.gate import GateContext, TokenGate
from tsft.gate.hosts import GATED_CLASSES, GatedLayerMixin

_CONTEXT_ATTR = "_tsft_gate_context"


def add_token_gates(
    model: nn.Module, config: Union[GateConfig, Mapping[str, Any]], only: Optional[Collection[str]] = None
) -> list[TokenGate]:
    """Gate every LoRA / DoRA / AdaLoRA layer of a peft model and every tsft Parallel Adapter (``only``: just the
    layers of these names, e.g. what a merge-aware export left gated; the others stay dense).

    Returns the gates in module order. Call it after the PEFT layers exist and before the
    optimizer is built or a checkpoint is loaded (the thresholds are module buffers). Calling the
    model with ``attention_mask=...`` is then enough for padding to be left out of the statistics.
    """
    config = config if isinstance(config, GateConfig) else GateConfig.from_mapping(config)
    if find_token_gates(model):
        raise RuntimeError("the model already has token gates; call add_token_gates once per model")
    context = GateContext()
    gates = []
    for name, module in model.named_modules():
        gated_class = _gated_class_for(module)
        if gated_class is None or (only is not None and name not in only):
            continue
        _check_gateable(name, module)
        module.__class__ = gated_class
        # the host's own trainable weights (its PEFT branch; the frozen base layer is not counted), counted
        # before the gate is added: Table 4 weighs module selections by parameters
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        module.token_gate = TokenGate(name, config, context).to(_device_of(module))
        module.token_gate.trainable_params = trainable
        gates.append(module.token_gate)
    if not gates:
        raise ValueError(
            "no PEFT layer found to gate: build the model with peft (LoRA, DoRA, AdaLoRA) or "
            "tsft.gate.adapter.add_parallel_adapters before add_token_gates"
        )
    for entry in _entry_points(model):
        setattr(entry, _CONTEXT_ATTR, context)
        if _store_token_mask not in entry._forward_pre_hooks.values():
            entry.register_forward_pre_hook(_store_token_mask, with_kwargs=True)
    return gates


def find_token_gates(model: nn.Module) -> list[TokenGate]:
    """The gates of a model, in module order (e.g. to hand to a ThresholdOptimizer)."""
    return [m for m in model.modules() if isinstance(m, TokenGate)]


def remove_token_gates(model: nn.Module) -> None:
    """Restore the plain PEFT layers (dense updates); thresholds are discarded."""
    for module in model.modules():
        ungate(module)
    for entry in _entry_points(model):
        if hasattr(entry, _CONTEXT_ATTR):
            delattr(entry, _CONTEXT_ATTR)  # the mask hook stays registered but finds nothing to feed


def ungate(module: nn.Module) -> None:
    """One gated layer back to its plain PEFT (or tsft) class, its threshold discarded; anything else is left alone."""
    if isinstance(module, GatedLayerMixin):
        del module.token_gate
        module.__class__ = next(base for base in type(module).__mro__[1:] if base is not GatedLayerMixin)


def _entry_points(model: nn.Module) -> list[nn.Module]:
    """The modules whose forward receives the batch's ``attention_mask``: the model itself and, for a
    peft model, the wrapped transformers model, which peft's ``generate()`` calls directly."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return [model] if inner is model else [model, inner]


def _gated_class_for(module: nn.Module):
    if isinstance(module, GatedLayerMixin):
        return None
    for plain, gated in GATED_CLASSES:
        if type(module) is plain:
            return gated
    if isinstance(module, BaseTunerLayer):
        raise TypeError(
            f"token gates support LoRA/DoRA/AdaLoRA on nn.Linear layers; {type(module).__name__} is not one "
            "(drop it from peft.target_modules or train it without sparsity=ts)"
        )
    return None


def _check_gateable(name: str, module: nn.Module) -> None:
    if getattr(module, "merged", False):
        raise ValueError(f"{name} is merged into its base weights; unmerge it before adding token gates")
    lora_B = getattr(module, "lora_B", None)
    if isinstance(lora_B, nn.ModuleDict) and any(getattr(b, "bias", None) is not None for b in lora_B.values()):
        raise ValueError(f"{name} uses lora_bias=True, which token gates do not support; set lora_bias=False")


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _store_token_mask(model: nn.Module, args, kwargs) -> None:
    """Forward pre-hook: hand the batch's padding mask to the gates of ``model``.

    A module-level function reading the context off the model (not a closure) so that a
    ``copy.deepcopy`` of a gated model feeds its own gates, not the original's.
    """
    context = getattr(model, _CONTEXT_ATTR, None)
    if context is None:
        return
    mask = kwargs.get("attention_mask")
    # Only a (batch, seq) padding mask says which tokens are real; 4-D attention biases do not.
    context.token_mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
