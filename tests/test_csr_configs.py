"""The Table 1 configs, composed as train.py composes them, match the paper (Tables 1 and 6, App. A.4)."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.helpers import REPO_ROOT
from tsft.config import CONFIG_DIR

TABLE1 = json.loads((REPO_ROOT / "results" / "paper" / "table1.json").read_text())
CSR_ROW = next(
    r for r in json.loads((REPO_ROOT / "results" / "paper" / "table6.json").read_text())["rows"] if r["task"] == "CSR"
)
METHODS = ("lora", "ts_lora", "dora", "ts_dora", "adalora", "ts_adalora")
LOGICAL = {"Q": "q", "K": "k", "V": "v", "O": "o", "Up": "up", "Down": "down", "Gate": "gate"}


@pytest.fixture(scope="module")
def composed():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        yield lambda overrides: OmegaConf.to_container(compose("train", overrides=overrides), resolve=True)


@pytest.mark.parametrize("method", METHODS)
def test_table1_experiment_matches_tables_1_and_6(composed, method):
    cfg = composed([f"experiment=table1_{method}"])
    peft, sparsity, paper = cfg["peft"], cfg["sparsity"], TABLE1["methods"][method.replace("_", "-")]
    assert (cfg["model"]["name"], cfg["task"]["name"], cfg["preset"]) == ("llama3.1-8b", "csr", "paper")
    assert peft["name"] == method.removeprefix("ts_")
    if peft["name"] == "adalora":
        assert (peft["init_r"], peft["target_r"]) == (64, CSR_ROW["rank"])  # section 4.2
    else:
        assert peft["r"] == CSR_ROW["rank"]
    assert (peft["scale"], peft["dropout"]) == (CSR_ROW["scale"], CSR_ROW["dropout"])
    assert peft["target_modules"] == [LOGICAL[t] for t in CSR_ROW["target"]]
    assert (cfg["optim"]["lr"], cfg["task"]["batch_size"], cfg["trainer"]["max_epochs"]) == (
        CSR_ROW["lr"],
        CSR_ROW["batch"],
        CSR_ROW["epochs"],
    )
    assert sparsity["enabled"] is method.startswith("ts_")
    if sparsity["enabled"]:
        assert (sparsity["lambda"], sparsity["s"]) == (paper["lambda"], 4e-5)
    assert (cfg["task"]["eval_mode"], cfg["task"]["eval_limit"], cfg["task"]["train_limit"]) == ("generate", None, None)


def test_plain_csr_command_is_the_paper_setting(composed):
    """`python train.py task=csr peft=dora sparsity=ts sparsity.lambda=1e-5`: TS-DoRA on LLaMA-3.1-8B, s = 4e-5."""
    cfg = composed(["task=csr", "peft=dora", "sparsity=ts", "sparsity.lambda=1e-5"])
    assert (cfg["model"]["name"], cfg["model"]["dtype"], cfg["model"]["gradient_checkpointing"]) == (
        "llama3.1-8b",
        "bfloat16",
        True,
    )
    assert (cfg["peft"]["name"], cfg["peft"]["use_dora"], cfg["peft"]["r"]) == ("dora", True, 32)
    assert (cfg["sparsity"]["lambda"], cfg["sparsity"]["s"]) == (1e-5, 4e-5)
    assert composed(["task=csr", "model=smollm2-135m"])["model"]["name"] == "smollm2-135m"


@pytest.mark.parametrize("method", METHODS)
def test_cpu_preset_keeps_the_method_and_shrinks_the_scale(composed, method):
    paper, cpu = composed([f"experiment=table1_{method}"]), composed([f"experiment=table1_cpu_{method}"])
    assert (cpu["model"]["name"], cpu["preset"], cpu["task"]["eval_mode"]) == ("smollm2-135m", "cpu", "loglik")
    assert cpu["peft"] == paper["peft"] and cpu["sparsity"] == paper["sparsity"]
    assert cpu["run_name"] == paper["run_name"].replace("llama3.1-8b", "smollm2-135m").replace("-paper", "-cpu")
