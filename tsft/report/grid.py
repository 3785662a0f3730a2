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
                _check_same_configuration(cfg, result)
                return result
    return None


# Settings that do not change what a run computes: where files live, how it reports, whether it skips.
NOT_PART_OF_A_RUN = ("paths", "skip_existing", "logger", "trainer.enable_progress_bar", "ckpt_path")


def _check_same_configuration(cfg: DictConfig, result_path: Path) -> None:
    """A finished run is only reused for the configuration it ran: a grid whose settings changed since (a
    new preset, another lr) must not pick up results of the old one under the same run name."""
    try:
        stored = json.loads(result_path.read_text()).get("config")
    except (OSError, ValueError):
        stored = None
    if not isinstance(stored, dict):
        return  # a result without its config (written by hand or by an old version): nothing to compare
    current = OmegaConf.to_container(cfg, resolve=True)
    differences = _differences(_without(stored), _without(current))
    if differences:
        key, old, new = differences[0]
        more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
        raise InputError(
            f"{result_path.parent} is a finished run named {cfg.run_name} with other settings: {key} was {old!r}, "
            f"now {new!r}{more}; move that run away, or give this configuration another run_name"
        )


def _without(config: dict[str, Any]) -> dict[str, Any]:
    config = json.loads(json.dumps(config))  # a deep copy
    for dotted in NOT_PART_OF_A_RUN:
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return config


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def result_exists(cfg: DictConfig) -> bool:
    return finished_result(cfg) is not None
