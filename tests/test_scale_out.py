"""Scale-out (issue 19): external launchers share one run directory, FSDP2 through Lightning trains and resumes
a gated run, resume.auto continues a run's own checkpoint, submitit owns requeueing, a submitit_local grid runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import tsft.paths
import tsft.pipeline
from tsft.integrations.run_adapter import evaluate_run
from tsft.launch import Launch, current_launch, stable_run_name
from tsft.lit.stopping import RunStopped
from tsft.pipeline import run, trainer_arguments

from .gate.test_training import _loopback_carries_tcp
from .helpers import REPO_ROOT, compose_config, tiny_overrides
from .test_training import SignalAtStep, trained_tensors

needs_loopback = pytest.mark.skipif(not _loopback_carries_tcp(), reason="loopback is down: gloo ranks cannot connect")
CPU_RANKS = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


@pytest.fixture
def tiny(tmp_path, data_dir):
    def make(*overrides: str):
        return compose_config([*tiny_overrides(tmp_path, data_dir), *overrides])

    return make


def subprocess_env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo would resolve the hostname, which a sandbox may not map
    for key in [k for k in env if k.startswith(("SLURM_", "SUBMITIT_")) or k in ("RANK", "WORLD_SIZE")]:
        del env[key]  # the tests decide how a run was launched
    return env


# ------------------------------------------------------------------ how a run was launched
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, Launch()),
        ({"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "a1b2"}, Launch(1, 2, "a1b2")),
        ({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"},
         Launch(0, 2, "n1-29500")),
        ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_STEP_ID": "0"}, Launch(3, 8, "77.0")),
        ({"SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "4", "SLURM_NTASKS": "2",
          "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}, Launch(0, 2, "70_4.0")),
        ({"SLURM_JOB_ID": "79", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, Launch()),  # one task: Lightning spawns
    ],
)  # fmt: skip
def test_the_launch_is_read_from_the_environment(env, expected):
    assert current_launch(env) == expected
    assert current_launch(env).is_external == (expected.world_size > 1)


def test_the_auto_resume_name_is_a_function_of_the_run_defining_settings(tiny):
    base = "lora-tiny-bert-seed1"
    same = stable_run_name(tiny(), base)
    assert same == stable_run_name(tiny("trainer.enable_progress_bar=true", "checkpoint.every_n_train_steps=2"), base)
    assert same != stable_run_name(tiny("optim.lr=1e-3"), base) != stable_run_name(tiny("seed=2"), base)
    assert same.startswith(f"{base}-cfg") and len(same) == len(base) + 12


@needs_loopback
def test_torchrun_ranks_share_one_run_directory(tmp_path, data_dir):
    """Two processes started by torchrun (not by Lightning) each run train.py whole: one run directory, named from
    the launch, one set of records, one result.json."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    command += [*tiny_overrides(tmp_path, data_dir), "trainer=ddp", *CPU_RANKS, "task.batch_size=4"]
    out = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (tmp_path / "results" / "runs" / "glue" / "rte").iterdir()
    assert "-launch-" in run_dir.name and run_dir.name.startswith("lora-tiny-bert-seed1-")
    assert {p.name for p in run_dir.iterdir()} >= {"result.json", "config.yaml", "command.txt", "train.log"}
    assert json.loads((run_dir / "result.json").read_text())["scale"]["max_steps"] == 3


# ------------------------------------------------------------------ resume.auto and submitit's requeue
def test_resume_auto_continues_the_runs_own_checkpoint_then_skips_it(tiny, monkeypatch):
    settings = ["trainer.max_steps=-1", "trainer.max_epochs=2", "sparsity=ts", "sparsity.lambda=1e-3", "optim.lr=1e-2"]
    straight_dir, straight = run(tiny(*settings))
    build = tsft.pipeline.build_callbacks
    monkeypatch.setattr(tsft.pipeline, "build_callbacks", lambda c, d: [*build(c, d), SignalAtStep(2, signal.SIGTERM)])
    sigterm = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunStopped):
        run(tiny(*settings, "resume.auto=true"))
    signal.signal(signal.SIGTERM, sigterm)
    monkeypatch.undo()
    (stopped_dir,) = [d for d in straight_dir.parent.iterdir() if d != straight_dir]
    assert "-cfg" in stopped_dir.name and not (stopped_dir / "result.json").exists()

    resumed_dir, resumed = run(tiny(*settings, "resume.auto=true"))  # the same command again
    assert resumed_dir == stopped_dir and resumed["resume"]["ckpt_path"].startswith(str(stopped_dir))
    expected, actual = (trained_tensors(d / "checkpoints" / "last.ckpt") for d in (straight_dir, resumed_dir))
    assert expected.keys() == actual.keys() and any(k.endswith("token_gate.tau") for k in expected)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert resumed["metrics"] == straight["metrics"]

    again_dir, again = run(tiny(*settings, "resume.auto=true"))  # finished: returned, not trained again
    assert again_dir == resumed_dir and again == resumed


def test_submitit_signal_checkpoints_first_then_submitit_requeues(tiny, monkeypatch):
    """Under submitit its USR2 stops training at a batch boundary with last.ckpt; submitit's own handler (which
    requeues the job) is called after that, once; Lightning's SLURM auto-requeue is off; the requeued run resumes."""
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "42", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "tsft"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    (plugin,) = trainer_arguments(tiny())["plugins"]
    assert type(plugin).__name__ == "SLURMEnvironment" and plugin.auto_requeue is False

    calls, cfg = [], tiny()
    runs_dir = tsft.paths.task_runs_dir(cfg.paths, cfg.task.name)

    def submitit_handler(signum, frame):  # stands in for submitit's checkpoint_and_try_requeue
        steps = [torch.load(c, weights_only=True)["global_step"] for c in runs_dir.glob("*/checkpoints/last.ckpt")]
        calls.append((signum, steps))

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    build = tsft.pipeline.build_callbacks
    monkeypatch.setattr(tsft.pipeline, "build_callbacks", lambda c, d: [*build(c, d), SignalAtStep(2, signal.SIGUSR2)])
    try:
        with pytest.raises(RunStopped) as stopped:
            run(tiny("trainer.max_steps=6"))
    finally:
        monkeypatch.setattr(tsft.pipeline, "build_callbacks", build)
    assert signal.getsignal(signal.SIGUSR2) is submitit_handler  # handed back
    signal.signal(signal.SIGUSR2, previous)
    assert calls == [(signal.SIGUSR2, [2])]  # once, after the step-2 checkpoint
    assert str(stopped.value).startswith("SIGUSR2 stopped training after step 2")
    assert stopped.value.exit_status == 128 + signal.SIGUSR2

    run_dir, result = run(tiny("trainer.max_steps=6"))  # the requeued job: resume.auto is implied under submitit
    assert result["resume"]["ckpt_path"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_submitit_local_runs_a_grid_of_two(tmp_path, data_dir):
    command = [sys.executable, "train.py", "-m", "hydra/launcher=local", "seed=1,2", f"hydra.sweep.dir={tmp_path}/mr"]
    command += [*tiny_overrides(tmp_path, data_dir), "trainer.max_steps=2"]
    out = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = sorted((tmp_path / "results" / "runs" / "glue" / "rte").glob("*/result.json"))
    assert [json.loads(r.read_text())["seed"] for r in results] == [1, 2]
    assert list((tmp_path / "mr" / ".submitit").iterdir())  # the jobs went through submitit


# ------------------------------------------------------------------ FSDP2 through Lightning
@pytest.mark.slow
@needs_loopback
def test_fsdp_on_two_cpu_ranks_trains_and_resumes_a_gated_run_exactly(tmp_path, data_dir):
    """trainer=fsdp (FSDP2, one shard unit per transformer block) on 2 gloo ranks: a run stopped by SIGTERM after its
    first checkpoint and resumed ends bit-identical to a straight run, thresholds included (float32)."""
    steps = 40
    common = [sys.executable, "train.py", *tiny_overrides(tmp_path, data_dir), "trainer=fsdp", *CPU_RANKS]
    common += ["task.batch_size=4", "sparsity=ts", "sparsity.s=0.01", "trainer.max_epochs=-1"]
    common += [f"trainer.max_steps={steps}", "checkpoint.every_n_train_steps=5"]
    runs = tmp_path / "results" / "runs" / "glue" / "rte"

    def train(*overrides, stop_after_first_checkpoint=False):
        process = subprocess.Popen(
            [*common, *overrides], cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        if stop_after_first_checkpoint:
            deadline = time.monotonic() + 300
            while not list(runs.glob("stopped-*/checkpoints/last.ckpt")) and process.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=600)
        return process.returncode, err.decode()[-3000:]

    assert train("run_name=straight")[0] == 0
    status, err = train("run_name=stopped", stop_after_first_checkpoint=True)
    assert status == 128 + signal.SIGTERM, err
    (stopped,) = runs.glob("stopped-*")
    stopped_at = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 5 <= stopped_at < steps
    status, err = train("run_name=stopped", f"ckpt_path={stopped}/checkpoints/last.ckpt")
    assert status == 0, err
    (straight,) = runs.glob("straight-*")
    expected, actual = (trained_tensors(d / "checkpoints" / "last.ckpt") for d in (straight, stopped))
    taus = [k for k in expected if k.endswith("token_gate.tau")]
    assert len(taus) == 10 and all(expected[k].dtype == torch.float32 and float(expected[k]) > 0 for k in taus)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    # the adapter the sharded run left (gathered from the shards) gives its evaluation again in one process
    assert evaluate_run(stopped) == json.loads((stopped / "result.json").read_text())["metrics"]
