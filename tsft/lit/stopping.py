"""Checkpoints that make every stop resumable: at the end of training whatever the save interval, and when
a signal stops the run (SIGTERM from a scheduler or ``docker stop``; Ctrl-C).

Lightning already turns SIGTERM into a stop at the next batch boundary (its loops raise SIGTERMException, a
SystemExit with status 0 that looks like success). The first Ctrl-C is routed the same way, so the checkpoint
is taken between two optimizer steps, never in the middle of one; a second Ctrl-C interrupts at once.
The pipeline turns the stop into a non-zero exit with one line naming the checkpoint to resume from.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tsft import paths

EXIT_STATUS = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}  # the shell's convention


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

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def first_ctrl_c(signum: int, frame: Any) -> None:
            self.stopped_by = "SIGINT"
            trainer._signal_connector.received_sigterm = True  # the loops stop at the next batch boundary
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

        self._previous_sigint = signal.signal(signal.SIGINT, first_ctrl_c)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()
        if self.enabled:
            trainer.save_checkpoint(self.path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if isinstance(exception, SIGTERMException):
            self.stopped_by = self.stopped_by or "SIGTERM"
            self.stopped_at_step = trainer.global_step
            if self.enabled:
                trainer.save_checkpoint(self.path)

    def stop_error(self) -> RunStopped:
        if self.enabled:
            advice = f"resume with ckpt_path={self.path}"
        else:
            advice = "checkpoints are off (checkpoint.enabled=false), so the run has to start again"
        return RunStopped(
            f"{self.stopped_by} stopped training after step {self.stopped_at_step}; {advice}",
            EXIT_STATUS[self.stopped_by or "SIGTERM"],
        )

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
