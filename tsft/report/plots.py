"""Sweeps: score and token sparsity against λ (or the gate scale s) for one task and TS method, from result.json
files; and an overview of several sweeps in one figure, with the sparsity range a calibration aims for."""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tsft.report.render import fmt_sci, fmt_stat, write_atomic
from tsft.report.runs import Stat, gate_scale, seed_stat, short_key

VARIABLES = {"lambda": "λ", "s": "gate scale s"}  # what a sweep varies -> its axis label


@dataclass(frozen=True)
class SweepPoint:
    value: float  # of the swept variable
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
    conflicts: list[str]  # values left out because a seed appears twice (which run counts is unclear)
    variable: str = "lambda"  # "lambda" | "s"


def sweep_keys(runs: list[dict[str, Any]]) -> set[tuple[str, str, str, str]]:
    """(task, method, model, preset) of the TS runs: runs of different models or presets never share a curve."""
    return {
        (run["task"], run["method"], str(run.get("model")), str(run.get("preset")))
        for run in runs
        if run.get("ts") and run.get("lambda") is not None
    }


def swept_value(run: dict[str, Any], variable: str) -> float | None:
    """The run's λ, or its gate scale s (config.sparsity.s)."""
    value = run.get("lambda") if variable == "lambda" else gate_scale(run)
    return None if value is None else float(value)


def build_sweep(
    runs: list[dict[str, Any]], task: str, method: str, model: str, preset: str, variable: str = "lambda"
) -> Sweep:
    """Mean ± std over seeds at each value of λ (or s); the dense baseline is the method without its "ts-" prefix.
    A sweep over s pools the runs of one λ: runs at several λ with the same s and seed are a conflict."""

    def same_setting(run):
        return run.get("task") == task and str(run.get("model")) == model and str(run.get("preset")) == preset

    by_value: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        value = swept_value(run, variable) if run.get("lambda") is not None else None
        if same_setting(run) and run.get("method") == method and value is not None:
            by_value[value].append(run)
    points, conflicts = [], []
    symbol = VARIABLES[variable]
    for value, rs in sorted(by_value.items()):
        if _seed_repeated(rs):
            paths = ", ".join(r["_path"] for r in rs)
            conflicts.append(f"{symbol}={fmt_sci(value)}: a seed appears in several runs ({paths})")
            continue
        points.append(SweepPoint(value, _stat([r.get("score") for r in rs]), _stat([_sparsity(r) for r in rs])))
    dense = method.removeprefix("ts-")
    dense_runs = [r for r in runs if same_setting(r) and r.get("method") == dense]
    baseline = None
    if _seed_repeated(dense_runs):
        conflicts.append(f"dense {dense}: a seed appears in several runs, no baseline drawn")
    else:
        baseline = _stat([r.get("score") for r in dense_runs])
    return Sweep(task, method, model, preset, points, baseline, conflicts, variable)


def sweep_table(sweep: Sweep) -> str:
    lines = [
        f"{sweep.task} {sweep.method} (model {sweep.model}, preset {sweep.preset})",
        f"{sweep.variable:>10}  {'score':>20}  {'sparsity %':>20}",
    ]
    for p in sweep.points:
        lines.append(f"{fmt_sci(p.value):>10}  {fmt_stat(p.score):>20}  {fmt_stat(p.sparsity):>20}")
    lines.append(f"{'dense ' + sweep.method.removeprefix('ts-'):>10}  {fmt_stat(sweep.baseline):>20}")
    lines += [f"left out: {c}" for c in sweep.conflicts]
    return "\n".join(lines)


def plot_sweep(sweep: Sweep, out_dir: Path) -> Path:
    """Two panels over a log λ (or s) axis, error bars = std over seeds; written atomically."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_score, ax_sparsity = fig.subplots(1, 2)
    for ax, attr, ylabel in ((ax_score, "score", "score (×100)"), (ax_sparsity, "sparsity", "token sparsity (%)")):
        pts = [(p.value, getattr(p, attr)) for p in sweep.points if getattr(p, attr) is not None]
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
        ax.set_xlabel(VARIABLES[sweep.variable])
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
    suffix = "lambda" if sweep.variable == "lambda" else "s"
    path = Path(out_dir) / f"{short_key(sweep.task)}_{sweep.method}_{suffix}.png"
    write_atomic(path, buffer.getvalue())
    return path


def plot_overview(sweeps: list[Sweep], path: Path, band: tuple[float, float] | None = None) -> Path:
    """Every sweep in one figure: score minus its dense baseline, and sparsity with the target ``band`` shaded;
    one line per (task, method), points labelled by their seed count."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_score, ax_sparsity = fig.subplots(1, 2)
    colours = [f"C{i % 10}" for i in range(len(sweeps))]  # one colour per sweep in both panels
    for sweep, colour in zip(sweeps, colours):
        label = f"{short_key(sweep.task)} {sweep.method}"
        base = sweep.baseline.mean if sweep.baseline is not None else None
        scored = [(p.value, p.score) for p in sweep.points if p.score is not None and base is not None]
        if scored:
            xs, ys, errs = [x for x, _ in scored], [s.mean - base for _, s in scored], [s.std or 0.0 for _, s in scored]
            ax_score.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label, color=colour)
        sparse = [(p.value, p.sparsity) for p in sweep.points if p.sparsity is not None]
        if sparse:
            xs, ys, errs = [x for x, _ in sparse], [s.mean for _, s in sparse], [s.std or 0.0 for _, s in sparse]
            ax_sparsity.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label, color=colour)
            for x, s in sparse:
                ax_sparsity.annotate(f"n={s.n}", (x, s.mean), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if band is not None:
        ax_sparsity.axhspan(*band, color="tab:green", alpha=0.12, label=f"target {band[0]:g}–{band[1]:g} %")
    ax_score.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    variable = VARIABLES[sweeps[0].variable] if sweeps else "λ"
    for ax, ylabel in ((ax_score, "score − dense baseline (points)"), (ax_sparsity, "token sparsity (%)")):
        ax.set_xscale("log")
        ax.set_xlabel(variable)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_sparsity.legend(fontsize="x-small")
    if sweeps:
        first = sweeps[0]
        fig.suptitle(f"sweep over {variable} · {first.model} · preset {first.preset} (error bars: std over seeds)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    write_atomic(Path(path), buffer.getvalue())
    return Path(path)


def _seed_repeated(runs: list[dict[str, Any]]) -> bool:
    seeds = [r.get("seed") for r in runs]
    return len(seeds) != len(set(seeds))


def _stat(values: list[float | None]) -> Stat | None:
    present = [v for v in values if v is not None]
    return seed_stat(present) if present else None


def _sparsity(run: dict[str, Any]) -> float | None:
    overall = (run.get("sparsity") or {}).get("overall")
    return None if overall is None else 100 * overall
