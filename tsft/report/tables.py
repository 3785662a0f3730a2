"""Aggregate a grid of result.json files into the paper's Tables 1, 3 and 5, paper numbers beside ours.

Rules that make the tables citable:
- a cell holds only what runs produced (mean ± sample std over seeds, n shown); no run -> "—";
- an average is computed only when every column of the row has runs;
- runs that cannot be pooled (several λ for one TS cell, or one seed twice) are not aggregated:
  the cell shows "‡" and a note lists them;
- paper rows are labelled as the paper's and come from results/paper/*.json, never from runs.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tsft.report.render import MISSING, Grid, Report, fmt_paired, fmt_sci, fmt_stat, write_report
from tsft.report.runs import (
    Stat,
    average_stat,
    gate_scale,
    load_runs,
    paired_diff,
    per_seed_average,
    provenance,
    scale_summary,
    seed_stat,
    short_key,
)

PAPER_DIR = Path(__file__).resolve().parents[2] / "results" / "paper"
CONFLICT = "‡"
PAPER_DERIVED = "*"
PAPER_S_NLU = 1e-4  # the gate scale s of the paper's GLUE runs (App. A.4); CSR and VIT use 4e-5
GLUE_CALIBRATION_RANGE = (40.0, 70.0)  # issue 16: the paper's sparsity range on GLUE, the target of a calibrated row

# GLUE columns of Table 3 per preset. The CPU preset runs four small GLUE tasks (no RTE); keep this list
# in sync with CPU_GLUE_TASKS in mk/tables.mk (tests/test_tables_grid.py checks it).
GLUE_TASKS = {
    "paper": ["mnli", "cola", "qnli", "rte", "mrpc", "qqp", "sst2", "stsb"],
    "cpu": ["cola", "mrpc", "sst2", "stsb"],  # RTE: see configs/experiment/table3_cpu_common.yaml
}

# Spellings of the CSR datasets in runs' metrics (LLM-Adapters / DoRA names and short ones),
# after short_key(), mapped to the column keys of results/paper/table1.json.
CSR_ALIASES = {
    "piqa": "piqa",
    "boolq": "boolq",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "siqa": "siqa",
    "socialiqa": "siqa",
    "obqa": "obqa",
    "openbookqa": "obqa",
    "arce": "arc_e",
    "arceasy": "arc_e",
    "arcc": "arc_c",
    "arcchallenge": "arc_c",
}

QKV = ("q_proj", "k_proj", "v_proj")

# What result.json's sparsity fields mean (tsft.gate.report.sparsity_summary): `overall` and the
# modules' `sparsity` are measured on the evaluation data, as the paper reports them; `train_*` are not used.
SPARSITY_DEFINITION = (
    "Sparsity (Eq. 21) = share of tokens whose update the gate skipped, measured on the evaluation data "
    "(result.json `sparsity.overall` / module `sparsity`)."
)

GLUE_TRIVIAL_SOURCE = (
    "Trivial baseline: the headline score of one constant prediction on the evaluated dev labels (result.json "
    "`trivial_score`): the majority class's accuracy; 0 for CoLA's MCC and STS-B's Pearson, which no constant "
    "raises above 0."
)
CSR_TRIVIAL_SOURCE = (
    "Trivial baseline: the accuracy of always giving the most common gold answer of the evaluated records "
    "(result.json `trivial_score[<dataset>]`); about 1/k for a balanced k-way choice."
)

Extract = Callable[[dict[str, Any]], dict[str, tuple[float | None, float | None]]]


def load_paper(table: str) -> dict[str, Any]:
    return json.loads((PAPER_DIR / f"{table}.json").read_text(encoding="utf-8"))


@dataclass
class MethodData:
    """Per column: seed -> value for score and sparsity (percent), λ values seen, and conflicts."""

    score: dict[str, dict[Any, float]] = field(default_factory=lambda: defaultdict(dict))
    sparsity: dict[str, dict[Any, float]] = field(default_factory=lambda: defaultdict(dict))
    lambdas: dict[str, set] = field(default_factory=lambda: defaultdict(set))
    s_values: set = field(default_factory=set)
    s_by_column: dict[str, set] = field(default_factory=lambda: defaultdict(set))
    conflicts: dict[str, str] = field(default_factory=dict)


def gather(runs: list[dict[str, Any]], extract: Extract, ts: bool) -> MethodData:
    data = MethodData()
    seen: dict[str, dict[Any, list[str]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        seed = run.get("seed")
        if ts:
            data.s_values.add(gate_scale(run))
        for col, (score, sparsity) in extract(run).items():
            seen[col][seed].append(run["_path"])
            data.lambdas[col].add(run.get("lambda") if ts else None)
            if ts:
                data.s_by_column[col].add(gate_scale(run))
            if score is not None:
                data.score[col][seed] = score
            if sparsity is not None:
                data.sparsity[col][seed] = sparsity
    for col, by_seed in seen.items():
        dupes = {s: p for s, p in by_seed.items() if len(p) > 1}
        if dupes:
            data.conflicts[col] = "; ".join(f"seed {s} in {len(p)} runs ({', '.join(p)})" for s, p in dupes.items())
        elif len(data.lambdas[col]) > 1:
            data.conflicts[col] = "runs with several λ: " + fmt_values(data.lambdas[col])
        elif len(data.s_by_column[col]) > 1:
            data.conflicts[col] = "runs with several s: " + fmt_values(data.s_by_column[col])
    for col in data.conflicts:
        data.score.pop(col, None)
        data.sparsity.pop(col, None)
    return data


# ---------------------------------------------------------------- formatting


def fmt_diff(ours: Stat | None, paper: float | None) -> str:
    return MISSING if ours is None or paper is None else f"{ours.mean - paper:+.1f}"


def fmt_paper(x: float | None) -> str:
    return MISSING if x is None else f"{x:.1f}"


def fmt_values(values: set) -> str:
    """The distinct λ (or s) values some runs used; a run that recorded none adds a "—"."""
    if not values:
        return MISSING
    return " / ".join(fmt_sci(v) for v in sorted(values, key=lambda v: (v is None, v or 0.0)))


# ---------------------------------------------------------------- Tables 1 and 3


@dataclass
class Benchmark:
    name: str  # "table1" | "table3": also the results/paper file holding the paper's rows
    columns: list[str]
    extract: Extract
    sparsity_source: str
    trivial: Callable[[dict[str, Any]], dict[str, float]]  # column -> the run's trivial score (percent)
    trivial_source: str  # how the runs computed it, for the notes
    paper_s: float | None = None  # the gate scale s the paper used (App. A.4); runs at another s are calibrated
    # the sparsity (percent) a calibrated row aims for; a column whose paper-setting runs already land in it
    # needs no calibration, and those runs stand in its calibrated row
    calibration_range: tuple[float, float] | None = None


def glue_extract(columns: list[str]) -> Extract:
    def extract(run):
        task = short_key(run.get("task", ""))
        if task not in columns:
            return {}
        overall = (run.get("sparsity") or {}).get("overall")
        return {task: (run.get("score"), None if overall is None else 100 * overall)}

    return extract


def glue_trivial(run: dict[str, Any]) -> dict[str, float]:
    value = run.get("trivial_score")
    return {} if value is None else {short_key(run.get("task", "")): value}


def csr_extract(run: dict[str, Any]) -> dict[str, tuple[float | None, float | None]]:
    metrics = run.get("metrics") or {}
    per_dataset = (run.get("sparsity") or {}).get("per_dataset") or {}
    out: dict[str, list] = {}
    for name, value in metrics.items():
        if short_key(name) in CSR_ALIASES and value is not None:
            out.setdefault(CSR_ALIASES[short_key(name)], [None, None])[0] = 100 * value
    for name, value in per_dataset.items():
        if short_key(name) in CSR_ALIASES and value is not None:
            out.setdefault(CSR_ALIASES[short_key(name)], [None, None])[1] = 100 * value
    return {col: (sc, sp) for col, (sc, sp) in out.items()}


def csr_trivial(run: dict[str, Any]) -> dict[str, float]:
    per_dataset = run.get("trivial_score") or {}
    return {CSR_ALIASES[short_key(k)]: v for k, v in per_dataset.items() if short_key(k) in CSR_ALIASES}


def benchmark_report(bench: Benchmark, runs: list[dict[str, Any]], header: list[str]) -> Report:
    paper = load_paper(bench.name)
    cols = bench.columns
    full = cols == paper["columns"]
    hyper_col = bench.name == "table1"  # Table 1 prints λ/s in a column, Table 3 in per-task rows
    head = ["Method", "Row"] + (["λ / s"] if hyper_col else []) + [paper["column_labels"][c] for c in cols] + ["Avg"]
    blank = [""] if hyper_col else []
    table_no = paper["source"]["table"]
    rows, starts, notes = [], [0], [bench.trivial_source]
    trivial = _trivial_row(bench, runs)
    rows.append(trivial[:2] + blank + trivial[2:])
    dense_scores: dict[str, dict[str, dict[Any, float]]] = {}
    for method, pm in paper["methods"].items():
        ts = "sparsity" in pm
        at_paper_lambda, calibrated = _split_by_lambda([r for r in runs if r.get("method") == method], pm, bench, ts)
        data = gather(at_paper_lambda, bench.extract, ts)
        if not ts:
            dense_scores[method] = data.score
        starts.append(len(rows))
        quantities = [("score", data.score, pm["score"])] + (
            [("sparsity %", data.sparsity, pm["sparsity"])] if ts else []
        )
        for qname, values, paper_row in quantities:
            ours = {c: seed_stat(list(values[c].values())) if values.get(c) else None for c in cols}
            ours_avg = average_stat(values, cols)
            paper_vals = {c: paper_row[c] for c in cols}
            paper_avg = paper_row["avg"] if full else sum(paper_vals.values()) / len(cols)
            paper_avg_txt = fmt_paper(paper_avg) + ("" if full else PAPER_DERIVED)
            ours_cells = [CONFLICT if c in data.conflicts else fmt_stat(ours[c]) for c in cols] + [fmt_stat(ours_avg)]
            hyper = (blank, blank, blank)
            if hyper_col and qname == "score":  # λ and s once per method, on its score rows
                hyper = ([_ours_hyper(data, ts)], [_paper_hyper(pm)], [""])
            first = pm["label"] if qname == "score" else ""
            rows.append([first, f"{qname} — ours"] + hyper[0] + ours_cells)
            rows.append(
                ["", f"{qname} — paper (Table {table_no})"]
                + hyper[1]
                + [fmt_paper(paper_vals[c]) for c in cols]
                + [paper_avg_txt]
            )
            rows.append(
                ["", f"{qname} — Δ ours − paper"]
                + hyper[2]
                + [fmt_diff(ours[c], paper_vals[c]) for c in cols]
                + [fmt_diff(ours_avg, paper_avg)]
            )
        if ts:
            rows.append(["", _paired_label(method, paper)] + blank + _paired_cells(data, dense_scores, method, cols))
        if ts and not hyper_col:
            rows.append(["", "λ — ours"] + [fmt_values(data.lambdas.get(c, set())) for c in cols] + [""])
            rows.append(["", f"λ — paper (Table {table_no})"] + [fmt_sci(pm["lambda"][c]) for c in cols] + [""])
        notes += _conflict_notes(pm["label"], data.conflicts, paper["column_labels"])
        calibrated, sweep_points = _calibrated_choice(calibrated, bench)
        notes += [f"{pm['label']} (calibrated λ): left out as sweep points, {point}" for point in sweep_points]
        if calibrated:
            calibrated, in_range = _already_in_range(calibrated, data, at_paper_lambda, bench)
            notes += [f"{pm['label']} (calibrated λ) / {paper['column_labels'][c]}: {why}" for c, why in in_range]
        cal = gather(calibrated, bench.extract, ts)
        if calibrated:
            starts.append(len(rows))
            rows += _calibrated_rows(cal, dense_scores, method, paper, cols, hyper_col)
            notes += _conflict_notes(f"{pm['label']} (calibrated λ)", cal.conflicts, paper["column_labels"])
        if ts:
            s_values = data.s_values | cal.s_values
            notes.append(f"{pm['label']}: gate scale s in the runs' config.sparsity.s: {fmt_values(s_values)}.")
    notes.append(
        "TS − dense, paired: per seed, the TS run's score minus the dense run's with the same seed (same data "
        "order and initialisation), averaged over the n seeds both ran; [lo, hi] is the two-sided 95 % "
        "Student-t interval of that mean. An interval that contains 0 means the difference is within seed noise."
    )
    if any(row[0].endswith("(calibrated λ)") for row in rows):
        notes.append(
            "(calibrated λ): runs of the TS method at a λ or gate scale s other than the paper's for that column, "
            "chosen by a sweep so that sparsity falls in the paper's range (see docs/small-scale.md); their λ and s "
            "rows say which. A column whose paper-setting runs already land in that range shows those (see the notes)."
        )
    if not full:
        notes.append(
            f"{PAPER_DERIVED} Paper Avg over the columns shown: the mean of the paper's printed per-task "
            f"numbers for these {len(cols)} tasks, computed by tsft (the paper prints only the "
            f"{len(paper['columns'])}-task average)."
        )
    notes.append(f"Sparsity % = {bench.sparsity_source} × 100.")
    notes += [f"Paper note ({paper['source']['caption'].split(':')[0]}): {n}" for n in paper.get("notes", [])]
    return Report(
        title=f"{paper['source']['caption'].split(':')[0]} reproduction — {paper['source']['benchmark']}",
        header=header + _legend(paper) + [SPARSITY_DEFINITION],
        grids=[Grid(f"{paper['source']['benchmark']}: ours vs. paper", head, rows, starts)],
        notes=notes,
    )


def _trivial_row(bench: Benchmark, runs: list[dict[str, Any]]) -> list[str]:
    """The chance line: the score of the best constant prediction on the evaluated labels, as the runs
    recorded it. Runs that evaluated different examples may disagree: then every value is listed."""
    seen: dict[str, set[float]] = defaultdict(set)
    for run in runs:
        for col, value in bench.trivial(run).items():
            if col in bench.columns:
                seen[col].add(round(value, 4))
    cells = [" / ".join(f"{v:.1f}" for v in sorted(seen[c])) if seen.get(c) else MISSING for c in bench.columns]
    single = [next(iter(seen[c])) for c in bench.columns if len(seen.get(c, ())) == 1]
    avg = fmt_paper(sum(single) / len(single)) if len(single) == len(bench.columns) else MISSING
    return ["Trivial baseline", "majority class / constant"] + cells + [avg]


def _split_by_lambda(runs, pm, bench: Benchmark, ts: bool) -> tuple[list, list]:
    """TS runs at the paper's λ for their column, and the others (calibrated λ). Dense runs: all, none."""
    if not ts:
        return runs, []
    at_paper, other = [], []
    for run in runs:
        paper_lambda = pm["lambda"]
        if isinstance(paper_lambda, dict):  # Table 3: per task; a GLUE run covers one column
            columns = list(bench.extract(run))
            paper_lambda = paper_lambda.get(columns[0]) if columns else None
        lam = run.get("lambda")
        same = lam is not None and paper_lambda is not None and math.isclose(lam, paper_lambda, rel_tol=1e-9)
        (at_paper if (same and _is_paper_s(gate_scale(run), bench)) or lam is None else other).append(run)
    return at_paper, other


def _calibrated_choice(runs: list[dict[str, Any]], bench: Benchmark) -> tuple[list[dict[str, Any]], list[str]]:
    """Per column, the calibrated runs of the λ run with the most seeds (the chosen λ of a sweep); the other λ of
    that column are its sweep points (one seed each, typically), named in the notes and left out. When two λ
    have the most seeds, no choice is made: all stay, and the cell is flagged as several λ."""
    by_column: dict[str, dict[tuple, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for column in bench.extract(run):
            by_column[column][(run.get("lambda"), gate_scale(run))].append(run)
    kept, points = [], []
    for column, by_setting in sorted(by_column.items()):
        seeds = {setting: len({r.get("seed") for r in rs}) for setting, rs in by_setting.items()}
        most = max(seeds.values())
        chosen = [setting for setting, n in seeds.items() if n == most]
        if len(chosen) > 1:
            chosen = list(by_setting)
        varied_s = len({s for _, s in by_setting}) > 1 or any(not _is_paper_s(s, bench) for _, s in by_setting)
        for (lam, s), rs in by_setting.items():
            if (lam, s) in chosen:
                kept += [r for r in rs if r not in kept]
            else:
                at = f"λ {fmt_sci(lam)}" + (f", s {fmt_sci(s)}" if varied_s and s is not None else "")
                points.append(f"{column} {at} ({seeds[(lam, s)]} seed{'s' if seeds[(lam, s)] > 1 else ''})")
    return kept, points


def _already_in_range(calibrated, data: MethodData, at_paper, bench: Benchmark) -> tuple[list, list[tuple[str, str]]]:
    """Columns without calibrated runs whose paper-setting runs' mean sparsity is already in
    ``bench.calibration_range``: those runs fill the calibrated row there (nothing to calibrate)."""
    if bench.calibration_range is None:
        return calibrated, []
    low, high = bench.calibration_range
    covered = {c for run in calibrated for c in bench.extract(run)}
    added, reasons = list(calibrated), []
    for column in bench.columns:
        sparsities = list(data.sparsity.get(column, {}).values())
        if column in covered or not sparsities:
            continue
        mean = sum(sparsities) / len(sparsities)
        if low <= mean <= high:
            added += [run for run in at_paper if column in bench.extract(run)]
            reasons.append((column, f"the paper's λ and s already give {mean:.1f} % sparsity (in {low:g}–{high:g} %)"))
    return added, reasons


def _is_paper_s(s: float | None, bench: Benchmark) -> bool:
    return bench.paper_s is None or s is None or math.isclose(float(s), bench.paper_s, rel_tol=1e-9)


def _paired_label(method: str, paper: dict[str, Any]) -> str:
    dense = method.removeprefix("ts-")
    return f"score — TS − {paper['methods'][dense]['label']}, paired (95 % CI)"


def _paired_cells(data: MethodData, dense_scores, method: str, cols: list[str]) -> list[str]:
    dense = dense_scores.get(method.removeprefix("ts-"), {})
    cells = [
        CONFLICT if c in data.conflicts else fmt_paired(paired_diff(data.score.get(c, {}), dense.get(c, {})))
        for c in cols
    ]
    avg = paired_diff(per_seed_average(data.score, cols), per_seed_average(dense, cols))
    return cells + [fmt_paired(avg)]


def _calibrated_rows(data: MethodData, dense_scores, method, paper, cols, hyper_col: bool) -> list[list[str]]:
    label = f"{paper['methods'][method]['label']} (calibrated λ)"
    blank = [""] if hyper_col else []
    rows = []
    for i, (qname, values) in enumerate((("score", data.score), ("sparsity %", data.sparsity))):
        cells = [
            CONFLICT
            if c in data.conflicts
            else fmt_stat(seed_stat(list(values[c].values())))
            if values.get(c)
            else MISSING
            for c in cols
        ]
        hyper = [_ours_hyper(data, True)] if hyper_col and i == 0 else blank
        rows.append(
            [label if i == 0 else "", f"{qname} — ours"] + hyper + cells + [fmt_stat(average_stat(values, cols))]
        )
    rows.append(["", _paired_label(method, paper)] + blank + _paired_cells(data, dense_scores, method, cols))
    if not hyper_col:
        rows.append(["", "λ — ours"] + [fmt_values(data.lambdas.get(c, set())) for c in cols] + [""])
        if any(data.s_by_column.get(c) for c in cols):
            rows.append(["", "s — ours"] + [fmt_values(data.s_by_column.get(c, set())) for c in cols] + [""])
    return rows


def _conflict_notes(label: str, conflicts: dict[str, str], column_labels: dict[str, str]) -> list[str]:
    """One note per distinct problem (a CSR run spans all columns, so its problem repeats in each)."""
    columns_by_problem: dict[str, list[str]] = defaultdict(list)
    for col, problem in conflicts.items():
        columns_by_problem[problem].append(column_labels[col])
    return [f"{label} / {', '.join(cols)}: {CONFLICT} not aggregated, {p}" for p, cols in columns_by_problem.items()]


def _run_level_sparsity_notes(runs: list[dict[str, Any]], methods: dict[str, Any]) -> list[str]:
    """CSR runs without per-dataset sparsity still report one overall figure; show it, outside the grid,
    since the paper's Sparsity rows are per dataset."""
    notes = []
    for method, pm in methods.items():
        values = [
            100 * r["sparsity"]["overall"]
            for r in runs
            if r.get("method") == method and (r.get("sparsity") or {}).get("overall") is not None
        ]
        if "sparsity" in pm and values:
            notes.append(f"{pm['label']}: run-level `sparsity.overall` × 100 = {fmt_stat(seed_stat(values))}.")
    return notes


def method_label(method: str) -> str:
    """The paper's spelling of a method key (ts-adalora -> TS-AdaLoRA)."""
    for table in ("table1", "table3"):
        if method in load_paper(table)["methods"]:
            return load_paper(table)["methods"][method]["label"]
    return method


def _ours_hyper(data: MethodData, ts: bool) -> str:
    if not ts:
        return ""
    lambdas = set().union(*data.lambdas.values()) if data.lambdas else set()
    return f"λ={fmt_values(lambdas)}, s={fmt_values(data.s_values)}"


def _paper_hyper(pm: dict[str, Any]) -> str:
    return ", ".join(f"{'λ' if k == 'lambda' else 's'}={fmt_sci(pm[k])}" for k in ("lambda", "s") if k in pm)


def _legend(paper: dict[str, Any]) -> list[str]:
    src = paper["source"]
    return [
        f"Paper rows: {src['caption'].split(':')[0]} of {src['paper']} ({src['model']}), from "
        f"results/paper/table{src['table']}.json — these are the paper's numbers, not ours.",
        f"Ours: mean ± sample std over seeds (n = seeds); {MISSING} = no run; {CONFLICT} = runs not poolable "
        "(see notes); Avg only when every column has runs; Δ = our mean − paper, before rounding.",
    ]


# ---------------------------------------------------------------- Table 5


def table5_report(runs: list[dict[str, Any]], header: list[str]) -> Report:
    paper = load_paper("table5")
    methods = list(paper["methods"]) + sorted({r["method"] for r in runs if r.get("ts")} - set(paper["methods"]))
    grids, notes = [], []
    for method in methods:
        mruns = [r for r in runs if r.get("method") == method and r.get("ts")]
        per_module, problem = _module_sparsity(mruns)
        if problem:
            notes.append(f"{method_label(method)}: {CONFLICT} not aggregated, {problem}")
            continue
        if not per_module:
            notes.append(f"{method_label(method)}: no runs with per-module sparsity.")
            continue
        layers = sorted({layer for layer, _ in per_module})
        means = {key: seed_stat(list(v.values())).mean for key, v in per_module.items()}
        pm = paper["methods"].get(method)
        beside = pm is not None and layers == paper["layers"]
        grids.append(_table5_grid(method, layers, means, pm if beside else None, paper, len(mruns)))
        if pm is not None and not beside:
            notes.append(
                f"{method_label(method)}: our runs have {len(layers)} layers, the paper's Table 5 has "
                f"{len(paper['layers'])} "
                f"({paper['source']['model']}), so the paper's per-layer columns are not shown. For reference, "
                f"the paper's avg row: "
                + ", ".join(f"{k} {fmt_paper(pm['avg_row'][k])}" for k in QKV)
                + f"; std over modules (Section 4.3 text): {paper['text_stats']['std'][method]}."
            )
    notes.append(
        "Sparsity % = module `sparsity` × 100, mean over seeds; avg = mean over the q/k/v modules present in the "
        "layer (a module absent from the runs, e.g. rank 0, shows — as the paper's '-'); the avg row is the "
        "mean over layers; 'std over modules' is the population std over all q/k/v module values, the "
        "definition under which the paper's Table 5 gives Section 4.3's 11.4 and 41.3 (and 9.57 for the "
        "text's 9.8; see results/paper/table5.json)."
    )
    notes += [f"Paper note (Table 5): {n}" for n in paper.get("notes", [])]
    return Report(
        title="Table 5 reproduction — module-wise token sparsity (%) on commonsense reasoning",
        header=header + _legend(paper)[:1] + [SPARSITY_DEFINITION],
        grids=grids,
        notes=notes,
    )


def _module_sparsity(runs: list[dict[str, Any]]) -> tuple[dict[tuple[int, str], dict[Any, float]], str | None]:
    lambdas = {r.get("lambda") for r in runs}
    if len(lambdas) > 1:
        return {}, "runs with several λ: " + fmt_values(lambdas)
    seeds = [r.get("seed") for r in runs]
    if len(seeds) != len(set(seeds)):
        return {}, "the same seed appears in several runs: " + ", ".join(r["_path"] for r in runs)
    out: dict[tuple[int, str], dict[Any, float]] = defaultdict(dict)
    for run in runs:
        for module in (run.get("sparsity") or {}).get("modules") or []:
            if module.get("kind") in QKV and module.get("layer") is not None and module.get("sparsity") is not None:
                out[(int(module["layer"]), module["kind"])][run.get("seed")] = 100 * module["sparsity"]
    return out, None


def _table5_grid(method, layers, means, pm, paper, n_runs) -> Grid:
    def layer_avg(values):
        present = [v for v in values if v is not None]
        return sum(present) / len(present) if present else None

    head = ["Layer"] + [f"{k} (ours)" for k in QKV] + ["avg (ours)"]
    if pm:
        head += [f"{k} (paper)" for k in QKV] + ["avg (paper)"]
    rows, ours_avgs = [], []
    for i, layer in enumerate(layers):
        ours = [means.get((layer, k)) for k in QKV]
        ours_avgs.append(layer_avg(ours))
        row = [str(layer)] + [fmt_paper(v) for v in ours + [ours_avgs[-1]]]
        if pm:
            row += [fmt_paper(pm["per_layer"][k][i]) for k in (*QKV, "avg")]
        rows.append(row)
    col_means = [layer_avg([means.get((layer, k)) for layer in layers]) for k in QKV]
    row = ["avg"] + [fmt_paper(v) for v in col_means + [layer_avg(ours_avgs)]]
    if pm:
        row += [fmt_paper(pm["avg_row"][k]) for k in (*QKV, "avg")]
    rows.append(row)
    modules = [v for (_, kind), v in means.items() if kind in QKV]
    mean = sum(modules) / len(modules)
    std = (sum((v - mean) ** 2 for v in modules) / len(modules)) ** 0.5
    row = ["std over modules", "", "", "", fmt_paper(std)]
    if pm:
        row += ["", "", "", f"{paper['text_stats']['std'][method]:.1f} (text)"]
    rows.append(row)
    return Grid(f"{method_label(method)} — {n_runs} run(s)", head, rows)


# ---------------------------------------------------------------- entry point


def _study(table: str) -> str:
    """The ``study`` label of the grid a table reads (configs/experiment/table{1,3}_common.yaml)."""
    return "table3" if table == "table3" else "table1"


def _family(table: str) -> str:
    return "glue" if table == "table3" else "csr"


def _scale_group(table: str) -> Callable[[dict[str, Any]], str]:
    """GLUE scales legitimately differ per task (dataset sizes); CSR runs share one dataset mix."""
    if table == "table3":
        return lambda run: short_key(run.get("task", ""))
    return lambda run: str(run.get("method"))


def build_report(table: str, runs_dir: Path, preset: str) -> Report:
    all_runs, unreadable = load_runs(runs_dir)
    runs = [
        r
        for r in all_runs
        if r.get("family") == _family(table)
        and r.get("preset") == preset
        and r.get("study") in (None, _study(table))  # not the analyses' runs (module subsets, traced ablations)
    ]
    header = provenance(runs, runs_dir, preset, unreadable) + scale_summary(runs, _scale_group(table))
    if table == "table1":
        evals = sorted({json.dumps(r.get("eval"), sort_keys=True) for r in runs})
        header.append("CSR evaluation (runs' `eval` field): " + (" | ".join(evals) or MISSING))
    if table == "table3":
        tasks = GLUE_TASKS.get(preset, GLUE_TASKS["paper"])
        bench = Benchmark(
            "table3",
            tasks,
            glue_extract(tasks),
            "the run's `sparsity.overall`",
            glue_trivial,
            GLUE_TRIVIAL_SOURCE,
            paper_s=PAPER_S_NLU,
            calibration_range=GLUE_CALIBRATION_RANGE,
        )
        return benchmark_report(bench, runs, header)
    if table == "table1":
        bench = Benchmark(
            "table1",
            load_paper("table1")["columns"],
            csr_extract,
            "the run's `sparsity.per_dataset[<dataset>]`",
            csr_trivial,
            CSR_TRIVIAL_SOURCE,
        )
        report = benchmark_report(bench, runs, header)
        report.notes += _run_level_sparsity_notes(runs, load_paper("table1")["methods"])
        return report
    if table == "table5":
        return table5_report(runs, header)
    raise ValueError(f"unknown table {table!r}; expected table1, table3 or table5")


def make_table(table: str, runs_dir: Path, preset: str, out_dir: Path) -> list[Path]:
    stem = table if preset == "paper" else f"{table}_{preset}"
    return write_report(build_report(table, runs_dir, preset), out_dir, stem)
