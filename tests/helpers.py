"""Helpers for the foundation tests: config composition, real-data location, small GLUE files."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tsft.config import CONFIG_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real data: TSFT_DATA_DIR, else ../shared/data beside the repository (as on CI).
SHARED_DATA = Path(os.environ.get("TSFT_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")
needs_shared_glue = pytest.mark.skipif(
    not (SHARED_DATA / "glue").is_dir(), reason=f"no real GLUE data at {SHARED_DATA}/glue"
)


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RTE_HEADER = "index\tsentence1\tsentence2\tlabel"


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="train", overrides=overrides)


def write_rte(task_dir: Path, train_rows: int = 32, dev_rows: int = 16) -> Path:
    """An RTE-format folder whose label is given away by the hypothesis (learnable in a few steps)."""
    task_dir.mkdir(parents=True, exist_ok=True)
    for name, count in (("train.tsv", train_rows), ("dev.tsv", dev_rows)):
        lines = [RTE_HEADER]
        for i in range(count):
            entailed = i % 2 == 0
            hypothesis = "the cat is sleeping" if entailed else "no dog ever barks here"
            label = "entailment" if entailed else "not_entailment"
            lines.append(f"{i}\tThe cat on the mat is asleep, says report {i}.\t{hypothesis}\t{label}")
        (task_dir / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return task_dir


def tiny_overrides(tmp_path: Path, data_dir: Path) -> list[str]:
    """A tiny-bert run on ``data_dir`` that writes only under ``tmp_path`` and takes seconds."""
    return [
        "model=tiny-bert",
        "task=glue/rte",
        f"paths.data_dir={data_dir}",
        f"paths.results_dir={tmp_path / 'results'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "task.max_length=32",
        "task.batch_size=8",
        "task.eval_batch_size=16",
        "trainer.max_steps=3",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
    ]
