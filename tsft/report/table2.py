"""Table 2 (visual instruction tuning) from its runs (study ``table2``), the paper's numbers beside ours.

Columns are the paper's seven benchmarks, read from result.json ``benchmarks.<name>.score`` (SQA = ScienceQA-IMG,
VQAT = TextVQA), plus ``held-out`` (the run's score: held-out answer tokens predicted exactly, the only score
when the benchmark images are absent, as at the CPU scale). Benchmarks a run skipped or sent to a server are
listed in the notes with the reason instead of a number. Per method: mean ± std over seeds; per TS method its
sparsity (over the test loop's tokens) and TS − dense paired over seeds with a 95 % interval.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from tsft.report.render import MISSING, Grid, Report, fmt_paired, fmt_stat, write_report
from tsft.report.runs import average_stat, load_runs, paired_diff, provenance, scale_summary, seed_stat
from tsft.report.tables import load_paper

BENCHMARK_OF_COLUMN = {"sqa": "scienceqa", "pope": "pope", "mmbench": "mmbench", "gqa": "gqa", "vizwiz": "vizwiz",
                       "vqav2": "vqav2", "vqat": "textvqa"}  # fmt: skip
HELD_OUT = "held_out"


def _values(run: dict[str, Any], columns: list[str]) -> dict[str, float]:
    benchmarks = run.get("benchmarks") or {}
    out = {}
    for column in columns:
        if column == HELD_OUT:
            value = run.get("score")
        else:
            value = (benchmarks.get(BENCHMARK_OF_COLUMN[column]) or {}).get("score")
        if value is not None:
            out[column] = value
    return out


def table2_report(runs_dir: Path, preset: str) -> Report:
    all_runs, unreadable = load_runs(runs_dir)
    runs = [
        r for r in all_runs if r.get("study") == "table2" and r.get("preset") == preset and r.get("peft") != "heads"
    ]
    paper = load_paper("table2")
    columns = paper["columns"] + [HELD_OUT]
    labels = {**paper["column_labels"], HELD_OUT: "held-out answers (token acc.)"}
    header = provenance(runs, runs_dir, preset, unreadable) + scale_summary(runs, lambda r: str(r.get("method")))
    head = ["Method", "Row"] + [labels[c] for c in columns] + ["Avg (paper's 7)"]
    rows = [_trivial_row(runs, columns)]
    dense: dict[str, dict[str, dict[Any, float]]] = {}
    for method, pm in paper["methods"].items():
        method_runs = [r for r in runs if r.get("method") == method]
        scores: dict[str, dict[Any, float]] = defaultdict(dict)
        sparsity: dict[Any, float] = {}
        for run in method_runs:
            for column, value in _values(run, columns).items():
                scores[column][run.get("seed")] = value
            overall = (run.get("sparsity") or {}).get("overall")
            if overall is not None:
                sparsity[run.get("seed")] = 100 * overall
        cells = [fmt_stat(seed_stat(list(scores[c].values()))) if scores.get(c) else MISSING for c in columns]
        rows.append([pm["label"], "score — ours"] + cells + [fmt_stat(average_stat(scores, paper["columns"]))])
        paper_cells = [f"{pm['score'][c]:.1f}" for c in paper["columns"]] + [MISSING]
        rows.append(["", "score — paper (Table 2)"] + paper_cells + [f"{pm['score']['avg']:.1f}"])
        if "sparsity" not in pm:
            dense[method] = scores
            continue
        lam = sorted({r.get("lambda") for r in method_runs if r.get("lambda") is not None})
        spars = fmt_stat(seed_stat(list(sparsity.values()))) if sparsity else MISSING
        label = f"sparsity % — ours (λ {', '.join(map(str, lam)) or MISSING})"
        rows.append(["", label] + [MISSING] * (len(columns) - 1) + [spars, ""])
        base = dense.get(method.removeprefix("ts-"), {})
        paired = [fmt_paired(paired_diff(scores.get(c, {}), base.get(c, {}))) for c in columns]
        dense_label = paper["methods"][method.removeprefix("ts-")]["label"]
        rows.append(["", f"score — TS − {dense_label}, paired (95 % CI)"] + paired + [""])
    notes = [
        "held-out: the share of held-out answer tokens the model predicts exactly (teacher-forced), in percent; "
        "the trivial row is always predicting the most common answer token. TS sparsity is measured over all "
        "tokens of the test loop (held-out conversations and generated benchmark answers), shown under held-out.",
    ]
    notes += _skip_notes(runs)
    return Report(
        f"Table 2 (preset {preset})", header, [Grid("Table 2 — visual instruction tuning", head, rows)], notes
    )


def _trivial_row(runs: list[dict[str, Any]], columns: list[str]) -> list[str]:
    seen = sorted({round(r["trivial_score"], 1) for r in runs if r.get("trivial_score") is not None})
    cell = " / ".join(f"{v:.1f}" for v in seen) if seen else MISSING
    return ["Trivial baseline", "most common answer token"] + [MISSING] * (len(columns) - 1) + [cell, ""]


def _skip_notes(runs: list[dict[str, Any]]) -> list[str]:
    reasons: dict[str, set[str]] = defaultdict(set)
    for run in runs:
        for name, result in (run.get("benchmarks") or {}).items():
            if "skipped" in result:
                reasons[name].add(result["skipped"])
            elif "submission" in result:
                reasons[name].add(f"answers on the evaluation server: submission file {result['submission']}")
    return [f"{name}: not scored here — {'; '.join(sorted(r))}" for name, r in sorted(reasons.items())]


def make_table2(runs_dir: Path, preset: str, out_dir: Path) -> list[Path]:
    stem = "table2" if preset == "paper" else f"table2_{preset}"
    return write_report(table2_report(runs_dir, preset), out_dir, stem)
