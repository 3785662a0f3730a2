"""fp16 loss scaling: g reaches tau unscaled, and a step the scaler skips (inf/NaN gradients) skips tau too."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from tsft.gate import GateConfig, ThresholdOptimizer, add_token_gates

from .conftest import peft_model
from .test_integrations import DictModel, LitRegression, Regression, hf_training_args, lightning_trainer, masked_mse

PLAIN = GateConfig(lam=1e-2, s=1e-2, adam=False)  # the plain step: tau moves by s * g, so g shows directly
ADAM = GateConfig(lam=1e-2, s=1e-2)


def gated(config: GateConfig):
    model = peft_model("lora")
    thresholds = ThresholdOptimizer(add_token_gates(model, config))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer, thresholds


def batches(n: int):
    data = Regression(4 * n)
    return [{key: torch.stack([data[4 * i + j][key] for j in range(4)]) for key in data[0]} for i in range(n)]


def run(config: GateConfig, scaler: torch.amp.GradScaler | None, blow_up: int | None = None, drop: int | None = None):
    """Three steps of a float32 model, the loss scaled by ``scaler`` when given. ``blow_up``: the step whose
    loss is multiplied by 1e38, so its scaled gradients overflow; ``drop``: a step left out."""
    model, optimizer, thresholds = gated(config)
    for step, batch in enumerate(batches(3)):
        if step == drop:
            continue
        loss = masked_mse(model, batch) * (1e38 if step == blow_up else 1.0)
        if scaler is None:
            loss.backward()
            optimizer.step()
            thresholds.step()
        else:
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            # GradScaler.update lowers the scale exactly when it found inf/NaN (backoff_factor < 1 is enforced)
            thresholds.step(loss_scale=scale, found_inf=scaler.get_scale() < scale)
        optimizer.zero_grad()
    return model, thresholds


@pytest.mark.parametrize("config", [PLAIN, ADAM], ids=["plain", "adam"])
def test_scaled_loss_gives_the_unscaled_thresholds(config):
    # a power-of-two scale multiplies and divides exactly, so the two runs agree to float rounding
    _, reference = run(config, None)
    _, scaled = run(config, torch.amp.GradScaler("cpu", init_scale=1024.0))
    for a, b in zip(reference.gates, scaled.gates):
        assert float(b.tau) == pytest.approx(float(a.tau), rel=1e-6)


def test_overflow_step_is_skipped_for_tau_as_for_the_weights():
    """The scaler skips the overflowing step; tau skips it too and ends where a run without that batch ends."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, thresholds = run(ADAM, torch.amp.GradScaler("cpu", init_scale=1024.0), blow_up=1)
    reference_model, reference = run(ADAM, None, drop=1)
    assert thresholds.skipped_steps == 1
    assert [str(w.message).startswith("threshold step skipped") for w in caught].count(True) == 1
    for a, b in zip(reference.gates, thresholds.gates):
        assert math.isfinite(float(b.tau)) and math.isfinite(float(b.exp_avg_sq))
        assert float(b.step) == float(a.step) == 2.0
        assert float(b.tau) == pytest.approx(float(a.tau), rel=1e-6)
    for (name, a), b in zip(reference_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, msg=name)


def test_non_finite_g_under_a_loss_scale_is_never_applied():
    """Even when the caller does not say the scaler skipped, a non-finite g under a loss scale is not applied."""
    model, _, thresholds = gated(ADAM)
    (masked_mse(model, batches(1)[0]) * float("inf")).backward()
    with pytest.warns(RuntimeWarning, match="threshold step skipped"):
        assert thresholds.step(loss_scale=1024.0) is False
    assert all(float(g.tau) == 0 and float(g.step) == 0 for g in thresholds.gates)


def lightning_fp16(tmp_path, config: GateConfig, init_scale: float, steps: int = 3):
    model = peft_model("lora")
    gates = add_token_gates(model, config)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    # Lightning turns precision="16-mixed" on a CPU into bf16; the plugin given directly keeps fp16 autocast
    trainer = lightning_trainer(tmp_path, max_steps=steps, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    trainer.callbacks[0].config = config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the once-per-run skip warning (checked above)
        trainer.fit(LitRegression(model), DataLoader(Regression(), batch_size=4))
    return gates, trainer.callbacks[0].thresholds, scaler


def lightning_fp32(tmp_path, config: GateConfig, steps: int = 3):
    model = peft_model("lora")
    gates = add_token_gates(model, config)
    trainer = lightning_trainer(tmp_path, max_steps=steps)
    trainer.callbacks[0].config = config
    trainer.fit(LitRegression(model), DataLoader(Regression(), batch_size=4))
    return gates


def test_lightning_16_mixed_thresholds_match_a_float32_run(tmp_path):
    # fp16 autocast rounds the forward (~1e-3); an unscaled loss term would be 1024x too large
    reference = lightning_fp32(tmp_path / "fp32", PLAIN)
    gates, _, _ = lightning_fp16(tmp_path / "fp16", PLAIN, init_scale=1024.0)
    for a, b in zip(reference, gates):
        assert float(b.tau) == pytest.approx(float(a.tau), rel=2e-2)


def test_lightning_16_mixed_overflow_steps_leave_tau_finite(tmp_path):
    # 2^24 times the loss overflows fp16 gradients: the scaler halves its scale and skips until they fit
    gates, thresholds, scaler = lightning_fp16(tmp_path, ADAM, init_scale=2.0**24, steps=12)
    skipped = round(math.log2(2.0**24 / scaler.get_scale()))
    assert 1 <= skipped < 12
    assert thresholds.skipped_steps == skipped
    for gate in gates:
        assert float(gate.step) == 12 - skipped
        assert math.isfinite(float(gate.tau)) and math.isfinite(float(gate.exp_avg_sq)) and float(gate.tau) > 0


class BlowsUpOnce(DictModel):
    """The HF Trainer's model: its loss on the ``blow_up``-th call is multiplied by 1e38 (scaled, it overflows)."""

    def __init__(self, inner, blow_up):
        super().__init__(inner)
        self.calls, self.blow_up = 0, blow_up

    def forward(self, x, attention_mask, labels):
        out = super().forward(x, attention_mask, labels)
        self.calls += 1
        return {"loss": out["loss"] * (1e38 if self.calls - 1 == self.blow_up else 1.0)}


def hf_train(tmp_path, scaler: torch.amp.GradScaler | None, blow_up: int | None = None):
    from transformers import Trainer

    from tsft.integrations.hf_trainer import TokenGateTrainerCallback

    inner = peft_model("lora")
    gates = add_token_gates(inner, ADAM)
    args = hf_training_args(tmp_path, per_device_train_batch_size=4, max_grad_norm=0.0)
    callback = TokenGateTrainerCallback(inner)
    trainer = Trainer(model=BlowsUpOnce(inner, blow_up), args=args, train_dataset=Regression(), callbacks=[callback])
    # accelerate makes a GradScaler only for fp16 on an accelerator; on a CPU the test hands it one, which
    # the Trainer then uses exactly as with fp16=True (scaled backward, AcceleratedOptimizer.step_was_skipped)
    trainer.accelerator.scaler = scaler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.train()
    return gates, callback


def test_hf_trainer_with_a_loss_scaler_unscales_g_and_skips_overflow(tmp_path):
    reference, _ = hf_train(tmp_path / "plain", None)
    gates, _ = hf_train(tmp_path / "scaled", torch.amp.GradScaler("cpu", init_scale=1024.0))
    for a, b in zip(reference, gates):
        assert float(b.tau) == pytest.approx(float(a.tau), rel=1e-6)
    gates, callback = hf_train(tmp_path / "overflow", torch.amp.GradScaler("cpu", init_scale=1024.0), blow_up=1)
    assert callback.thresholds.skipped_steps == 1
    for gate in gates:
        assert float(gate.step) == 2 and math.isfinite(float(gate.tau)) and math.isfinite(float(gate.exp_avg_sq))
