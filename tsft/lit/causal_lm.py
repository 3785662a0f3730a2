"""Causal-LM instruction tuning (commonsense reasoning) on a PEFT-wrapped Hugging Face model.

Training and validation minimise the model's token cross-entropy, which the data's labels restrict to
the response tokens. Testing runs the CSR evaluation (tsft.eval.csr) over one test dataloader per test
set and leaves accuracy per set and their average in ``eval_metrics``. With token gates it also adds
the sparsity measured on each test set (Table 1's Sparsity row) to the report the TokenGateCallback
leaves, as ``per_dataset``; in generate mode the generated tokens, of every beam, count too.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from tsft.errors import InputError
from tsft.eval.csr import MODES, accuracies, predict
from tsft.gate import find_token_gates
from tsft.lit.base import PeftModule


class CausalLMModule(PeftModule):
    def __init__(
        self,
        model: nn.Module,
        optim_cfg: DictConfig,
        peft_cfg: DictConfig,
        tokenizer: Any,
        test_sets: tuple[str, ...],
        eval_mode: str = "generate",
        num_beams: int = 4,
        max_new_tokens: int = 32,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(model, optim_cfg, peft_cfg)
        if eval_mode not in MODES:
            raise InputError(f"task.eval_mode '{eval_mode}' is not one of {', '.join(MODES)}")
        self.tokenizer = tokenizer
        self.test_sets = test_sets
        self.eval_mode, self.num_beams, self.max_new_tokens = eval_mode, num_beams, max_new_tokens
        fit_embeddings_to_tokenizer(model, tokenizer)
        if gradient_checkpointing:
            # Non-reentrant checkpointing: the frozen embeddings' outputs need no requires_grad for the
            # PEFT weights inside checkpointed layers to receive gradients.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.eval_metrics: dict[str, float] = {}
        self.eval_extras: dict[str, Any] = {}  # written to result.json beside the metrics

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.model(**batch).loss, prog_bar=True, batch_size=len(batch["input_ids"]))

    # ------------------------------------------------------------------ test: the CSR evaluation
    def on_test_epoch_start(self) -> None:
        self._gates = find_token_gates(self.model)
        self._answers = torch.zeros(len(self.test_sets), 3, dtype=torch.long)  # (correct, parsed, total) per set
        # Gate counts are cumulative over the test loop (the TokenGateCallback reports the whole of it);
        # each set's share is the difference between the counts at its end and at its start.
        self._gate_counts = torch.zeros(len(self.test_sets), len(self._gates), 2, dtype=torch.long)
        self._counts_at_set_start = self._cumulative_gate_counts()
        self._current_set = 0

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx != self._current_set:
            self._close_test_set()
            self._current_set = dataloader_idx
        predictions = predict(
            self.model,
            self.tokenizer,
            self.test_sets[dataloader_idx],
            batch,
            self.eval_mode,
            self.num_beams,
            self.max_new_tokens,
        )
        self._answers[dataloader_idx, 0] += sum(p == r["answer"] for p, r in zip(predictions, batch))
        self._answers[dataloader_idx, 1] += sum(p != "" for p in predictions)  # "": no answer token found
        self._answers[dataloader_idx, 2] += len(batch)

    def on_test_epoch_end(self) -> None:
        self._close_test_set()
        # Under DDP each rank evaluated its shard: sum the counts. (Lightning's DistributedSampler evens the
        # shards by repeating up to world_size - 1 records per test set; one device counts each record once.)
        answers = self.trainer.strategy.reduce(self._answers.to(self.device), reduce_op="sum").cpu()
        self.eval_metrics = accuracies({name: (int(c), int(n)) for name, (c, _, n) in zip(self.test_sets, answers)})
        # Share of responses in which an answer token of the set's kind was found: a model that has not
        # learned the answer format scores low because it answers nothing, not because it answers wrongly.
        # (loglik mode always picks an offered answer: 1.0.)
        self.eval_extras = {
            "answers_parsed": {name: int(p) / int(n) for name, (_, p, n) in zip(self.test_sets, answers) if n > 0}
        }
        self.log_dict({f"test/{name}": value for name, value in self.eval_metrics.items()})
        if self._gates:
            counts = self.trainer.strategy.reduce(self._gate_counts.to(self.device), reduce_op="sum").cpu()
            per_dataset = {name: mean_sparsity(set_counts) for name, set_counts in zip(self.test_sets, counts)}
            self.sparsity_report = {**getattr(self, "sparsity_report", {}), "per_dataset": per_dataset}

    def _cumulative_gate_counts(self) -> torch.Tensor:
        return torch.tensor([gate.counts("eval") for gate in self._gates], dtype=torch.long).reshape(-1, 2)

    def _close_test_set(self) -> None:
        now = self._cumulative_gate_counts()
        self._gate_counts[self._current_set] += now - self._counts_at_set_start
        self._counts_at_set_start = now


def mean_sparsity(gate_counts: torch.Tensor) -> float | None:
    """Mean over gated modules of 1 - active/tokens (Eq. 21), as tsft.gate.sparsity_report's ``overall``."""
    values = [1.0 - active / tokens for active, tokens in gate_counts.tolist() if tokens > 0]
    return sum(values) / len(values) if values else None


def fit_embeddings_to_tokenizer(model: nn.Module, tokenizer: Any) -> None:
    """Grow the embeddings when tsft.data.csr.ensure_pad_token had to add a pad token, keeping them frozen."""
    if model.get_input_embeddings().num_embeddings >= len(tokenizer):
        return
    model.resize_token_embeddings(len(tokenizer))
    model.get_input_embeddings().requires_grad_(False)
    model.get_output_embeddings().requires_grad_(False)
