"""Sparsity accounting (Eq. 21) across the gates of a model."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from tsft.gate.accounting import SPLITS, reduce_pending
from tsft.gate.gate import TokenGate


def sparsity_report(gates: Iterable[TokenGate], split: str = "eval") -> dict[str, Any]:
    """Per-module sparsity over the real tokens counted since the last reset of ``split``.

    ``overall`` is the mean over modules, as the paper averages q/k/v sparsities (§4.3, Table 5);
    every module sees the same tokens, so it equals the token-weighted figure. Under DDP the
    counts are summed over ranks (a collective: call it on every rank). Modules that counted no
    tokens have ``sparsity: None`` and stay out of the mean.
    """
    gates = list(gates)
    counts, norms = _global_counts(gates, split)
    modules = []
    for gate, (active, tokens), (ratio_sum, norm_sum, norm_tokens) in zip(gates, counts, norms):
        modules.append(
            {
                "name": gate.name,
                "layer": gate.layer,
                "kind": gate.kind,
                "sparsity": None if tokens == 0 else 1.0 - active / tokens,
                "tau": float(gate.tau),
                "tokens": tokens,
                # Table 4's norm criteria: mean ||delta_i|| / ||W0 x_i|| and mean ||delta_i|| over real tokens
                # (recorded by evaluation passes; None for the training split)
                "mean_relative_norm": ratio_sum / norm_tokens if norm_tokens else None,
                "mean_norm": norm_sum / norm_tokens if norm_tokens else None,
            }
        )
    measured = [m["sparsity"] for m in modules if m["sparsity"] is not None]
    overall: Optional[float] = sum(measured) / len(measured) if measured else None
    return {"split": split, "overall": overall, "modules": modules}


def sparsity_summary(gates: Iterable[TokenGate], splits: Sequence[str] = SPLITS) -> dict[str, Any]:
    """Eval and train sparsity side by side, the form written into result.json.

    ``overall`` / ``sparsity`` are measured on the evaluation data (what the paper's tables
    report per task); ``train_overall`` / ``train_sparsity`` over the last training epoch.
    """
    gates = list(gates)
    reports = {split: sparsity_report(gates, split) for split in splits}
    modules = []
    for index, gate in enumerate(gates):
        entry = {
            "name": gate.name,
            "layer": gate.layer,
            "kind": gate.kind,
            "tau": float(gate.tau),
            "trainable_params": gate.trainable_params,
        }
        for split, report in reports.items():
            prefix = "" if split == "eval" else f"{split}_"
            entry[f"{prefix}sparsity"] = report["modules"][index]["sparsity"]
            entry[f"{prefix}tokens"] = report["modules"][index]["tokens"]
            if split == "eval":  # only evaluation passes record update norms
                entry["mean_relative_norm"] = report["modules"][index]["mean_relative_norm"]
                entry["mean_norm"] = report["modules"][index]["mean_norm"]
        modules.append(entry)
    summary: dict[str, Any] = {f"{'' if s == 'eval' else s + '_'}overall": r["overall"] for s, r in reports.items()}
    summary["modules"] = modules
    return summary


def _global_counts(gates: list[TokenGate], split: str) -> tuple[list[tuple[int, int]], list[tuple[float, ...]]]:
    """Per gate: (gated-on, real) tokens, and (sum r_i, sum ||delta_i||, tokens) of the passes that recorded
    norms; summed over ranks under DDP (one collective)."""
    reduce_pending(gates)  # every gate's queued passes in one batched reduction
    rows = []
    for gate in gates:
        table = gate.accounting.table
        norm_sums = table.norm_sums[split][gate.accounting.index].tolist() if table is not None else [0.0] * 3
        rows.append([*gate.counts(split), *norm_sums])
    sums = torch.tensor(rows, dtype=torch.float64).reshape(len(gates), 5)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = gates[0].tau.device if dist.get_backend() != "gloo" else torch.device("cpu")
        sums = sums.to(device)
        dist.all_reduce(sums)
    values = sums.tolist()
    return [(int(row[0]), int(row[1])) for row in values], [tuple(row[2:]) for row in values]
