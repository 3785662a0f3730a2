"""Reading a grid's result.json files and summarising them (seed statistics, scale, provenance).

Everything here reports only what the runs wrote: a value a run did not produce stays None and is
rendered as missing by the tables, never as zero.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy.stats import t

SCALE_FIELDS = ("model", "train_examples", "max_steps", "epochs", "max_length", "eval_examples")


@dataclass(frozen=True)
class Stat:
    """Mean ± sample std over seeds. std is None for a single seed; n is None when the average
    combines tasks run with different seed sets (then no std over seeds exists)."""

    mean: float
    std: float | None
    n: int | None


def gate_scale(run: dict[str, Any]) -> float | None:
    """The run's sparsity.s (Eq. 10's surrogate scale, which also bounds tau's step: docs/small-scale.md)."""
    return ((run.get("config") or {}).get("sparsity") or {}).get("s")


def load_runs(runs_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """All result.json files below runs_dir, and a list of files that could not be read."""
    runs, unreadable = [], []
    for path in sorted(Path(runs_dir).rglob("result.json")):
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            unreadable.append(f"{path}: {err}")
            continue
        run["_path"] = str(path)
        runs.append(run)
    return runs, unreadable


def short_key(name: str) -> str:
    """'glue/SST-2' -> 'sst2', 'ARC-Easy' -> 'arceasy': one spelling for names the runs and the paper share."""
    return re.sub(r"[^a-z0-9]", "", name.rsplit("/", 1)[-1].lower())


def seed_stat(values: list[float]) -> Stat:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Stat(mean, std, n)


@dataclass(frozen=True)
class PairedDiff:
    """Mean of per-seed differences (treated − control) over the n seeds both ran, with the half-width
    of its two-sided 95 % Student-t interval (None below two pairs)."""

    mean: float
    half_width: float | None
    n: int


def paired_diff(treated: dict[Any, float], control: dict[Any, float], confidence: float = 0.95) -> PairedDiff | None:
    """Seeds pair the runs: the same seed gives the same data order and initialisation to both methods,
    so the per-seed difference removes the noise the two share. None when no seed ran both."""
    seeds = sorted(set(treated) & set(control), key=str)
    if not seeds:
        return None
    diffs = seed_stat([treated[s] - control[s] for s in seeds])
    half = (
        None if diffs.std is None else float(t.ppf((1 + confidence) / 2, diffs.n - 1)) * diffs.std / math.sqrt(diffs.n)
    )
    return PairedDiff(diffs.mean, half, diffs.n)


def per_seed_average(per_column: dict[str, dict[Any, float]], columns: list[str]) -> dict[Any, float]:
    """seed -> mean over columns, for the seeds that every column ran (empty if a column has none)."""
    if any(not per_column.get(c) for c in columns):
        return {}
    seeds = set.intersection(*(set(per_column[c]) for c in columns))
    return {s: sum(per_column[c][s] for c in columns) / len(columns) for s in seeds}


def average_stat(per_column: dict[str, dict[Any, float]], columns: list[str]) -> Stat | None:
    """Unweighted mean over columns of the per-column seed means (how the paper averages).

    None unless every column has at least one run. The std over seeds of the per-seed averages is
    only defined when every column was run with the same seeds.
    """
    if any(not per_column.get(c) for c in columns):
        return None
    mean = sum(seed_stat(list(per_column[c].values())).mean for c in columns) / len(columns)
    seed_sets = {frozenset(per_column[c]) for c in columns}
    if len(seed_sets) != 1:
        return Stat(mean, None, None)
    per_seed = per_seed_average(per_column, columns)
    return Stat(mean, seed_stat(list(per_seed.values())).std, len(per_seed))


def scale_summary(runs: list[dict[str, Any]], group_key) -> list[str]:
    """Lines describing the runs' `scale` fields: shared values once, differing ones per group.

    A group (e.g. a task) whose own runs disagree lists every value seen, so a mixed grid is visible.
    """
    if not runs:
        return ["Scale: no runs found."]
    fields = list(SCALE_FIELDS) + sorted({k for r in runs for k in (r.get("scale") or {})} - set(SCALE_FIELDS))
    values: dict[str, dict[str, set]] = {f: defaultdict(set) for f in fields}
    for run in runs:
        scale = run.get("scale") or {}
        for f in fields:
            values[f][group_key(run)].add(json.dumps(scale.get(f)))
    shared, varying = [], []
    for f in fields:
        seen = set().union(*values[f].values())
        if len(seen) == 1:
            shared.append(f"{f}={_plain(next(iter(seen)))}")
        else:
            per_group = ", ".join(
                f"{g}: {' / '.join(_plain(v) for v in sorted(vs))}" for g, vs in sorted(values[f].items())
            )
            varying.append(f"{f} — {per_group}")
    lines = ["Scale (from the runs' `scale` fields): " + "; ".join(shared)]
    lines += [f"Scale varies: {line}" for line in varying]
    return lines


def provenance(runs: list[dict[str, Any]], runs_dir: Path, preset: str, unreadable: list[str]) -> list[str]:
    commits = ", ".join(sorted({str(r.get("git_commit") or "unknown")[:10] for r in runs})) or "—"
    lines = [f"Preset `{preset}`: {len(runs)} result.json file(s) under `{runs_dir}`; git commit(s): {commits}."]
    lines += [f"Unreadable result file skipped: {u}" for u in unreadable]
    return lines


def _plain(json_value: str) -> str:
    value = json.loads(json_value)
    return "—" if value is None else str(value)
