"""The whole model of a run: backbone -> PEFT method -> token gates (when sparsity.enabled)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig
from torch import nn
from transformers import PreTrainedTokenizerBase

from tsft import paths
from tsft.models.backbone import load_backbone
from tsft.models.peft_methods import apply_peft


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
    model = apply_peft(backbone, cfg.peft, cfg.model, task_type, total_steps)
    if cfg.sparsity.enabled:
        # The gates wrap the PEFT layers just created; the attention mask passed to the model's
        # forward reaches them, so padding never counts (tsft.gate).
        from tsft.gate import GateConfig, add_token_gates

        add_token_gates(model, GateConfig.from_mapping(cfg.sparsity))
    return model
