"""Resumable grids: find the finished run of a configuration so a re-started sweep can skip it.

A grid config (configs/experiment/table3_*.yaml) sets a deterministic ``run_name`` from the
method, model, λ, seed and preset. The pipeline stores each run in
``<results_dir>/runs/<task>/<run_name>-<YYYYmmdd-HHMMSS>[-<hex>]`` (tsft.paths.create_run_dir), and
writes result.json last and atomically, so a directory holding one is a finished run; a crashed run
leaves none and is run again.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig

from tsft import paths

# The suffix tsft.paths.create_run_dir appends to the run name: a timestamp, plus 4 hex digits on a clash.
_RUN_DIR_SUFFIX = re.compile(r"-\d{8}-\d{6}(-[0-9a-f]{4})?")


def finished_result(cfg: DictConfig) -> Path | None:
    """result.json of a finished run with this cfg's task and run_name, or None.

    Without an explicit run_name there is no stable identity to match, so nothing is ever skipped.
    """
    run_name = cfg.get("run_name")
    if not run_name:
        return None
    task_dir = paths.task_runs_dir(cfg.paths, cfg.task.name)
    if not task_dir.is_dir():
        return None
    for run_dir in sorted(task_dir.iterdir()):
        suffix = run_dir.name[len(run_name) :]
        if run_dir.name.startswith(run_name) and _RUN_DIR_SUFFIX.fullmatch(suffix):
            result = run_dir / paths.RESULT_FILENAME
            if result.is_file():
                return result
    return None


def result_exists(cfg: DictConfig) -> bool:
    return finished_result(cfg) is not None
