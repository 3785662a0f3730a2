"""Where a run reads data and writes results (configs/paths)."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tsft.errors import InputError

RUNS_SUBDIR = "runs"
CHECKPOINTS_SUBDIR = "checkpoints"
RESULT_FILENAME = "result.json"


def resolve(path: str | os.PathLike) -> Path:
    """An absolute path with ``~`` expanded (relative paths are taken from the working directory)."""
    return Path(path).expanduser().resolve()


def data_dir(paths: Mapping[str, Any]) -> Path:
    return resolve(paths["data_dir"])


def cache_dir(paths: Mapping[str, Any]) -> Path:
    return resolve(paths["cache_dir"])


def task_runs_dir(paths: Mapping[str, Any], task_name: str) -> Path:
    """``<results_dir>/runs/<task>``; task names such as ``glue/rte`` nest one level."""
    runs = resolve(paths["results_dir"]) / RUNS_SUBDIR
    task_dir = (runs / task_name).resolve()
    if runs not in task_dir.parents:
        raise InputError(f"task.name '{task_name}' must be a relative name such as glue/rte, without '..'")
    return task_dir


def create_run_dir(parent: Path, base_name: str) -> Path:
    """Create ``parent/<base_name>-<timestamp>`` exclusively, adding a random suffix on a clash.

    ``mkdir(exist_ok=False)`` is atomic, so two runs started at the same second with the same
    settings (e.g. a multirun on two machines sharing a disk) still get separate directories.
    """
    name = f"{base_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate = parent / name
    if candidate.resolve().parent != parent.resolve():  # tsft.config validates run names; this is the backstop
        raise ValueError(f"run directory {candidate} would not be inside {parent}")
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            candidate = parent / f"{name}-{secrets.token_hex(2)}"


def run_dir_of_checkpoint(ckpt_path: str | os.PathLike) -> Path | None:
    """The run directory a checkpoint was saved in (``<run_dir>/checkpoints/x.ckpt``), if it is one."""
    ckpt = resolve(ckpt_path)
    if ckpt.parent.name == CHECKPOINTS_SUBDIR:
        return ckpt.parent.parent
    return None
