"""What a run directory holds besides result.json: the composed config, the command line and the log.

Hydra is set to write nothing of its own for a single run (configs/train.yaml), so these live with the
run they describe, and a run refused before its directory exists leaves nothing behind.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONFIG_FILE = "config.yaml"
COMMAND_FILE = "command.txt"
LOG_FILE = "train.log"
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def command_line() -> list[str] | None:
    """``train.py`` and the overrides it was given, when Hydra started this run (None otherwise)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return ["python", "train.py", *HydraConfig.get().overrides.task]


def record_inputs(cfg: DictConfig, run_dir: Path) -> None:
    """config.yaml (resolved, as the run used it) and command.txt, so the run can be repeated."""
    (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    command = command_line()
    if command is not None:
        (run_dir / COMMAND_FILE).write_text(shlex.join(command) + "\n")


@contextmanager
def log_to_run_dir(run_dir: Path) -> Iterator[None]:
    """Everything logged while the run trains also goes to <run_dir>/train.log (appended on resume)."""
    handler = logging.FileHandler(run_dir / LOG_FILE)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root, ours = logging.getLogger(), logging.getLogger("tsft")
    level = ours.level
    if ours.getEffectiveLevel() > logging.INFO:  # outside Hydra (tests, notebooks) the root logs warnings only
        ours.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        ours.setLevel(level)
