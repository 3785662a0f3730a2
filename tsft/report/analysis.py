"""The analyses' outputs from their runs (study ``analysis``): Table 4, Figure 2 (+ CSV) and Figure 3.

Table 4: one row per selection rule of a dense run (tsft.analysis.selection) on the modules a TS run
ranked, the full-module run as reference, mean ± std over seeds per task, and each rule's average minus the
reference's, paired over seeds with a 95 % interval. ``random`` is first averaged over its draws per seed.
Figure 2: the average score against the share of modules kept in ascending order of the TS variant's
sparsity, one line per PEFT method. Figure 3: training loss and one gate's tau per optimizer step, with and
without Adam on the threshold. Paper numbers stand beside ours (Table 4's Avg column); they are CSR scores
of LLaMA-3.1-8B, so at the CPU preset (GLUE, MiniLM-L6) only their order can be compared.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tsft.report.render import MISSING, Grid, Report, fmt_paired, fmt_stat, write_atomic, write_report
from tsft.report.runs import (
    Stat,
    average_stat,
    load_runs,
    paired_diff,
    per_seed_average,
    provenance,
    scale_summary,
    seed_stat,
    short_key,
)
from tsft.report.tables import GLUE_TASKS, csr_extract, csr_trivial, glue_extract, glue_trivial, load_paper

STUDY = "analysis"
# Table 4's rows: selection rule -> (our label, the paper's row in results/paper/table4.json)
TABLE4_ROWS = {
    "all": ("{method}, all modules (reference)", None),
    "s_low": ("S_low_{p}%", "S_low_50%"),
    "s_high": ("S_high_{p}%", "S_high_50%"),
    "norm_relative": ("norm_relative_{p}%", "norm_relative_50%"),
    "norm_abs": ("norm_abs_{p}%", "norm_abs_50%"),
    "random": ("random_{p}% (mean of draws)", "random_50%"),
    "half_rank": ("half_rank (all modules, rank / 2)", "half_rank_50%"),
}
METHOD_LABELS = {"lora": "LoRA", "dora": "DoRA", "adalora": "AdaLoRA"}
PerSeed = dict[str, dict[Any, float]]  # column -> seed -> score


def analysis_runs(runs_dir: Path, preset: str) -> tuple[list[dict[str, Any]], list[str]]:
    runs, unreadable = load_runs(runs_dir)
    return [r for r in runs if r.get("study") == STUDY and r.get("preset") == preset], unreadable


def _columns_and_extract(runs: list[dict[str, Any]]) -> tuple[list[str], Callable, Callable, Callable]:
    """(columns, score extractor, trivial extractor, label of a column) for the family the runs are of."""
    if any(r.get("family") == "csr" for r in runs):
        paper = load_paper("table1")
        return paper["columns"], csr_extract, csr_trivial, lambda c: paper["column_labels"][c]
    present = {short_key(r.get("task", "")) for r in runs}
    order = GLUE_TASKS["paper"]
    columns = [t for t in order if t in present]
    labels = load_paper("table3")["column_labels"]
    return columns, glue_extract(columns), glue_trivial, lambda c: labels.get(c, c)


def _scores(runs: list[dict[str, Any]], extract: Callable) -> PerSeed:
    """column -> seed -> score; several runs of one seed (random's draws) are averaged."""
    collected: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for column, (score, _) in extract(run).items():
            if score is not None:
                collected[column][run.get("seed")].append(score)
    return {c: {seed: sum(v) / len(v) for seed, v in by_seed.items()} for c, by_seed in collected.items()}


def _mean_of(values: list[float], form: str = "{:.4g}") -> str:
    return MISSING if not values else form.format(sum(values) / len(values))


# ---------------------------------------------------------------- Table 4


def table4_report(runs_dir: Path, preset: str, method: str = "dora") -> Report:
    runs, unreadable = analysis_runs(runs_dir, preset)
    selected = [r for r in runs if r.get("selection") and r.get("peft") == method and not r.get("ts")]
    header = provenance(selected, runs_dir, preset, unreadable) + scale_summary(
        selected, lambda r: short_key(r.get("task", ""))
    )
    by_path = {r["_path"]: r for r in runs}
    for path in sorted({r["selection"]["source"] for r in selected if r["selection"].get("source")}):
        source = by_path.get(path, {})
        overall = (source.get("sparsity") or {}).get("overall")
        header.append(
            f"Source TS run ({source.get('task', '?')}): `{path}`, λ {source.get('lambda', '?')}, evaluation "
            f"sparsity {MISSING if overall is None else f'{100 * overall:.1f} %'}"
        )
    columns, extract, trivial_of, label_of = _columns_and_extract(selected or runs)
    paper = load_paper("table4")
    paper_reference = load_paper("table1")["methods"].get(method, {}).get("score", {}).get("avg")
    head = ["Selection", "modules kept", "PEFT weights"] + [label_of(c) for c in columns]
    head += ["Avg", "Avg − all modules, paired (95 % CI)", "paper Avg (Table 4, LLaMA-3.1-8B CSR)"]
    by_rule: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in selected:
        by_rule[run["selection"]["rule"]].append(run)
    reference = _scores(by_rule.get("all", []), extract)
    rows = [_trivial_row(selected, columns, trivial_of, len(head))]
    for rule, (label, paper_row) in TABLE4_ROWS.items():
        rule_runs = by_rule.get(rule, [])
        p_values = sorted({float(r["selection"].get("p", 1.0)) for r in rule_runs}) or [0.5]
        p_text = "/".join(f"{100 * p:g}" for p in p_values)
        scores = _scores(rule_runs, extract)
        kept = [len(r["selection"]["modules"]) for r in rule_runs if r["selection"].get("modules")]
        weights = [(r.get("trainable_params") or {}).get("peft") for r in rule_runs]
        cells = [fmt_stat(seed_stat(list(scores[c].values()))) if scores.get(c) else MISSING for c in columns]
        avg = average_stat(scores, columns)
        paired = (
            MISSING
            if rule == "all"
            else fmt_paired(paired_diff(per_seed_average(scores, columns), per_seed_average(reference, columns)))
        )
        paper_avg = paper["selections"][paper_row]["avg"] if paper_row else paper_reference
        kept_text = _mean_of(kept) if kept else ("all" if rule_runs else MISSING)
        rows.append(
            [label.format(method=METHOD_LABELS.get(method, method), p=p_text), kept_text]
            + [_mean_of([w for w in weights if w is not None], "{:.0f}")]
            + cells
            + [fmt_stat(avg), paired, MISSING if paper_avg is None else f"{paper_avg:.1f}"]
        )
    notes = [
        "Each row is a dense run on the modules its rule kept from the source TS run's per-module evaluation "
        "statistics (result.json `sparsity.modules`: `sparsity`, `mean_relative_norm`, `mean_norm`); "
        "`modules kept` and `PEFT weights` are means over the row's runs.",
        "Cells: mean ± sample std over seeds (n seeds); random: each seed's mean over its draws first. The paired "
        "column: the row's per-seed average minus the all-modules run's of the same seed, mean and 95 % t-interval.",
        "The paper's Avg is LLaMA-3.1-8B on the eight CSR test sets (its all-modules DoRA: Table 1, 85.0); at the "
        "CPU preset (GLUE, MiniLM-L6) compare the order of the rows, not the numbers.",
    ]
    grid = Grid(f"Table 4 — module selection by {METHOD_LABELS.get(method, method)}'s token sparsity", head, rows)
    return Report(f"Table 4 (preset {preset})", header, [grid], notes)


def _trivial_row(runs, columns, trivial_of, width: int) -> list[str]:
    values: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        for column, value in trivial_of(run).items():
            values[column].append(value)
    cells = [_mean_of(values[c], "{:.1f}") if values.get(c) else MISSING for c in columns]
    return (["Trivial baseline — majority class / constant", "", ""] + cells + [""] * 3)[:width]


def make_table4(runs_dir: Path, preset: str, out_dir: Path, method: str = "dora") -> list[Path]:
    stem = "table4" if preset == "paper" else f"table4_{preset}"
    return write_report(table4_report(runs_dir, preset, method), out_dir, stem)


# ---------------------------------------------------------------- Figure 2


def figure2_points(runs: list[dict[str, Any]]) -> dict[str, list[tuple[float, Stat, int]]]:
    """method -> [(percent of modules, average score over columns as mean ± std over seeds, runs)], ascending."""
    curves: dict[str, list[tuple[float, Stat, int]]] = {}
    dense = [r for r in runs if r.get("selection") and not r.get("ts") and r["selection"]["rule"] in ("s_low", "all")]
    columns, extract, _, _ = _columns_and_extract(dense or runs)
    for method in sorted({r.get("peft") for r in dense}, key=str):
        by_p: dict[float, list[dict[str, Any]]] = defaultdict(list)
        for run in dense:
            if run.get("peft") == method:
                p = 1.0 if run["selection"]["rule"] == "all" else float(run["selection"]["p"])
                by_p[p].append(run)
        points = []
        for p, p_runs in sorted(by_p.items()):
            per_seed = per_seed_average(_scores(p_runs, extract), columns)
            if per_seed:
                points.append((100 * p, seed_stat(list(per_seed.values())), len(p_runs)))
        curves[method] = points
    return curves


def make_figure2(runs_dir: Path, preset: str, out_dir: Path) -> list[Path]:
    runs, _ = analysis_runs(runs_dir, preset)
    curves = figure2_points(runs)
    columns, _, _, label_of = _columns_and_extract([r for r in runs if r.get("selection")] or runs)
    stem = "figure2" if preset == "paper" else f"figure2_{preset}"
    lines = [["method", "percent_of_modules", "score_mean", "score_std", "seeds", "runs"]]
    for method, points in curves.items():
        lines += [
            [method, f"{x:g}", f"{s.mean:.3f}", "" if s.std is None else f"{s.std:.3f}", s.n, n] for x, s, n in points
        ]
    buffer = io.StringIO()
    csv.writer(buffer).writerows(lines)
    csv_path = Path(out_dir) / f"{stem}.csv"
    write_atomic(csv_path, buffer.getvalue())

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for method, points in curves.items():
        if not points:
            continue
        line = ax.errorbar(
            [x for x, _, _ in points],
            [s.mean for _, s, _ in points],
            yerr=[s.std or 0.0 for _, s, _ in points],
            marker="o",
            capsize=3,
            label=METHOD_LABELS.get(method, method),
        )
        full = [(x, s) for x, s, _ in points if x == 100]
        if full:  # the full-module run, marked
            ax.plot(full[0][0], full[0][1].mean, marker="*", markersize=14, color=line[0].get_color(), linestyle="")
    ax.set_xlabel("modules fine-tuned (% of all, added in ascending order of TS sparsity)")
    ax.set_ylabel(f"average score over {', '.join(label_of(c) for c in columns)}")
    ax.set_xticks(range(10, 101, 10))
    ax.grid(True, alpha=0.3)
    ax.legend(title="★ = all modules", fontsize="small")
    fig.suptitle(f"Figure 2 — cumulative selection (preset {preset}; error bars: std over seeds)", fontsize="medium")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    png_path = Path(out_dir) / f"{stem}.png"
    write_atomic(png_path, png.getvalue())
    return [csv_path, png_path]


# ---------------------------------------------------------------- Figure 3

TRACE_FILE = "tau_trace.csv"


def read_trace(run_dir: Path) -> tuple[list[str], list[list[float]]]:
    """(column names, rows as floats) of a run's tau_trace.csv: step, loss, then one tau per gate."""
    with open(Path(run_dir) / TRACE_FILE, newline="") as trace:
        reader = csv.reader(trace)
        names = next(reader)
        return names, [[float(v) for v in row] for row in reader]


def pick_module(names: list[str], module: str) -> int:
    """Column of the gate named ``module`` (a suffix of its full name) or at gate index ``module``."""
    gates = names[2:]
    if module.lstrip("-").isdigit():
        return 2 + range(len(gates))[int(module)]
    matches = [i for i, name in enumerate(gates) if name == module or name.endswith("." + module)]
    if len(matches) != 1:
        found = "several gates" if matches else "no gate"
        raise ValueError(f"{found} named {module!r}; pick one of e.g. {', '.join(gates[:3])} ... or an index")
    return 2 + matches[0]


def make_figure3(runs_dir: Path, preset: str, out_dir: Path, module: str) -> list[Path]:
    """Panels (a) Adam on tau and (b) the plain step, from the traced runs of this preset."""
    runs, _ = analysis_runs(runs_dir, preset)
    traced = {}
    for run in runs:
        sparsity_cfg = (run.get("config") or {}).get("sparsity") or {}
        if sparsity_cfg.get("trace_tau") and (Path(run["_path"]).parent / TRACE_FILE).is_file():
            traced.setdefault(bool(sparsity_cfg.get("adam", True)), run)
    if set(traced) != {True, False}:
        raise ValueError(
            f"figure 3 needs one traced run with sparsity.adam=true and one with false under {runs_dir} "
            f"(preset {preset}); found adam={sorted(traced)}"
        )
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, adam, title in ((axes[0], True, "(a) with Adam on τ"), (axes[1], False, "(b) plain step, no Adam")):
        names, rows = read_trace(Path(traced[adam]["_path"]).parent)
        column = pick_module(names, module)
        steps = [r[0] for r in rows]
        ax.plot(steps, [r[1] for r in rows], color="tab:blue", linewidth=0.8, label="training loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss", color="tab:blue")
        twin = ax.twinx()
        twin.plot(steps, [r[column] for r in rows], color="tab:red", linestyle="--", label="τ")
        twin.set_ylabel(f"τ of {names[column].removeprefix('base_model.model.')}", color="tab:red", fontsize="small")
        run = traced[adam]
        overall = (run.get("sparsity") or {}).get("overall")
        reached = "" if overall is None else f", eval sparsity {100 * overall:.1f} %"
        ax.set_title(f"{title} — {run.get('task')}, λ {run.get('lambda')}{reached}", fontsize="medium")
        ax.grid(True, alpha=0.3)
    scale = traced[True].get("scale") or {}
    at = ", ".join(f"{k} {scale[k]}" for k in ("model", "max_steps", "max_length") if k in scale)
    fig.suptitle(f"Figure 3 — threshold dynamics of one TS-LoRA layer (preset {preset}; {at})", fontsize="medium")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    stem = "figure3" if preset == "paper" else f"figure3_{preset}"
    path = Path(out_dir) / f"{stem}.png"
    write_atomic(path, png.getvalue())
    return [path]
