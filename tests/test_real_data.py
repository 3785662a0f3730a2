"""Slow (`make test-slow`): the real MiniLM-L6 fine-tuned on the real SST-2 files (the quickstart) in ../shared/data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .helpers import REPO_ROOT, SHARED_DATA, needs_shared_glue


@pytest.mark.slow
@needs_shared_glue
def test_minilm_ts_lora_on_real_sst2_writes_accuracy_and_sparsity(tmp_path):
    env = {**os.environ, "TSFT_DATA_DIR": str(SHARED_DATA), "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "train.py",
        "experiment=quickstart",
        "trainer.max_steps=10",
        "task.eval_limit=100",
        f"paths.results_dir={tmp_path / 'results'}",
        f"hydra.run.dir={tmp_path / 'outputs'}",
        "trainer.enable_progress_bar=false",
    ]
    out = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    (result_file,) = (tmp_path / "results" / "runs" / "glue" / "sst2").glob("*/result.json")
    result = json.loads(result_file.read_text())
    assert result["preset"] == "custom" and result["scale"]["train_examples"] == 67349
    assert result["scale"] == {**result["scale"], "max_steps": 10, "eval_examples": 100, "max_length": 64}
    accuracy = result["metrics"]["accuracy"]
    assert 0 <= accuracy <= 1 and abs(accuracy * 100 - round(accuracy * 100)) < 1e-4  # k correct of 100
    assert f"accuracy={accuracy:.4f}" in out.stdout
    assert result["method"] == "ts-lora" and 0 <= result["sparsity"]["overall"] <= 1
    assert f"sparsity={result['sparsity']['overall']:.3f}" in out.stdout
