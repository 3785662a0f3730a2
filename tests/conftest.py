"""Test-wide settings: offline, single-threaded (the 2 cores are shared), small real-format data."""

from __future__ import annotations

import os

# Tests never touch the network: the hub is unreachable here and its retries cost ~25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402

from .helpers import write_rte  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def data_dir(tmp_path):
    """A data dir holding glue/RTE in the real layout (small synthetic rows)."""
    root = tmp_path / "data"
    write_rte(root / "glue" / "RTE")
    return root
