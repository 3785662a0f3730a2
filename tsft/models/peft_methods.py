"""Wrap a backbone with the configured PEFT method: LoRA, DoRA, AdaLoRA (peft) or Parallel Adapter."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from omegaconf import DictConfig
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from peft.tuners.adalora import AdaLoraModel
from torch import nn

from tsft.errors import InputError


def resolve_target_modules(targets: Iterable[str], mapping: Mapping[str, str]) -> list[str]:
    """Logical names (q, k, v, o, i, up, down, gate) -> this model's module-name suffixes.

    Names the model config does not map are taken as module-name suffixes as they are.
    """
    return [mapping.get(t, t) for t in targets]


def scoped_targets(model: nn.Module, suffixes: list[str], scope: str | None) -> list[str]:
    """With ``model.target_scope`` (e.g. ``language_model`` for LLaVA), the full names of the modules that end
    with a target suffix AND lie under that scope: a bare suffix list would also adapt the vision tower's
    attention (CLIP's ``self_attn.q_proj``). Without a scope the suffixes are returned as they are."""
    if not scope:
        return suffixes
    names = [n for n, _ in model.named_modules() if f".{scope}." in f".{n}."]
    scoped = [n for n in names if any(n == t or n.endswith(f".{t}") for t in suffixes)]
    if not scoped:
        raise InputError(f"no target module ({', '.join(suffixes)}) lies under model.target_scope '{scope}'")
    return scoped


def check_targets_exist(model: nn.Module, module_names: list[str], model_cfg: DictConfig) -> None:
    """Fail before training if a target matches no module (peft would say so mid-construction)."""
    logical = ", ".join(f"{k}={v}" for k, v in model_cfg.targets.items())
    for target in module_names:
        if not _matching(model, target):
            raise InputError(
                f"target module '{target}' matches no module of model '{model_cfg.name}'; "
                f"use logical names from model.targets ({logical}) in peft.target_modules"
            )


def _matching(model: nn.Module, target: str) -> list[nn.Module]:
    return [m for n, m in model.named_modules() if n == target or n.endswith(f".{target}")]


def check_targets_are_linear(model: nn.Module, module_names: list[str], model_cfg: DictConfig) -> None:
    """Every method here (and the token gate) adapts a linear map y = Wx; GPT-2 style models spell it Conv1D."""
    from transformers.pytorch_utils import Conv1D

    logical = ", ".join(f"{k}={v}" for k, v in model_cfg.targets.items())
    for target in module_names:
        other = next((m for m in _matching(model, target) if not isinstance(m, (nn.Linear, Conv1D))), None)
        if other is not None:
            raise InputError(
                f"target module '{target}' of model '{model_cfg.name}' is of type {type(other).__name__}, and the PEFT "
                f"methods adapt Linear layers only; target linear layers ({logical})"
            )


def apply_peft(
    model: nn.Module, peft_cfg: DictConfig, model_cfg: DictConfig, task_type: str, total_steps: int
) -> nn.Module:
    """The model with PEFT weights added and everything else frozen but ``model.head_modules``.

    ``total_steps`` is the number of optimizer steps planned (AdaLoRA's budget schedule needs it).
    """
    if peft_cfg.name == "heads":
        return _heads_only(model, list(model_cfg.head_modules), model_cfg.name)
    targets = resolve_target_modules(peft_cfg.target_modules, model_cfg.targets)
    check_targets_exist(model, targets, model_cfg)
    check_targets_are_linear(model, targets, model_cfg)
    targets = scoped_targets(model, targets, model_cfg.get("target_scope"))
    head = list(model_cfg.head_modules)
    if peft_cfg.name in ("lora", "dora"):
        config = LoraConfig(
            task_type=task_type,
            r=peft_cfg.r,
            lora_alpha=lora_alpha(peft_cfg, peft_cfg.r),
            lora_dropout=peft_cfg.dropout,
            target_modules=targets,
            use_dora=peft_cfg.use_dora,
            modules_to_save=head or None,
        )
        return get_peft_model(model, config)
    if peft_cfg.name == "adalora":
        config = AdaLoraConfig(
            task_type=task_type,
            init_r=peft_cfg.init_r,
            target_r=peft_cfg.target_r,
            # AdaLoRA scales by lora_alpha / init_r throughout (its rank count is not updated on pruning).
            lora_alpha=lora_alpha(peft_cfg, peft_cfg.init_r),
            lora_dropout=peft_cfg.dropout,
            target_modules=targets,
            modules_to_save=head or None,
            deltaT=peft_cfg.deltaT,
            orth_reg_weight=peft_cfg.orth_reg_weight,
            **adalora_schedule(total_steps, peft_cfg.tinit_ratio, peft_cfg.tfinal_ratio),
        )
        return get_peft_model(model, config)
    return _add_parallel_adapters(model, peft_cfg, targets, head)


def _heads_only(model: nn.Module, head: list[str], model_name: str) -> nn.Module:
    """Everything frozen but the head modules (peft=heads): LLaVA's stage 1 trains only its projector."""
    if not head:
        raise InputError(f"peft=heads trains model.head_modules, and model '{model_name}' lists none")
    model.requires_grad_(False)
    found = [m for n, m in model.named_modules() if any(n == h or n.endswith(f".{h}") for h in head)]
    if not found:
        raise InputError(f"no module of model '{model_name}' is named {', '.join(head)} (model.head_modules)")
    for module in found:
        module.requires_grad_(True)
    return model


def lora_alpha(peft_cfg: DictConfig, rank: int) -> float:
    """lora_alpha from Table 6's "Scale": ``rank / scale`` under the default reading r / alpha (the recipes'
    alpha = 2r for Scale 0.5), ``scale * rank`` under ``alpha_over_r`` (configs/peft/lora.yaml says why)."""
    if peft_cfg.scale_reading == "r_over_alpha":
        return rank / peft_cfg.scale
    return peft_cfg.scale * rank


def _add_parallel_adapters(model: nn.Module, peft_cfg: DictConfig, targets: list[str], head: list[str]) -> nn.Module:
    from tsft.gate.adapter import add_parallel_adapters

    model.requires_grad_(False)
    for name, module in model.named_modules():
        if any(name == h or name.endswith(f".{h}") for h in head):
            module.requires_grad_(True)
    add_parallel_adapters(
        model,
        targets,
        hidden_size=peft_cfg.hidden_size,
        scale=peft_cfg.scale,
        activation=peft_cfg.activation,
        dropout=peft_cfg.dropout,
    )
    return model


def adalora_schedule(total_steps: int, tinit_ratio: float, tfinal_ratio: float) -> dict[str, int]:
    """peft's AdaLoRA phases in steps: full rank for tinit, pruning, fixed ranks for the last tfinal."""
    total_steps = max(int(total_steps), 1)
    return {
        "total_step": total_steps,
        "tinit": math.floor(tinit_ratio * total_steps),
        "tfinal": math.floor(tfinal_ratio * total_steps),
    }


def find_adalora(model: nn.Module) -> AdaLoraModel | None:
    """The AdaLoraModel inside a peft model (it owns the rank allocator), or None."""
    inner = getattr(model, "base_model", None)
    return inner if isinstance(inner, AdaLoraModel) else None
