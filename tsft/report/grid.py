"""Resumable grids: find the finished run of a configuration so a re-started sweep can skip it.

A grid config (configs/experiment/table3_*.yaml) sets a deterministic ``run_name`` from the
method, model, λ, seed and preset. The pipeline stores each run in
``<results_dir>/runs/<task>/<run_name>-<YYYYmmdd-HHMMSS>[-<hex>]`` (tsft.paths.create_run_dir), and
writes result.json last and atomically, so a directory holding one is a finished run; a crashed run
leaves none and is run again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tsft import paths
from tsft.errors import InputError

# The suffix tsft.paths.create_run_dir appends to the run name: a timestamp, plus 4 hex digits on a clash;
# or, for a run of several externally launched processes, the launch's id (tsft.launch.launch_run_dir).
_RUN_DIR_SUFFIX = re.compile(r"-(\d{8}-\d{6}(-[0-9a-f]{4})?|launch-[A-Za-z0-9_.-]+)")


def is_run_dir_of(run_name: str, dir_name: str) -> bool:
    """Whether ``dir_name`` is the directory of a run named ``run_name`` (not of a longer name it prefixes)."""
    return dir_name.startswith(run_name) and _RUN_DIR_SUFFIX.fullmatch(dir_name[len(run_name) :]) is not None


def finished_result(cfg: DictConfig, check_config: bool = True) -> Path | None:
    """result.json of a finished run with this cfg's task and run_name, or None.

    Without an explicit run_name there is no stable identity to match, so nothing is ever skipped.
    ``check_config``: refuse (InputError) a finished run of that name whose settings differ from ``cfg``'s.
    """
    run_name = cfg.get("run_name")
    if not run_name:
        return None
    task_dir = paths.task_runs_dir(cfg.paths, cfg.task.name)
    if not task_dir.is_dir():
        return None
    for run_dir in sorted(task_dir.iterdir()):
        if is_run_dir_of(run_name, run_dir.name):
            result = run_dir / paths.RESULT_FILENAME
            if result.is_file():
                if check_config:
                    _check_same_configuration(cfg, result)
                return result
    return None


def result_exists(cfg: DictConfig) -> bool:
    return finished_result(cfg) is not None


# The groups that decide what a run computes; the rest (paths, loggers, lookup tables such as table3.*,
# the preset and study labels) may change without making a finished run another configuration.
DEFINING_GROUPS = ("model", "peft", "task", "sparsity", "selection", "trainer", "optim", "seed")
# ... and the keys inside them that only change how a run reports
NOT_PART_OF_A_RUN = ("trainer.enable_progress_bar", "trainer.log_every_n_steps", "sparsity.trace_tau")


def _check_same_configuration(cfg: DictConfig, result_path: Path) -> None:
    """A finished run is only reused for the configuration it ran: a grid whose settings changed since (a
    new preset, another lr) must not pick up results of the old one under the same run name. Settings one
    side did not record (a version before the key existed) are not compared."""
    try:
        stored = json.loads(result_path.read_text()).get("config")
    except (OSError, ValueError):
        stored = None
    if not isinstance(stored, dict):
        return  # a result without its config (written by hand or by an old version): nothing to compare
    current = OmegaConf.to_container(cfg, resolve=True)
    differences = _differences(_defining(stored), _defining(current))
    if differences:
        key, old, new = differences[0]
        more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
        raise InputError(
            f"{result_path.parent} is a finished run named {cfg.run_name} with other settings: {key} was {old!r}, "
            f"now {new!r}{more}; move that run away, or give this configuration another run_name"
        )


def _defining(config: dict[str, Any]) -> dict[str, Any]:
    kept = json.loads(json.dumps({key: config[key] for key in DEFINING_GROUPS if key in config}))  # a deep copy
    for dotted in NOT_PART_OF_A_RUN:
        group, _, leaf = dotted.partition(".")
        if isinstance(kept.get(group), dict):
            kept[group].pop(leaf, None)
    return kept


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) of the leaves both sides hold and disagree on."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) & set(new), key=str):
            found += _differences(old[key], new[key], f"{prefix}{key}.")
        return found
    return [] if old == new else [(prefix.rstrip("."), old, new)]
