"""train.py from the command line: bad input is one line on stderr and leaves results/ untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tsft.errors import InputError
from tsft.pipeline import run

from .helpers import REPO_ROOT, compose_config, tiny_overrides


def train(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "train.py", f"hydra.run.dir={tmp_path / 'outputs'}", *overrides]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_unknown_group_option_is_one_line(tmp_path):
    out = train(tmp_path, "peft=lorra")
    assert out.returncode == 1
    assert out.stderr == "error: unknown peft 'lorra'; choose one of: adalora, adapter, dora, heads, lora\n"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lr=-1e-4"], "error: optim.lr must be > 0 (got -0.0001); set e.g. optim.lr=1e-4"),
        (["paths.data_dir=/nonexistent"], "error: GLUE RTE not found: no folder /nonexistent/glue/RTE and the hub"),
    ],
)
def test_bad_values_fail_before_training_in_one_line(tmp_path, overrides, message):
    results = tmp_path / "results"
    out = train(tmp_path, "model=tiny-bert", f"paths.results_dir={results}", *overrides)
    assert out.returncode == 1
    assert out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr
    assert not results.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["peft.target_modules=[q,up]"], "target module 'up' matches no module of model 'tiny-bert'"),
        (["peft=adalora", "peft.target_r=-2"], "peft.target_r must be a positive integer (got -2)"),
        (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path /nonexistent/last.ckpt does not exist"),
        (["task=glue/mrpc"], "GLUE MRPC not found"),
    ],
)
def test_bad_input_is_caught_before_anything_is_written(tmp_path, data_dir, overrides, message):
    cfg = compose_config([*tiny_overrides(tmp_path, data_dir), *overrides])
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        run(cfg)
    assert not (tmp_path / "results").exists()


def test_malformed_data_file_names_file_and_line(tmp_path, data_dir):
    train_file = data_dir / "glue" / "RTE" / "train.tsv"
    with open(train_file, "a") as f:
        f.write("99\tonly a premise\n")
    lines = train_file.read_text().count("\n")
    with pytest.raises(InputError, match=rf"{train_file} line {lines}: expected at least 4 tab-separated fields"):
        run(compose_config(tiny_overrides(tmp_path, data_dir)))
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_writes_one_run(tmp_path, data_dir):
    out = train(
        tmp_path,
        "model=tiny-bert",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_steps=4",
        "task.batch_size=4",
        "task.max_length=32",
        f"paths.data_dir={data_dir}",
        f"paths.results_dir={tmp_path / 'results'}",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (run_dir,) = (tmp_path / "results" / "runs" / "glue" / "rte").iterdir()  # one directory for both ranks
    assert (run_dir / "result.json").is_file()


def test_a_ts_run_prints_its_metrics_sparsity_and_thresholds(tmp_path, data_dir):
    out = train(tmp_path, *tiny_overrides(tmp_path, data_dir), "sparsity=ts", "sparsity.s=0.01")
    assert out.returncode == 0, out.stderr[-2000:]
    (run_dir,) = (tmp_path / "results" / "runs" / "glue" / "rte").iterdir()
    result = json.loads((run_dir / "result.json").read_text())
    taus = [module["tau"] for module in result["sparsity"]["modules"]]
    last_line = out.stdout.strip().splitlines()[-1]
    assert last_line.startswith(f"glue/rte ts-lora (tiny-bert): accuracy={result['metrics']['accuracy']:.4f}")
    assert f"sparsity={result['sparsity']['overall']:.3f}" in last_line
    assert f"tau in [{min(taus):.3g}, {max(taus):.3g}]" in last_line and max(taus) > 0
    assert last_line.endswith(f"-> {run_dir}/result.json")


def test_bf16_mixed_precision_trains_a_gated_run(tmp_path, data_dir):
    """The GPU trainer configs train under autocast (bf16-mixed); on CPU the same autocast runs the gates'
    backward with bf16 activations and float32 PEFT weights (AdaLoRA: also a float32 rank count)."""
    overrides = ["sparsity=ts", "sparsity.s=0.01", "peft=adalora", "trainer.precision=bf16-mixed"]
    out = train(tmp_path, *tiny_overrides(tmp_path, data_dir), *overrides)
    assert out.returncode == 0, out.stderr[-2000:]
    (run_dir,) = (tmp_path / "results" / "runs" / "glue" / "rte").iterdir()
    assert json.loads((run_dir / "result.json").read_text())["sparsity"]["modules"]
