"""HF ``transformers.Trainer`` callback: thresholds, AdaLoRA's allocator, sparsity in the logs and checkpoints.

    gates = add_token_gates(peft_model, GateConfig(lam=1e-5, s=1e-4))
    trainer = Trainer(model=peft_model, ..., callbacks=[TokenGateTrainerCallback(peft_model)])

Pass ``resume_from=<checkpoint dir>`` together with ``trainer.train(resume_from_checkpoint=...)``:
the Trainer restores the adapter weights, the callback restores the thresholds it saved there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn
from transformers import TrainerCallback

from tsft.gate.attach import find_token_gates
from tsft.gate.report import sparsity_summary
from tsft.gate.threshold import ThresholdOptimizer
from tsft.integrations.export import load_gate_state, save_gate_state


class TokenGateTrainerCallback(TrainerCallback):
    def __init__(self, model: nn.Module, resume_from: Optional[str] = None) -> None:
        gates = find_token_gates(model)
        if not gates:
            raise RuntimeError("the model has no token gates: call tsft.gate.add_token_gates first")
        self.model = model
        self.thresholds = ThresholdOptimizer(gates)
        self.resume_from = resume_from
        self._loss_scale = 1.0  # the fp16 loss scale of the current step (on_pre_optimizer_step)
        # The Trainer never calls AdaLoRA's rank allocator; peft's AdaLoraModel needs it every step.
        self.allocator = getattr(getattr(model, "base_model", None), "update_and_allocate", None)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.resume_from is not None:
            load_gate_state(self.model, self.resume_from)

    def on_epoch_begin(self, args, state, control, **kwargs):
        for gate in self.thresholds.gates:
            gate.reset_stats("train")

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # With fp16 the loss was multiplied by the scaler's scale, which the step may change: read it now.
        scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer holds the GradScaler
        self._loss_scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # Called once per optimizer step, after the gradients of all accumulation steps. A step the scaler
        # skipped (inf/NaN gradients) is skipped for tau too, and g is unscaled as the PEFT gradients are.
        skipped = bool(getattr(optimizer, "step_was_skipped", False))
        self.thresholds.step(self._loss_scale, found_inf=skipped)
        if self.allocator is not None:
            self.allocator(state.global_step)

    def on_evaluate(self, args, state, control, **kwargs):
        # Runs after evaluate() has logged its metrics (and our eval sparsity): start the next one afresh.
        for gate in self.thresholds.gates:
            gate.reset_stats("eval")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        summary = sparsity_summary(self.thresholds.gates)
        extra = {"tau_mean": sum(m["tau"] for m in summary["modules"]) / len(summary["modules"])}
        for key, name in (("train_overall", "sparsity_train"), ("overall", "sparsity_eval")):
            if summary[key] is not None:
                extra[name] = round(summary[key], 4)
        logs.update(extra)
        if state.log_history:  # the Trainer stored its copy of `logs` before calling us
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir() and state.is_world_process_zero:
            save_gate_state(self.model, checkpoint)
