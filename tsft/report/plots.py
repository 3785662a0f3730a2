"""λ sweeps: score and token sparsity against λ for one task and TS method, from result.json files."""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tsft.report.render import fmt_sci, fmt_stat, write_atomic
from tsft.report.runs import Stat, seed_stat, short_key


@dataclass(frozen=True)
class SweepPoint:
    lam: float
    score: Stat | None
    sparsity: Stat | None  # percent


@dataclass(frozen=True)
class Sweep:
    task: str
    method: str
    model: str
    preset: str
    points: list[SweepPoint]
    baseline: Stat | None  # the dense method's score on the same task/model/preset (λ has no meaning there)
    conflicts: list[str]  # λ values left out because a seed appears twice (which run counts is unclear)


def sweep_keys(runs: list[dict[str, Any]]) -> set[tuple[str, str, str, str]]:
    """(task, method, model, preset) of the TS runs: runs of different models or presets never share a curve."""
    return {
        (run["task"], run["method"], str(run.get("model")), str(run.get("preset")))
        for run in runs
        if run.get("ts") and run.get("lambda") is not None
    }


def build_sweep(runs: list[dict[str, Any]], task: str, method: str, model: str, preset: str) -> Sweep:
    """Mean ± std over seeds at each λ; the dense baseline is the method without its "ts-" prefix."""

    def same_setting(run):
        return run.get("task") == task and str(run.get("model")) == model and str(run.get("preset")) == preset

    by_lambda: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        if same_setting(run) and run.get("method") == method and run.get("lambda") is not None:
            by_lambda[float(run["lambda"])].append(run)
    points, conflicts = [], []
    for lam, rs in sorted(by_lambda.items()):
        if _seed_repeated(rs):
            conflicts.append(f"λ={fmt_sci(lam)}: a seed appears in several runs ({', '.join(r['_path'] for r in rs)})")
            continue
        points.append(SweepPoint(lam, _stat([r.get("score") for r in rs]), _stat([_sparsity(r) for r in rs])))
    dense = method.removeprefix("ts-")
    dense_runs = [r for r in runs if same_setting(r) and r.get("method") == dense]
    baseline = None
    if _seed_repeated(dense_runs):
        conflicts.append(f"dense {dense}: a seed appears in several runs, no baseline drawn")
    else:
        baseline = _stat([r.get("score") for r in dense_runs])
    return Sweep(task, method, model, preset, points, baseline, conflicts)


def sweep_table(sweep: Sweep) -> str:
    lines = [
        f"{sweep.task} {sweep.method} (model {sweep.model}, preset {sweep.preset})",
        f"{'lambda':>10}  {'score':>20}  {'sparsity %':>20}",
    ]
    for p in sweep.points:
        lines.append(f"{fmt_sci(p.lam):>10}  {fmt_stat(p.score):>20}  {fmt_stat(p.sparsity):>20}")
    lines.append(f"{'dense ' + sweep.method.removeprefix('ts-'):>10}  {fmt_stat(sweep.baseline):>20}")
    lines += [f"left out: {c}" for c in sweep.conflicts]
    return "\n".join(lines)


def plot_sweep(sweep: Sweep, out_dir: Path) -> Path:
    """Two panels over a log λ axis, error bars = std over seeds; written atomically."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_score, ax_sparsity = fig.subplots(1, 2)
    for ax, attr, ylabel in ((ax_score, "score", "score (×100)"), (ax_sparsity, "sparsity", "token sparsity (%)")):
        pts = [(p.lam, getattr(p, attr)) for p in sweep.points if getattr(p, attr) is not None]
        if pts:
            ax.errorbar(
                [x for x, _ in pts],
                [s.mean for _, s in pts],
                yerr=[s.std or 0.0 for _, s in pts],
                marker="o",
                capsize=3,
                label=sweep.method,
            )
        ax.set_xscale("log")
        ax.set_xlabel("λ")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    if sweep.baseline is not None:
        ax_score.axhline(
            sweep.baseline.mean,
            linestyle="--",
            color="grey",
            label=f"{sweep.method.removeprefix('ts-')} (dense, n={sweep.baseline.n})",
        )
    ax_score.legend(fontsize="small")
    fig.suptitle(f"{sweep.task} · {sweep.method} · {sweep.model} · preset {sweep.preset}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    path = Path(out_dir) / f"{short_key(sweep.task)}_{sweep.method}_lambda.png"
    write_atomic(path, buffer.getvalue())
    return path


def _seed_repeated(runs: list[dict[str, Any]]) -> bool:
    seeds = [r.get("seed") for r in runs]
    return len(seeds) != len(set(seeds))


def _stat(values: list[float | None]) -> Stat | None:
    present = [v for v in values if v is not None]
    return seed_stat(present) if present else None


def _sparsity(run: dict[str, Any]) -> float | None:
    overall = (run.get("sparsity") or {}).get("overall")
    return None if overall is None else 100 * overall
