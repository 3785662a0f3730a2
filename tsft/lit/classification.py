"""Sequence classification and regression (GLUE) on a PEFT-wrapped Hugging Face model."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn

from tsft.data.glue import eval_split_suffix
from tsft.eval.glue import glue_metrics
from tsft.lit.base import PeftModule


class SequenceClassificationModule(PeftModule):
    """Loss from the model's own head (cross-entropy; MSE when ``num_labels == 1``), GLUE metrics
    per dev split; ``eval_metrics`` holds the last evaluation as plain floats."""

    def __init__(
        self,
        model: nn.Module,
        optim_cfg: DictConfig,
        peft_cfg: DictConfig,
        glue_task: str,
        num_labels: int,
        eval_splits: tuple[str, ...],
    ) -> None:
        super().__init__(model, optim_cfg, peft_cfg)
        self.is_regression = num_labels == 1
        self.eval_suffixes = [eval_split_suffix(s) for s in eval_splits]
        self.val_metrics = nn.ModuleList(glue_metrics(glue_task, num_labels) for _ in eval_splits)
        self.eval_metrics: dict[str, float | None] = {}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        out = self.model(**batch)
        predictions = out.logits.squeeze(-1).float() if self.is_regression else out.logits.argmax(dim=-1)
        self.val_metrics[dataloader_idx].update(predictions, batch["labels"])
        suffix = self.eval_suffixes[dataloader_idx]
        self.log(f"val/loss{suffix}", out.loss, add_dataloader_idx=False, batch_size=len(batch["labels"]))

    def on_validation_epoch_end(self) -> None:
        results: dict[str, float | None] = {}
        for suffix, metrics in zip(self.eval_suffixes, self.val_metrics, strict=True):
            for name, value in metrics.compute().items():
                value = float(value)
                # A constant prediction has no correlation (NaN): recorded as null, not a number.
                results[f"{name}{suffix}"] = value if math.isfinite(value) else None
            metrics.reset()
        self.eval_metrics = results
        self.log_dict({f"val/{k}": v for k, v in results.items() if v is not None}, prog_bar=True)
