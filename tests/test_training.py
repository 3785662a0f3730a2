"""Whole runs of a tiny model: result.json, learning, unique names, interruption, exact resume."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

import tsft.paths
import tsft.pipeline
from tsft.errors import InputError
from tsft.lit.stopping import RunStopped
from tsft.pipeline import run

from .helpers import compose_config, tiny_overrides
from .test_glue_data import MNLI_DEV_HEADER, MNLI_TRAIN_HEADER, mnli_row


@pytest.fixture
def tiny(tmp_path, data_dir):
    def make(*overrides: str):
        return compose_config([*tiny_overrides(tmp_path, data_dir), *overrides])

    return make


def test_result_json_follows_the_contract(tiny):
    run_dir, result = run(tiny("seed=7"))
    assert run_dir.parent.name == "rte" and run_dir.name.startswith("lora-tiny-bert-seed7-")
    on_disk = json.loads((run_dir / "result.json").read_text())
    assert on_disk == result
    assert {k: result[k] for k in ("task", "family", "model", "peft", "ts", "method", "lambda", "seed", "preset")} == {
        "task": "glue/rte",
        "family": "glue",
        "model": "tiny-bert",
        "peft": "lora",
        "ts": False,
        "method": "lora",
        "lambda": None,
        "seed": 7,
        "preset": "custom",
    }
    assert set(result["metrics"]) == {"accuracy"} and result["score"] == 100 * result["metrics"]["accuracy"]
    # 16 dev rows: accuracy is a multiple of 1/16
    assert (result["metrics"]["accuracy"] * 16).is_integer()
    assert result["scale"] == {
        "model": "tiny-bert",
        "train_examples": 32,
        "max_steps": 3,
        "epochs": 0.75,
        "max_length": 32,
        "eval_examples": 16,
    }
    assert result["sparsity"] is None and result["config"]["seed"] == 7
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "logs" / "version_0" / "metrics.csv").is_file()
    # the composed config and the log live with the run (Hydra writes nothing of its own)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == 7
    assert "result: glue/rte lora (tiny-bert): accuracy=" in (run_dir / "train.log").read_text()


def test_training_learns_a_learnable_task(tiny):
    # The hypothesis gives the label away; the frozen random backbone still separates the two.
    _, before = run(tiny("trainer.max_steps=1", "optim.lr=1e-9"))
    _, after = run(tiny("trainer.max_steps=40", "optim.lr=3e-2", "optim.warmup_ratio=0"))
    assert before["metrics"]["accuracy"] <= 0.75
    assert after["metrics"]["accuracy"] == 1.0


def test_stsb_regression_reports_pearson_and_spearman(tmp_path, tiny):
    stsb = tmp_path / "data" / "glue" / "STS-B"
    stsb.mkdir(parents=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    rows = [f"{i}\tmain\tx\t2012\t{i}\tnone\tnone\tA man plays {i}.\tHe plays {i % 3}.\t{i % 6}.000" for i in range(24)]
    for name in ("train.tsv", "dev.tsv"):
        (stsb / name).write_text("\n".join([header, *rows]) + "\n")
    _, result = run(tiny("task=glue/stsb", "task.max_length=32", "task.batch_size=8"))
    assert set(result["metrics"]) == {"pearson", "spearman"}
    assert -1 <= result["metrics"]["pearson"] <= 1 and result["score"] == 100 * result["metrics"]["pearson"]


def write_mnli(folder, files=("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv")) -> None:
    labels = ["entailment", "neutral", "contradiction"]
    for name in files:
        dev = name != "train.tsv"
        header = MNLI_DEV_HEADER if dev else MNLI_TRAIN_HEADER
        rows = [mnli_row(i, f"Premise {i}.", f"Hypothesis {i % 3}.", labels[i % 3], dev) for i in range(12)]
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("\n".join([header, *rows]) + "\n")


def test_mnli_evaluates_matched_and_mismatched(tmp_path, tiny):
    write_mnli(tmp_path / "data" / "glue" / "MNLI")
    _, result = run(tiny("task=glue/mnli", "task.max_length=32", "task.batch_size=4", "checkpoint.enabled=false"))
    assert set(result["metrics"]) == {"accuracy_matched", "accuracy_mismatched"}
    assert result["score"] == 100 * result["metrics"]["accuracy_matched"]
    assert result["scale"]["eval_examples"] == 24


def test_mnli_without_its_mismatched_file_evaluates_matched_only(tmp_path, tiny):
    write_mnli(tmp_path / "data" / "glue" / "MNLI", files=("train.tsv", "dev_matched.tsv"))
    _, result = run(tiny("task=glue/mnli", "task.max_length=32", "task.batch_size=4", "checkpoint.enabled=false"))
    assert set(result["metrics"]) == {"accuracy_matched"} and result["scale"]["eval_examples"] == 12


def test_malformed_rows_are_skipped_and_counted_when_asked(tiny, data_dir):
    with open(data_dir / "glue" / "RTE" / "train.tsv", "a") as f:
        f.write("98\tonly a premise\n99\ta\tb\tmaybe\n")
    with pytest.raises(InputError, match="line 34: expected at least 4 tab-separated fields"):
        run(tiny())
    _, result = run(tiny("task.skip_malformed_rows=true"))
    assert result["skipped_rows"] == {"train.tsv": 2, "dev.tsv": 0} and result["scale"]["train_examples"] == 32


def test_identical_runs_never_share_a_directory(tiny):
    first, _ = run(tiny("checkpoint.enabled=false"))
    second, _ = run(tiny("checkpoint.enabled=false"))
    assert first != second and first.parent == second.parent
    assert (first / "result.json").is_file() and (second / "result.json").is_file()


def test_skip_existing_returns_the_finished_run_of_a_named_configuration(tiny):
    first_dir, first = run(tiny("run_name=grid-cell", "checkpoint.enabled=false"))
    again_dir, again = run(tiny("run_name=grid-cell", "checkpoint.enabled=false", "skip_existing=true"))
    assert (again_dir, again) == (first_dir, first)
    assert len(list(first_dir.parent.iterdir())) == 1
    rerun_dir, _ = run(tiny("run_name=grid-cell", "checkpoint.enabled=false"))
    assert rerun_dir != first_dir and rerun_dir.name.startswith("grid-cell-")


class StopAfterEpoch(Callback):
    """Ctrl-C once an epoch is over and its checkpoint saved (as the next one starts)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch + 1:
            raise KeyboardInterrupt


@pytest.fixture
def interrupt_after_epoch(monkeypatch):
    """Make the next run stop like a Ctrl-C after the given epoch."""
    build = tsft.pipeline.build_callbacks
    sigint = signal.getsignal(signal.SIGINT)

    def arm(epoch: int) -> None:
        monkeypatch.setattr(
            tsft.pipeline, "build_callbacks", lambda cfg, run_dir: [*build(cfg, run_dir), StopAfterEpoch(epoch)]
        )

    yield arm
    signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT after an interrupt


def test_interrupted_run_leaves_no_result(tiny, tmp_path, interrupt_after_epoch):
    interrupt_after_epoch(0)
    with pytest.raises(SystemExit):  # Lightning ends the process on Ctrl-C
        run(tiny("trainer.max_steps=-1", "trainer.max_epochs=2"))
    run_dirs = list((tmp_path / "results" / "runs" / "glue" / "rte").iterdir())
    assert len(run_dirs) == 1 and not (run_dirs[0] / "result.json").exists()
    assert (run_dirs[0] / "checkpoints" / "last.ckpt").is_file()


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tiny, tmp_path, monkeypatch):
    def fail_in_fit(*args, **kwargs):
        raise RuntimeError("out of memory in the first step")

    monkeypatch.setattr(tsft.pipeline.L.Trainer, "fit", fail_in_fit)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(tiny())
    assert list((tmp_path / "results" / "runs" / "glue" / "rte").iterdir()) == []


def trained_tensors(ckpt_path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt_path, weights_only=False)["state_dict"]


@pytest.mark.parametrize("peft", ["lora", "adalora", "ts-lora"])
def test_resume_from_checkpoint_continues_exactly(tiny, peft, monkeypatch, interrupt_after_epoch):
    # 32 examples / batch 8 = 4 steps per epoch; dropout is on, so the RNG state must be restored too.
    settings = ["trainer.max_steps=-1", "trainer.max_epochs=2", "peft.dropout=0.3", "optim.lr=1e-2"]
    if peft == "ts-lora":
        pytest.importorskip("tsft.integrations.lightning")
        settings += ["peft=lora", "sparsity=ts", "sparsity.lambda=1e-3"]  # thresholds and their moments
    else:
        settings += [f"peft={peft}"]
    if peft == "adalora":
        settings += ["peft.deltaT=1", "peft.tfinal_ratio=0.25"]  # reallocates ranks every step
    straight_dir, straight = run(tiny(*settings))

    interrupt_after_epoch(0)
    with pytest.raises(SystemExit):
        run(tiny(*settings))
    monkeypatch.undo()
    (interrupted_dir,) = [d for d in straight_dir.parent.iterdir() if d != straight_dir]
    resumed_dir, resumed = run(tiny(*settings, f"ckpt_path={interrupted_dir}/checkpoints/last.ckpt"))

    assert resumed_dir == interrupted_dir  # a resumed run finishes in its own directory
    expected = trained_tensors(straight_dir / "checkpoints" / "last.ckpt")
    actual = trained_tensors(resumed_dir / "checkpoints" / "last.ckpt")
    assert expected.keys() == actual.keys() and any("lora_B" in k for k in expected)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert resumed["metrics"] == straight["metrics"]
    if peft == "ts-lora":
        assert any(key.endswith("token_gate.tau") for key in expected)
    if peft == "adalora":
        ckpt = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=False)
        kept = [sum(mask) for mask in ckpt["adalora"]["rank_pattern"].values()]
        assert sum(kept) < 6 * len(kept)  # ranks were pruned below init_r


class SignalAtStep(Callback):
    """Send this process ``signum`` once the given optimizer step is done (a scheduler's SIGTERM, a Ctrl-C)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.fixture
def signal_at_step(monkeypatch):
    build = tsft.pipeline.build_callbacks
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def arm(step: int, signum: int) -> None:
        monkeypatch.setattr(
            tsft.pipeline, "build_callbacks", lambda cfg, run_dir: [*build(cfg, run_dir), SignalAtStep(step, signum)]
        )

    yield arm
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize(
    ("peft", "signum"),
    [("lora", signal.SIGTERM), ("ts-lora", signal.SIGTERM), ("dora", signal.SIGTERM), ("adalora", signal.SIGTERM),
     ("adapter", signal.SIGTERM), ("lora", signal.SIGINT)],
)  # fmt: skip
def test_a_signal_mid_epoch_saves_a_checkpoint_that_resumes_exactly(tiny, peft, signum, monkeypatch, signal_at_step):
    # 4 steps an epoch, 2 epochs; the signal comes after step 2, in the middle of epoch 0
    settings = ["trainer.max_steps=-1", "trainer.max_epochs=2", "peft.dropout=0.3", "optim.lr=1e-2"]
    settings += ["peft=lora", "sparsity=ts", "sparsity.lambda=1e-3"] if peft == "ts-lora" else [f"peft={peft}"]
    if peft == "adalora":
        settings += ["peft.deltaT=1", "peft.tfinal_ratio=0.25"]
    straight_dir, straight = run(tiny(*settings))

    signal_at_step(2, signum)
    with pytest.raises(RunStopped) as stopped:
        run(tiny(*settings))
    monkeypatch.undo()
    (stopped_dir,) = [d for d in straight_dir.parent.iterdir() if d != straight_dir]
    name = signal.Signals(signum).name
    assert (
        str(stopped.value)
        == f"{name} stopped training after step 2; resume with ckpt_path={stopped_dir}/checkpoints/last.ckpt"
    )
    assert stopped.value.exit_status == 128 + signum and not (stopped_dir / "result.json").exists()
    assert torch.load(stopped_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2

    resumed_dir, resumed = run(tiny(*settings, f"ckpt_path={stopped_dir}/checkpoints/last.ckpt"))
    expected = trained_tensors(straight_dir / "checkpoints" / "last.ckpt")
    actual = trained_tensors(resumed_dir / "checkpoints" / "last.ckpt")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert resumed["metrics"] == straight["metrics"]


def test_training_ends_with_a_checkpoint_whatever_the_save_interval(tiny):
    run_dir, _ = run(tiny("trainer.max_steps=7", "trainer.max_epochs=-1", "checkpoint.every_n_train_steps=3"))
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7


def test_token_gates_are_attached_when_sparsity_is_on(tiny):
    pytest.importorskip("tsft.integrations.lightning")
    run_dir, result = run(tiny("sparsity=ts", "sparsity.lambda=1e-3", "trainer.max_steps=4"))
    assert result["method"] == "ts-lora" and result["ts"] is True and result["lambda"] == 1e-3
    assert run_dir.name.startswith("ts-lora-tiny-bert-lam0.001-seed1-")
    report = result["sparsity"]
    assert 0.0 <= report["overall"] <= 1.0
    assert len(report["modules"]) == 2 * 5  # one gate per LoRA layer: 2 layers x q,k,v,o,i


def test_wandb_logs_offline_without_an_account(tiny, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir, _ = run(tiny("logger=wandb", "trainer.max_steps=1", "checkpoint.enabled=false"))
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_progress_bar_counts_the_planned_optimizer_steps(tiny, monkeypatch):
    # 32 train rows / batch 8 = 4 batches an epoch; 6 steps span two epochs. Lightning's own bar
    # would show 4 (the epoch's batches) and restart at 0 in epoch 1.
    seen = []

    class Recording(tsft.pipeline.StepProgressBar):
        def on_train_end(self, trainer, pl_module):
            seen.append((self.train_progress_bar.n, self.train_progress_bar.total))
            super().on_train_end(trainer, pl_module)

    monkeypatch.setattr(tsft.pipeline, "StepProgressBar", Recording)
    run(tiny("trainer.max_steps=6", "trainer.enable_progress_bar=true", "checkpoint.enabled=false"))
    assert seen == [(6, 6)]


@pytest.mark.parametrize("task_name", ["../../escaped", "/tmp/abs_escape"])
def test_a_task_name_cannot_lead_a_run_out_of_the_results_dir(tiny, tmp_path, task_name):
    with pytest.raises(tsft.pipeline.InputError, match="must be a relative name such as glue/rte"):
        run(tiny(f"task.name={task_name}"))
    assert not (tmp_path / "escaped").exists() and not list((tmp_path / "results").glob("**/*.json"))


def test_create_run_dir_refuses_a_name_that_leaves_its_parent(tmp_path):
    with pytest.raises(ValueError, match="would not be inside"):
        tsft.paths.create_run_dir(tmp_path / "runs" / "rte", "../../outside")
    assert not (tmp_path / "outside").exists() and not (tmp_path / "runs").exists()


def test_a_resume_may_change_only_the_settings_it_names(tiny):
    first_dir, _ = run(tiny("trainer.max_steps=-1", "trainer.max_epochs=1"))
    resume = ["trainer.max_steps=-1", "trainer.max_epochs=2", f"ckpt_path={first_dir / 'checkpoints' / 'last.ckpt'}"]
    with pytest.raises(InputError, match=r"other settings: trainer.max_epochs 1 -> 2;"):
        run(tiny(*resume))
    _, result = run(tiny(*resume, "resume.allow_changes=[trainer.max_epochs]"))
    assert result["resume"]["allowed_changes"] == {"trainer.max_epochs": [1, 2]}
    assert result["scale"]["epochs"] == 2
