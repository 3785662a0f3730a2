"""result.json: one file per finished run (schema in docs/CONTRACT.md), written atomically."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_result(
    cfg: DictConfig,
    *,
    method: str,
    run_name: str,
    metrics: dict[str, Any],
    score: float | None,
    sparsity: dict[str, Any] | None,
    scale: dict[str, Any],
    wall_time_s: float,
    **extra: Any,
) -> dict[str, Any]:
    """The contract's fields; ``extra`` adds family-specific ones (CSR: ``eval``, ``train_data``)."""
    return {
        "task": cfg.task.name,
        "family": cfg.task.family,
        "model": cfg.model.name,
        "peft": cfg.peft.name,
        "ts": bool(cfg.sparsity.enabled),
        "method": method,
        "lambda": float(cfg.sparsity["lambda"]) if cfg.sparsity.enabled else None,
        "seed": cfg.seed,
        "preset": cfg.preset,
        "study": cfg.get("study"),
        "run_name": run_name,
        "metrics": metrics,
        "score": score,
        "sparsity": sparsity,
        "scale": scale,
        **extra,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "git_commit": git_commit(),
        "wall_time_s": round(wall_time_s, 1),
    }


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write to a temporary file beside ``path``, then rename: readers never see half a file,
    and a run killed before this point leaves no result.json at all."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def git_commit() -> str | None:
    """The checked-out commit of the tsft repository (None outside a git checkout or before any commit)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def summary_line(result: dict[str, Any]) -> str:
    """One line for the console: the metrics and, for TS runs, the sparsity and the learned thresholds."""
    metrics = ", ".join(f"{k}={v:.4f}" if v is not None else f"{k}=null" for k, v in result["metrics"].items())
    line = f"{result['task']} {result['method']} ({result['model']}): {metrics}"
    sparsity = result.get("sparsity")
    if sparsity and sparsity.get("overall") is not None:
        taus = [module["tau"] for module in sparsity["modules"]]
        line += (
            f"; sparsity={sparsity['overall']:.3f} (eval, mean of {len(taus)} gated modules), "
            f"tau in [{min(taus):.3g}, {max(taus):.3g}]"
        )
    return line
