"""Lightning callback: step the thresholds once per optimizer step, log and report sparsity."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import lightning.pytorch as pl
import torch

from tsft.gate.attach import find_token_gates
from tsft.gate.config import GateConfig
from tsft.gate.controller import ControllerConfig, SparsityController
from tsft.gate.report import sparsity_summary
from tsft.gate.threshold import ThresholdOptimizer


class TokenGateCallback(pl.Callback):
    """Drives the gates that ``add_token_gates`` put on the LightningModule's model.

    ``on_before_optimizer_step`` runs after the last micro-batch's backward of an accumulation
    window and before the PEFT optimizer steps, so tau moves exactly once per optimizer step with
    g summed over the window (and over DDP ranks, inside ``ThresholdOptimizer.step``).
    Train statistics cover the current training epoch; eval statistics the latest validation or
    test loop. After each loop ``pl_module.sparsity_report`` holds ``sparsity_summary(gates)``.

    ``trace_path`` (or ``trace_tau: true`` in a config mapping, written to ``<default_root_dir>/tau_trace.csv``):
    every optimizer step's training loss and every gate's tau after the step, one row per step (Figure 3).
    Each step only copies the tau vector and the loss, both already on the device; they are read back once,
    when training ends.
    """

    TRACE_FILENAME = "tau_trace.csv"

    def __init__(
        self,
        config: Union[GateConfig, Mapping[str, Any], None] = None,
        log_modules: bool = True,
        trace_path: Optional[Union[str, Path]] = None,
    ) -> None:
        super().__init__()
        self.trace = bool(trace_path) or (isinstance(config, Mapping) and bool(config.get("trace_tau", False)))
        self.trace_path = Path(trace_path) if trace_path else None
        self.config = GateConfig.from_mapping(config) if isinstance(config, Mapping) else config
        # sparsity.target: a drive on the threshold steps follows the training sparsity (tsft.gate.controller)
        self.controller_config = ControllerConfig.from_mapping(config) if isinstance(config, Mapping) else None
        self.controller: Optional[SparsityController] = None
        self._controller_state: Optional[dict[str, Any]] = None  # from a checkpoint, applied once set up
        self.log_modules = log_modules
        self.thresholds: Optional[ThresholdOptimizer] = None
        self._trace_rows: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step, loss, taus)
        self._step_loss: Optional[torch.Tensor] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        gates = find_token_gates(pl_module)
        if not gates:
            raise RuntimeError("TokenGateCallback found no token gates: call tsft.gate.add_token_gates on the model")
        self.thresholds = ThresholdOptimizer(gates, self.config)
        if self.controller_config is not None and self.controller is None and stage == "fit":
            steps = int(trainer.estimated_stepping_batches)
            self.controller = SparsityController(self.thresholds, self.controller_config, steps)
            if self._controller_state is not None:
                self.controller.load_state_dict(self._controller_state)

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict()} if self.controller is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._controller_state = state_dict.get("controller")
        if self.controller is not None and self._controller_state is not None:
            self.controller.load_state_dict(self._controller_state)

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        for gate in self.thresholds.gates:
            gate.reset_stats("train")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.thresholds.step(*loss_scale_of_step(getattr(trainer.precision_plugin, "scaler", None), optimizer))
        if self.controller is not None:
            self.controller.update(trainer.global_step + 1)  # λ for the next step
        if self.trace:
            # the step's number once taken (global_step counts it after this hook), its loss, tau after it
            loss = self._step_loss if self._step_loss is not None else torch.tensor(float("nan"))
            self._trace_rows.append((trainer.global_step + 1, loss, self.thresholds.taus()))
            self._step_loss = None

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.trace:
            # Lightning divides each micro-batch's loss by accumulate_grad_batches before backward, so their
            # sum over the window is the step's mean loss
            loss = loss.detach()
            self._step_loss = loss.clone() if self._step_loss is None else self._step_loss + loss

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.trace or not self._trace_rows or not trainer.is_global_zero:
            return
        path = self.trace_path or Path(trainer.default_root_dir) / self.TRACE_FILENAME
        write_tau_trace(path, [gate.name for gate in self.thresholds.gates], self._trace_rows)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Reading counts synchronises with the device: do it only when Lightning logs anyway.
        if (trainer.global_step % max(trainer.log_every_n_steps, 1)) == 0:
            summary = sparsity_summary(self.thresholds.gates, splits=("train",))
            if summary["train_overall"] is not None:
                pl_module.log("sparsity/train", summary["train_overall"], prog_bar=True)
            if self.controller is not None and self.controller.trajectory:
                pl_module.log("sparsity/drive", self.controller.trajectory[-1]["drive"])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._log_and_store(pl_module, "train")

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset_eval()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._log_and_store(pl_module, "eval")

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._reset_eval()

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log_and_store(pl_module, "eval")

    def _reset_eval(self) -> None:
        for gate in self.thresholds.gates:
            gate.reset_stats("eval")

    def _log_and_store(self, pl_module: pl.LightningModule, split: str) -> None:
        summary = sparsity_summary(self.thresholds.gates)
        if self.controller is not None:
            summary["target"] = self.controller.report()
        pl_module.sparsity_report = summary
        overall = summary["overall" if split == "eval" else "train_overall"]
        if overall is None:
            return
        prefix = "val" if split == "eval" else "train"
        pl_module.log(f"sparsity/{prefix}", overall)
        if self.log_modules:
            key = "sparsity" if split == "eval" else "train_sparsity"
            for module in summary["modules"]:
                if module[key] is not None:
                    pl_module.log(f"sparsity_{prefix}/{module['name']}", module[key])
                pl_module.log(f"tau/{module['name']}", module["tau"])


def write_tau_trace(path: Path, names: list[str], rows: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
    """``step, loss, <gate name>...`` per optimizer step: the step's mean training loss, tau after the step."""
    steps = [step for step, _, _ in rows]
    losses = torch.stack([loss.reshape(()).float().cpu() for _, loss, _ in rows]).tolist()
    taus = torch.stack([tau.float().cpu() for _, _, tau in rows]).tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["step", "loss", *names])
        for step, loss, row in zip(steps, losses, taus):
            writer.writerow([step, f"{loss:.6g}", *(f"{tau:.6g}" for tau in row)])


def loss_scale_of_step(scaler, optimizer) -> tuple[float, bool]:
    """(loss scale, whether the scaler found inf/NaN gradients) for the step ``optimizer`` is about to take.

    Lightning's "16-mixed" unscales the PEFT gradients before ``on_before_optimizer_step`` (and updates
    the scale only after the step), so here ``get_scale()`` is the scale the backward used and the
    scaler has already looked for inf/NaN. Its verdict is only kept in ``_found_inf_per_device``
    (private, but what ``GradScaler.step`` itself reads); a later torch without it falls back to the
    threshold optimizer's own check of g.
    """
    if scaler is None or not scaler.is_enabled():
        return 1.0, False
    found = getattr(scaler, "_found_inf_per_device", None)
    found_inf = False
    if found is not None:
        try:
            found_inf = any(bool(flag.item()) for flag in found(optimizer).values())
        except (KeyError, RuntimeError):  # not unscaled for this optimizer (e.g. a closure that skipped backward)
            found_inf = False
    return scaler.get_scale(), found_inf
