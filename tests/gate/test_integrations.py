"""The gate from Lightning, from the HF Trainer, and through export / load."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tsft.gate import GateConfig, ThresholdOptimizer, add_parallel_adapters, add_token_gates, find_token_gates
from tsft.integrations.export import GATE_FILE, load_gated_model, save_gated_model
from tsft.integrations.hf_trainer import TokenGateTrainerCallback
from tsft.integrations.lightning import TokenGateCallback

from .conftest import TwoLayer, peft_model

CONFIG = GateConfig(lam=1e-2, s=1e-2)


class Regression(Dataset):
    """Random (x, target) sequences with the last position of odd items padded."""

    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 5, 8, generator=g)
        self.y = torch.randn(n, 5, 8, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        mask = torch.ones(5, dtype=torch.long)
        mask[-1] = i % 2
        return {"x": self.x[i], "attention_mask": mask, "labels": self.y[i]}


def masked_mse(model, batch):
    out = model(batch["x"], attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"]
    return (((out - batch["labels"]) ** 2).sum(-1) * mask).sum() / mask.sum()


class LitRegression(pl.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, _):
        return masked_mse(self.model, batch)

    def validation_step(self, batch, _):
        self.log("val_loss", masked_mse(self.model, batch))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def lightning_trainer(tmp_path, **kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        deterministic=True,
    )
    return pl.Trainer(callbacks=[TokenGateCallback()], **{**defaults, **kwargs})


def test_lightning_steps_tau_once_per_optimizer_step_with_accumulation(tmp_path):
    model = peft_model("lora")
    gates = add_token_gates(model, CONFIG)
    trainer = lightning_trainer(tmp_path, max_steps=3, accumulate_grad_batches=2)
    lit = LitRegression(model)
    trainer.fit(lit, DataLoader(Regression(), batch_size=2))
    trainer.validate(lit, DataLoader(Regression(4), batch_size=2), verbose=False)
    assert [float(g.step) for g in gates] == [3.0, 3.0]  # 6 micro-batches, 3 optimizer steps
    assert all(float(g.tau) > 0 for g in gates)
    report = lit.sparsity_report
    assert report["modules"][0]["tokens"] == 4 * 5 - 2  # validation: 4 sequences, 2 padded positions
    assert report["modules"][0]["train_tokens"] == 6 * 2 * 5 - 6  # this epoch's 6 micro-batches
    assert 0.0 <= report["overall"] <= 1.0


class SnapshotGates(pl.Callback):
    """Records every gate buffer when training (re)starts."""

    def on_train_start(self, trainer, pl_module):
        self.at_start = {k: v.clone() for k, v in pl_module.state_dict().items() if "token_gate" in k}


def test_lightning_checkpoint_resume_restores_thresholds(tmp_path):
    data = DataLoader(Regression(), batch_size=8)
    first = peft_model("dora")
    add_token_gates(first, CONFIG)
    trainer = lightning_trainer(tmp_path / "a", max_steps=2)
    trainer.fit(LitRegression(first), data)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    saved = {k: v.clone() for k, v in LitRegression(first).state_dict().items() if "token_gate" in k}
    assert len(saved) == 8 and all(float(v) != 0 for v in saved.values())  # tau, m, v, step of 2 gates

    resumed = peft_model("dora")
    gates = add_token_gates(resumed, CONFIG)
    snapshot = SnapshotGates()
    trainer = lightning_trainer(tmp_path / "b", max_steps=4)
    trainer.callbacks.append(snapshot)
    trainer.fit(LitRegression(resumed), data, ckpt_path=tmp_path / "half.ckpt")
    assert snapshot.at_start.keys() == saved.keys()
    for key in saved:
        assert torch.equal(snapshot.at_start[key], saved[key]), key
    assert [float(g.step) for g in gates] == [4.0, 4.0]  # and the Adam step count continues from there


class DictModel(torch.nn.Module):
    """What the HF Trainer expects: keyword inputs in, a dict with ``loss`` out."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, attention_mask, labels):
        return {"loss": masked_mse(self.inner, {"x": x, "attention_mask": attention_mask, "labels": labels})}


def hf_training_args(tmp_path, **overrides):
    """Three quiet CPU steps at lr 1e-2 with nothing saved; ``overrides`` set the batch and the rest."""
    from transformers import TrainingArguments

    settings = dict(max_steps=3, learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    return TrainingArguments(output_dir=str(tmp_path), **{**settings, **overrides})


def test_hf_trainer_callback_steps_thresholds_and_allocator(tmp_path):
    from transformers import Trainer

    inner = peft_model("adalora")
    gates = add_token_gates(inner, CONFIG)
    calls = []
    allocate = inner.base_model.update_and_allocate
    inner.base_model.update_and_allocate = lambda step: (calls.append(step), allocate(step))
    args = hf_training_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, logging_steps=1)
    trainer = Trainer(
        model=DictModel(inner), args=args, train_dataset=Regression(), callbacks=[TokenGateTrainerCallback(inner)]
    )
    trainer.train()
    assert [float(g.step) for g in gates] == [3.0, 3.0]
    assert calls == [0, 1, 2]
    assert any("sparsity_train" in entry for entry in trainer.state.log_history)


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora", "adapter"])
def test_export_and_load_reproduce_predictions(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "adapter":
        model = TwoLayer()
        base_copy = copy.deepcopy(model)
        for p in model.parameters():
            p.requires_grad_(False)
        add_parallel_adapters(model, ["q", "v"], hidden_size=3, scale=2.0)
        with torch.no_grad():
            for layer in (model.q, model.v):
                layer.adapter_up.weight.normal_()
    else:
        base_copy = TwoLayer()
        model = peft_model(kind, model=copy.deepcopy(base_copy))
    gates = add_token_gates(model, CONFIG)
    thresholds = ThresholdOptimizer(gates)
    data = Regression(8)
    for i in range(0, 8, 2):  # a few threshold steps so tau is non-trivial
        masked_mse(model, {k: torch.stack([data[j][k] for j in (i, i + 1)]) for k in data[0]}).backward()
        thresholds.step()
    model.eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = model(x)
    save_gated_model(model, tmp_path)
    assert (tmp_path / GATE_FILE).exists()
    loaded = load_gated_model(base_copy, tmp_path).eval()
    assert [float(g.tau) for g in find_token_gates(loaded)] == [float(g.tau) for g in gates]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)


class LossRecording(LitRegression):
    def __init__(self, model):
        super().__init__(model)
        self.losses = []

    def training_step(self, batch, _):
        loss = super().training_step(batch, _)
        self.losses.append(float(loss))  # as training_step returns it, before Lightning divides it for accumulation
        return loss


class StepTaus(pl.Callback):
    """Every gate's tau after each optimizer step, taken independently of the trace."""

    def __init__(self, gates):
        self.gates, self.taus, self._micro = gates, [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._micro += 1
        if self._micro % trainer.accumulate_grad_batches == 0:
            self.taus.append([float(g.tau) for g in self.gates])


def test_lightning_traces_loss_and_every_tau_per_optimizer_step(tmp_path):
    """trace_tau: one row per optimizer step (3 steps of 2 micro-batches), tau as after that step, and the
    step's loss as the mean of its micro-batches' losses (Figure 3's two curves)."""
    import csv

    model = peft_model("lora")
    gates = add_token_gates(model, CONFIG)
    watcher = StepTaus(gates)
    trainer = lightning_trainer(tmp_path, max_steps=3, accumulate_grad_batches=2)
    trainer.callbacks[:] = [TokenGateCallback({"lambda": CONFIG.lam, "s": CONFIG.s, "trace_tau": True}), watcher]
    lit = LossRecording(model)
    trainer.fit(lit, DataLoader(Regression(), batch_size=2))
    step_means = [(a + b) / 2 for a, b in zip(lit.losses[::2], lit.losses[1::2])]
    with open(tmp_path / TokenGateCallback.TRACE_FILENAME) as trace_file:
        rows = list(csv.reader(trace_file))
    assert rows[0] == ["step", "loss", *(g.name for g in gates)]
    assert [int(r[0]) for r in rows[1:]] == [1, 2, 3]
    traced = [float(v) for r in rows[1:] for v in r[2:]]
    assert traced == pytest.approx([tau for step in watcher.taus for tau in step], rel=1e-5)
    assert [float(r[1]) for r in rows[1:]] == pytest.approx(step_means, rel=1e-5)
    assert len({tuple(r[2:]) for r in rows[1:]}) == 3  # tau moved at every step


def test_no_trace_is_written_unless_asked(tmp_path):
    model = peft_model("lora")
    add_token_gates(model, CONFIG)
    lightning_trainer(tmp_path, max_steps=2).fit(LitRegression(model), DataLoader(Regression(), batch_size=2))
    assert not (tmp_path / TokenGateCallback.TRACE_FILENAME).exists()
