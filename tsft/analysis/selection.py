"""Module selection from a finished TS run (Table 4, Figure 2): which modules a dense run adapts.

A TS run's result.json lists, per gated module, its evaluation sparsity, mean relative and absolute update
norm and trainable weights (tsft.gate.report). A rule ranks those modules and keeps a share ``p`` of them;
the kept names become the PEFT target list of the new run. Rules (Table 4's rows):

    all            every module of the task's target list (the full-module reference; no source needed)
    s_low          the lowest evaluation sparsity first (the modules whose tokens the gate used most)
    s_high         the highest sparsity first
    norm_relative  the largest mean ||M(x_i)|| / ||W0 x_i|| first
    norm_abs       the largest mean ||M(x_i)|| first
    random         a seeded uniform draw (``selection.draw``; Table 4 averages three draws)
    half_rank      every module at half the rank: the parameter budget of p = 50 % without choosing modules

Ties keep the source's module order (the model's), so a selection is reproducible. ``p`` of ``n`` modules
keeps ``round(p * n)`` of them with halves rounded up, at least one.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from tsft.errors import InputError

RULES = ("all", "s_low", "s_high", "norm_relative", "norm_abs", "random", "half_rank")
# rule -> (module statistic, largest first?)
RANKED_BY = {
    "s_low": ("sparsity", False),
    "s_high": ("sparsity", True),
    "norm_relative": ("mean_relative_norm", True),
    "norm_abs": ("mean_norm", True),
}
# peft wraps the backbone as base_model.model; its target_modules name modules inside the backbone
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class ModuleStats:
    """One gated module of the source run (a row of result.json's ``sparsity.modules``)."""

    name: str  # the module's name inside the backbone, as peft's target_modules takes it
    sparsity: Optional[float]
    mean_relative_norm: Optional[float]
    mean_norm: Optional[float]
    trainable_params: Optional[int]


def selection_count(n: int, p: float) -> int:
    """Modules kept of ``n`` at share ``p``: round(p n), halves up (5 of 9 at 0.5), at least 1."""
    if not 0 < p <= 1:
        raise InputError(f"selection.p must lie in (0, 1] (got {p}); e.g. selection.p=0.5")
    return max(1, min(n, math.floor(p * n + 0.5)))


def source_result(source: str, cfg: DictConfig) -> Path:
    """result.json of ``selection.source``: a path (a run directory or its result.json), or the run name of a
    finished run of this task under the results directory (what the analysis grids use: names are stable,
    directories carry a timestamp)."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "result.json"
    if path.is_file():
        return path
    if "/" not in source:
        from tsft.report.grid import finished_result

        found = finished_result(OmegaConf.merge(cfg, {"run_name": source}), check_config=False)
        if found is not None:
            return found
        raise InputError(
            f"selection.source '{source}' is no finished run of {cfg.task.name} under {cfg.paths.results_dir}: "
            "train that TS run first (the make targets of the analyses do), or give its directory"
        )
    raise InputError(f"selection.source {source} is not a result.json or a run directory that has one")


def read_source(path: str | Path, model: Optional[str] = None) -> list[ModuleStats]:
    """The per-module statistics of a TS run from its result.json (or run directory); given ``model``, the
    source must have trained that model (module names are the model's)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "result.json"
    if not path.is_file():
        raise InputError(f"selection.source {path} is not a result.json or a run directory that has one")
    try:
        result = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"selection.source {path} is not a readable result.json ({error})") from None
    if model is not None and result.get("model") != model:
        raise InputError(
            f"selection.source {path} trained model '{result.get('model')}', this run model '{model}'; "
            "select from a run of the same model"
        )
    modules = (result.get("sparsity") or {}).get("modules") or []
    if not modules:
        raise InputError(
            f"selection.source {path} has no per-module sparsity: point it at a TS run (sparsity=ts), e.g. ts-dora"
        )
    return [
        ModuleStats(
            name=m["name"].removeprefix(PEFT_PREFIX),
            sparsity=m.get("sparsity"),
            mean_relative_norm=m.get("mean_relative_norm"),
            mean_norm=m.get("mean_norm"),
            trainable_params=m.get("trainable_params"),
        )
        for m in modules
    ]


def select_modules(modules: list[ModuleStats], rule: str, p: float, draw: int = 0) -> list[ModuleStats]:
    """The modules ``rule`` keeps at share ``p``, in the source's module order."""
    if rule not in RULES:
        raise InputError(f"selection.rule '{rule}' is not one of {', '.join(RULES)}")
    if rule in ("all", "half_rank"):
        return list(modules)
    k = selection_count(len(modules), p)
    if rule == "random":
        chosen = set(random.Random(draw).sample(range(len(modules)), k))
    else:
        stat, largest_first = RANKED_BY[rule]
        missing = [m.name for m in modules if getattr(m, stat) is None]
        if missing:
            raise InputError(
                f"selection.rule={rule} ranks by {stat}, which the source lacks for {len(missing)} modules "
                f"(e.g. {missing[0]}); use a source run of this version that evaluated its gates"
            )
        # sorted() is stable: equal values keep the model's order, also when sorting by -value for largest first
        sign = -1.0 if largest_first else 1.0
        order = sorted(range(len(modules)), key=lambda i: sign * getattr(modules[i], stat))
        chosen = set(order[:k])
    return [m for i, m in enumerate(modules) if i in chosen]


def half(rank: int) -> int:
    return max(1, rank // 2)


def apply_selection(cfg: DictConfig) -> Optional[dict[str, Any]]:
    """Turn ``cfg.selection`` into the run's PEFT targets (or halved ranks); return what result.json records
    (None for rule ``all`` without a source: an ordinary run)."""
    sel = cfg.get("selection")
    if sel is None or (sel.rule == "all" and not sel.source):
        return None
    if sel.rule not in RULES:
        raise InputError(f"selection.rule '{sel.rule}' is not one of {', '.join(RULES)}")
    if sel.rule == "all":  # the full-module reference of an analysis grid: its targets as configured
        return {"rule": "all", "p": 1.0, "source": None}
    record: dict[str, Any] = {"rule": sel.rule, "p": sel.p, "source": sel.source}
    if sel.rule == "half_rank":
        with open_dict(cfg):
            if cfg.peft.name == "adalora":
                cfg.peft.init_r, cfg.peft.target_r = half(cfg.peft.init_r), half(cfg.peft.target_r)
            else:
                cfg.peft.r = half(cfg.peft.r)
        record["rank"] = cfg.peft.get("target_r", cfg.peft.get("r"))
        return record
    if not sel.source:
        raise InputError(f"selection.rule={sel.rule} needs a source run: selection.source=<TS run dir or result.json>")
    path = source_result(str(sel.source), cfg)
    kept = select_modules(read_source(path, cfg.model.name), sel.rule, sel.p, sel.draw)
    with open_dict(cfg):
        cfg.peft.target_modules = [m.name for m in kept]
    record.update(source=str(path), draw=sel.draw if sel.rule == "random" else None, modules=[m.name for m in kept])
    return record
