"""Where a run reads data and writes results (configs/paths)."""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tsft.errors import InputError

RUNS_SUBDIR = "runs"
CHECKPOINTS_SUBDIR = "checkpoints"
LAST_CHECKPOINT = "last"  # <run_dir>/checkpoints/last.ckpt: every save of a run overwrites it
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


def check_results_dir(paths_cfg: Mapping[str, Any]) -> None:
    """Refuse a results_dir that cannot be created or written, before any work (mkdir would fail after training
    set-up otherwise): it, or its nearest existing ancestor, must be a writable directory."""
    target = resolve(paths_cfg["results_dir"])
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(
            f"paths.results_dir {target} lies under {existing}, which is a file; set paths.results_dir=<a directory>"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(
            f"paths.results_dir {target} is not writable ({existing} is not); set paths.results_dir=<a writable dir>"
        )


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


def discard_if_unfinished(run_dir: Path) -> None:
    """Remove a run directory that holds neither a result nor a checkpoint to resume from: a run that failed
    in set-up or early training leaves nothing half-written behind (one with a checkpoint stays, for ckpt_path=)."""
    if (run_dir / RESULT_FILENAME).exists() or any((run_dir / CHECKPOINTS_SUBDIR).glob("*.ckpt")):
        return
    shutil.rmtree(run_dir, ignore_errors=True)


def run_dir_of_checkpoint(ckpt_path: str | os.PathLike) -> Path | None:
    """The run directory a checkpoint was saved in (``<run_dir>/checkpoints/x.ckpt``), if it is one."""
    ckpt = resolve(ckpt_path)
    if ckpt.parent.name == CHECKPOINTS_SUBDIR:
        return ckpt.parent.parent
    return None
