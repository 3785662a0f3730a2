"""Checkpoints that make every stop resumable: at the end of training whatever the save interval, and when
a signal stops the run (SIGTERM from a scheduler or ``docker stop``; Ctrl-C).

Lightning already turns SIGTERM into a stop at the next batch boundary (its loops raise SIGTERMException, a
SystemExit with status 0 that looks like success). The first Ctrl-C is routed the same way, so the checkpoint
is taken between two optimizer steps, never in the middle of one; a second Ctrl-C interrupts at once.
The pipeline turns the stop into a non-zero exit with one line naming the checkpoint to resume from.

Under submitit (``hydra/launcher=submitit_slurm``) its preemption signal (USR2 before the time limit or on
preemption) is routed the same way: training stops at the batch boundary with last.ckpt, and only then is
submitit's own handler called, which requeues the job (``hand_over_preemption``); the requeued run continues
that checkpoint with ``resume.auto=true`` (tsft.launch).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tsft import paths
from tsft.launch import preemption_signal, under_submitit


def exit_status(signal_name: str) -> int:
    return 128 + signal.Signals[signal_name]  # the shell's convention


class RunStopped(Exception):
    """Training stopped by a signal; ``exit_status`` follows the shell's 128 + signal number."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class StopCheckpoints(Callback):
    """Saves ``<checkpoint_dir>/last.ckpt`` at the end of training and when a signal stops it (if ``enabled``);
    records which signal stopped the run and at which step (``stopped_by``, ``stopped_at_step``)."""

    def __init__(self, checkpoint_dir: Path, enabled: bool) -> None:
        self.path = Path(checkpoint_dir) / f"{paths.LAST_CHECKPOINT}.ckpt"  # the file ModelCheckpoint writes
        self.enabled = enabled
        self.stopped_by: str | None = None
        self.stopped_at_step: int | None = None
        self._previous_sigint: Any = None
        self._preemption: tuple[signal.Signals, Any] | None = None  # submitit's signal and its handler

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def first_ctrl_c(signum: int, frame: Any) -> None:
            self.stopped_by = "SIGINT"
            trainer._signal_connector.received_sigterm = True  # the loops stop at the next batch boundary
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

        self._previous_sigint = signal.signal(signal.SIGINT, first_ctrl_c)
        if under_submitit():
            preempt = signal.Signals[preemption_signal()]

            def preempted(signum: int, frame: Any) -> None:
                self.stopped_by = self.stopped_by or preempt.name
                trainer._signal_connector.received_sigterm = True  # all ranks stop at the same batch boundary

            self._preemption = (preempt, signal.signal(preempt, preempted))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()
        self._restore_preemption()
        if self.enabled:
            trainer.save_checkpoint(self.path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException):
            self._restore_preemption()  # a stop by submitit's signal keeps it for hand_over_preemption
            return
        self.stopped_by = self.stopped_by or "SIGTERM"
        self.stopped_at_step = trainer.global_step
        if self.enabled:
            trainer.save_checkpoint(self.path)

    def hand_over_preemption(self) -> None:
        """After a stop by submitit's signal: call submitit's handler, which requeues the job (and exits rank 0)."""
        if self._preemption is None:
            return
        preempt, submitit_handler = self._preemption
        self._restore_preemption()
        if self.stopped_by == preempt.name and callable(submitit_handler):
            submitit_handler(preempt, None)

    def _restore_preemption(self) -> None:
        if self._preemption is not None:
            signal.signal(*self._preemption)
            self._preemption = None

    def stop_error(self) -> RunStopped:
        if self.enabled:
            advice = f"resume with ckpt_path={self.path}"
        else:
            advice = "checkpoints are off (checkpoint.enabled=false), so the run has to start again"
        return RunStopped(
            f"{self.stopped_by} stopped training after step {self.stopped_at_step}; {advice}",
            exit_status(self.stopped_by or "SIGTERM"),
        )

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
