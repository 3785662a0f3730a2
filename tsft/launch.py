"""How a run was launched, and what follows for its directory and its resumption.

Three ways a run gets several processes, and how they find one run directory:
- Lightning's own launcher (``trainer=ddp`` from one command): rank 0 creates the directory and the ranks
  it starts inherit it through ``TSFT_RUN_DIR`` (tsft.pipeline.shared_run_dir).
- An external launcher (``torchrun``, ``srun`` with one task per GPU, submitit's SLURM tasks): every process
  runs the whole script, and none can wait for another before the process group exists. Each computes the
  same directory name from the launch's id (``<run name>-launch-<id>``, ``Launch.id``): rank 0 creates it and
  writes the run's records; the others use the path. Their decisions read only files rank 0 does not touch
  before training (checkpoints, result.json), so all processes decide alike.
- A requeued SLURM job keeps its job id, so it finds its own directory again; ``resume.auto=true`` makes any
  run (requeued, resubmitted, or re-run by hand) continue the newest unfinished checkpoint of its run name.

Requeueing belongs to submitit when it launched the job (``hydra/launcher=submitit_slurm``): its signal stops
training at a batch boundary with a checkpoint (tsft.lit.stopping), then submitit requeues the job. Lightning's
own SLURM auto-requeue is switched off there (``cluster_plugins``), so the two never race for the same signal.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tsft import paths
from tsft.checkpoint import run_settings
from tsft.errors import InputError

LAUNCH_PREFIX = "launch-"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Launch:
    """This process's place in its launch: ``rank`` of ``world_size``, and an ``id`` every process of the launch
    shares (None when this process is the whole launch, or Lightning starts the other ranks itself)."""

    rank: int = 0
    world_size: int = 1
    id: str | None = None

    @property
    def is_external(self) -> bool:
        return self.world_size > 1 and self.id is not None


def current_launch(env: Mapping[str, str] = os.environ) -> Launch:
    slurm_job = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        slurm_job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or any launcher following torch's env:// convention
        run_id = env.get("TORCHELASTIC_RUN_ID", "")
        if run_id in ("", "none"):  # torchrun without --rdzv-id: the rendezvous address names the launch
            run_id = f"{slurm_job}" if slurm_job else f"{env.get('MASTER_ADDR', 'local')}-{env.get('MASTER_PORT', '')}"
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), _safe(run_id))
    if slurm_job and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:  # srun, one task per rank
        step = env.get("SLURM_STEP_ID", "0")
        return Launch(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), _safe(f"{slurm_job}.{step}"))
    return Launch()


_STARTED_AS: Launch | None = None


def process_launch() -> Launch:
    """``current_launch()`` as it was at this process's first run: Lightning's launchers and DeepSpeed write
    WORLD_SIZE / RANK into the environment of the process they run in, which must not turn the next run of a
    sweep into an "external launch"."""
    global _STARTED_AS
    if _STARTED_AS is None:
        _STARTED_AS = current_launch()
    return _STARTED_AS


def _safe(launch_id: str) -> str:
    return _UNSAFE.sub("_", launch_id).strip("_-") or "0"


def launch_run_dir(task_dir: Path, base_name: str, launch: Launch) -> Path:
    """``<task_dir>/<base_name>-launch-<id>``: the same path in every process of an external launch."""
    return task_dir / f"{base_name}-{LAUNCH_PREFIX}{launch.id}"


def create_launch_run_dir(run_dir: Path, launch: Launch) -> Path:
    """Rank 0 creates the launch's directory (again, for a requeued job: the same job id, the same directory)."""
    if (run_dir / paths.RESULT_FILENAME).exists():
        raise InputError(
            f"{run_dir} holds the finished run of this launch; give this run another run_name, or skip_existing=true"
        )
    if launch.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def stable_run_name(cfg: DictConfig, base_name: str) -> str:
    """``<base_name>-cfg<hash>``: the default run name with ``resume.auto``, a pure function of the settings that
    define the run (tsft.checkpoint.run_settings), so a requeued or resubmitted job finds its own checkpoints
    and never another configuration's."""
    settings = json.dumps(run_settings(cfg), sort_keys=True, default=str)
    return f"{base_name}-cfg{hashlib.sha256(settings.encode()).hexdigest()[:8]}"


def own_checkpoint(task_dir: Path, run_name: str, is_run_dir_of: Any) -> str | None:
    """The newest ``last.ckpt`` among the unfinished runs named ``run_name`` (``is_run_dir_of(name)`` tells
    whether a directory name belongs to it), or None."""
    if not task_dir.is_dir():
        return None
    found = []
    for run_dir in task_dir.iterdir():
        checkpoint = run_dir / paths.CHECKPOINTS_SUBDIR / f"{paths.LAST_CHECKPOINT}.ckpt"
        if is_run_dir_of(run_dir.name) and checkpoint.is_file() and not (run_dir / paths.RESULT_FILENAME).exists():
            found.append((checkpoint.stat().st_mtime, str(checkpoint)))
    return max(found)[1] if found else None


def under_submitit(env: Mapping[str, str] = os.environ) -> bool:
    return env.get("SUBMITIT_EXECUTOR") == "slurm"


def preemption_signal(env: Mapping[str, str] = os.environ) -> str:
    """The signal submitit sends before a SLURM job's time limit or on preemption (its default: USR2)."""
    return "SIG" + env.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG")


def cluster_plugins(env: Mapping[str, str] = os.environ) -> list[Any]:
    """Under submitit on SLURM, Lightning's SLURM environment without its auto-requeue: submitit requeues the job."""
    if not (under_submitit(env) and "SLURM_JOB_ID" in env):
        return []
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)]
