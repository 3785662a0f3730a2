"""The whole model of a run: backbone -> PEFT method -> token gates (when sparsity.enabled)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from transformers import PreTrainedTokenizerBase

from tsft import paths
from tsft.errors import InputError
from tsft.models.backbone import load_backbone
from tsft.models.peft_methods import apply_peft

HEADS_FILE = "heads.safetensors"  # what a peft=heads run leaves: its trained head modules, backbone-relative names


def build_peft_model(
    cfg: DictConfig,
    tokenizer: PreTrainedTokenizerBase,
    auto_class: Any,
    task_type: str,
    total_steps: int,
    **config_kwargs: Any,
) -> nn.Module:
    """``auto_class``/``task_type``: e.g. AutoModelForSequenceClassification/"SEQ_CLS" or
    AutoModelForCausalLM/"CAUSAL_LM"; ``config_kwargs`` such as ``num_labels`` go to the model config."""
    backbone = load_backbone(cfg.model, auto_class, tokenizer, paths.cache_dir(cfg.paths), **config_kwargs)
    if cfg.model.get("init_from"):  # e.g. LLaVA's projector from a stage-1 run (peft=heads)
        load_heads(backbone, heads_file(cfg))
    model = apply_peft(backbone, cfg.peft, cfg.model, task_type, total_steps)
    if cfg.sparsity.enabled:
        # The gates wrap the PEFT layers just created; the attention mask passed to the model's
        # forward reaches them, so padding never counts (tsft.gate).
        from tsft.gate import GateConfig, add_token_gates

        add_token_gates(model, GateConfig.from_mapping(cfg.sparsity))
    return model


def save_heads(model: nn.Module, run_dir: Path) -> Path:
    """The trainable weights of a peft=heads model (its head modules), under the backbone's own names."""
    from safetensors.torch import save_file

    weights = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    path = run_dir / HEADS_FILE
    save_file(weights, str(path))
    return path


def heads_file(cfg: DictConfig) -> Path:
    """``model.init_from``: a run directory, its heads.safetensors, or the run name of a finished run of this task."""
    from tsft.report.grid import finished_result

    source = str(cfg.model.init_from)
    path = paths.resolve(source)
    if path.is_dir():
        path = path / HEADS_FILE
    if not path.is_file() and "/" not in source:
        from omegaconf import OmegaConf

        found = finished_result(OmegaConf.merge(cfg, {"run_name": source}), check_config=False)
        path = found.parent / HEADS_FILE if found else path
    if not path.is_file():
        raise InputError(f"model.init_from={source}: no {HEADS_FILE} there; give a finished peft=heads run")
    return path


def load_heads(backbone: nn.Module, path: Path) -> None:
    """Copy a stage-1 run's head weights into ``backbone``; every tensor must fit a parameter of the same shape."""
    from safetensors.torch import load_file

    weights = load_file(str(path))
    params = dict(backbone.named_parameters())
    unfit = [n for n, w in weights.items() if n not in params or params[n].shape != w.shape]
    if unfit:
        raise InputError(f"{path}: {len(unfit)} tensors fit no parameter of this model (e.g. {unfit[0]}); same model?")
    with torch.no_grad():
        for name, weight in weights.items():
            params[name].copy_(weight)
