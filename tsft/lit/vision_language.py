"""Visual instruction tuning (LLaVA) on a PEFT-wrapped ``LlavaForConditionalGeneration``.

Training minimises the token cross-entropy of the assistant answers (tsft.data.vit masks the rest).
Validation scores the held-out conversations: their answer tokens' mean cross-entropy, its perplexity, and
the share of answer tokens the model predicts exactly (greedy next token, teacher-forced); the last one,
x100, is the run's score at the CPU scale, where the benchmark images are not available.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tsft.data.vit import IGNORE
from tsft.lit.base import PeftModule


class VisionLanguageModule(PeftModule):
    def __init__(self, model, optim_cfg, peft_cfg) -> None:
        super().__init__(model, optim_cfg, peft_cfg)
        self.eval_metrics: dict[str, float] = {}
        self._sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct tokens, answer tokens

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._sums.zero_()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        labels = batch["labels"]
        logits = self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        # position t predicts token t + 1
        logits, targets = logits[:, :-1].float(), labels[:, 1:]
        answer = targets != IGNORE
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        correct = ((logits.argmax(-1) == targets) & answer).sum()
        self._sums += torch.tensor([float(loss), float(correct), float(answer.sum())], dtype=torch.float64)

    def on_validation_epoch_end(self) -> None:
        loss_sum, correct, tokens = self._sums.tolist()
        if tokens == 0:
            self.eval_metrics = {}
            return
        mean = loss_sum / tokens
        self.eval_metrics = {
            "answer_loss": mean,
            "answer_ppl": math.exp(min(mean, 50.0)),
            "token_accuracy": correct / tokens,
        }
        self.log_dict({f"val/{k}": v for k, v in self.eval_metrics.items()}, prog_bar=True)
