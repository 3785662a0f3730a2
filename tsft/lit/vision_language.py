"""Visual instruction tuning (LLaVA) on a PEFT-wrapped ``LlavaForConditionalGeneration``.

Training minimises the token cross-entropy of the assistant answers (tsft.data.vit masks the rest).
Validation scores the held-out conversations: their answer tokens' mean cross-entropy, its perplexity, and
the share of answer tokens the model predicts exactly (greedy next token, teacher-forced); the last one,
x100, is the run's score at the CPU scale, where the benchmark images are not available. The test loop does
the same on its first dataloader, then generates greedily (batched, left-padded prompts) for each runnable
benchmark of ``task.benchmarks`` and scores it (tsft.eval.vit_benchmarks); ``eval_extras["benchmarks"]``
holds each one's metrics, or why it was skipped.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tsft.data.vit import IGNORE
from tsft.lit.base import PeftModule


class VisionLanguageModule(PeftModule):
    def __init__(self, model, optim_cfg, peft_cfg, tokenizer=None, max_new_tokens: int = 128, out_dir=None) -> None:
        super().__init__(model, optim_cfg, peft_cfg)
        self.tokenizer, self.max_new_tokens, self.out_dir = tokenizer, max_new_tokens, out_dir
        self.eval_metrics: dict[str, float] = {}
        self.eval_extras: dict[str, Any] = {}
        self._sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct tokens, answer tokens
        self._targets: Counter[int] = Counter()  # answer tokens of the held-out conversations
        self._generated: dict[int, dict[int, str]] = {}  # benchmark loader -> record index -> answer

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._sums.zero_()
        self._targets.clear()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        labels = batch["labels"]
        logits = self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        # position t predicts token t + 1
        logits, targets = logits[:, :-1].float(), labels[:, 1:]
        answer = targets != IGNORE
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        correct = ((logits.argmax(-1) == targets) & answer).sum()
        self._sums += torch.tensor([float(loss), float(correct), float(answer.sum())], dtype=torch.float64)
        self._targets.update(targets[answer].tolist())  # for the constant-prediction baseline

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
        # the trivial baseline of token accuracy: always predicting the most common answer token, in percent
        self.eval_extras["trivial_score"] = 100 * self._targets.most_common(1)[0][1] / tokens
        self.log_dict({f"val/{k}": v for k, v in self.eval_metrics.items()}, prog_bar=True)

    # ------------------------------------------------------------------ test: held-out answers, then benchmarks
    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()
        self._generated = {}

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            self.validation_step(batch, batch_idx)
            return
        inputs = {k: v for k, v in batch.items() if k != "index"}
        width = inputs["input_ids"].shape[1]
        pad = self.tokenizer.pad_token_id
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad)
        answers = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        store = self._generated.setdefault(dataloader_idx, {})
        for index, answer in zip(batch["index"].tolist(), answers):
            store[index] = answer.strip()

    def on_test_epoch_end(self) -> None:
        from tsft.eval.vit_benchmarks import score

        self.on_validation_epoch_end()
        data = self.trainer.datamodule
        results: dict[str, Any] = {name: {"skipped": reason} for name, reason in data.skipped.items()}
        for loader, name in enumerate(data.benchmarks, start=1):
            records = data.benchmarks[name]
            answers = self._generated.get(loader, {})
            predictions = [answers[i] for i in range(len(records))]
            results[name] = score(name, records, predictions, Path(self.out_dir or self.trainer.default_root_dir))
        self.eval_extras["benchmarks"] = results
