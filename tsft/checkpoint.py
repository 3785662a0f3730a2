"""Checks on ``ckpt_path`` made before anything is built: readable, written by tsft, and saved by a run with
the same settings. Lightning would otherwise fail deep inside fit with a long traceback or, when the shapes
happen to fit, quietly continue someone else's run under this run's name (another seed, lr or λ).

Every checkpoint tsft saves carries the settings that define its run (``run_settings``); a resume must ask
for the same ones, except those named in ``resume.allow_changes`` (recorded in result.json)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tsft import paths
from tsft.errors import InputError

SETTINGS_KEY = "tsft_settings"  # where PeftModule.on_save_checkpoint writes run_settings(cfg)
# What changes the run: the model, method, its sizes and targets, the gate, the data and its processing,
# the optimizer, the seed and the length of training. Not: where files go, logging, checkpoint cadence.
RUN_DEFINING = ("model", "peft", "sparsity", "selection", "task", "optim", "seed")
RUN_DEFINING_TRAINER = ("max_steps", "max_epochs", "accumulate_grad_batches", "precision", "gradient_clip_val")
SHOWN = 3  # differing keys named in the error line


def run_settings(cfg: DictConfig) -> dict[str, Any]:
    """The run-defining settings as dotted keys -> resolved values (plain data: checkpoints load weights_only)."""
    settings: dict[str, Any] = {}

    def flatten(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                flatten(f"{prefix}.{key}", value)
        else:
            settings[prefix] = node

    container = OmegaConf.to_container(cfg, resolve=True)
    for key in RUN_DEFINING:
        flatten(key, container.get(key))
    for key in RUN_DEFINING_TRAINER:
        settings[f"trainer.{key}"] = container["trainer"].get(key)
    return settings


def checked_checkpoint(cfg: DictConfig) -> tuple[str, dict[str, Any]] | tuple[None, None]:
    """(``cfg.ckpt_path`` resolved, the allowed changes as ``{key: [saved, now]}``), after the checks above;
    (None, None) without a checkpoint."""
    if cfg.ckpt_path is None:
        return None, None
    path = paths.resolve(cfg.ckpt_path)
    if not path.is_file():
        raise InputError(f"ckpt_path {path} does not exist; pass a .ckpt file from <run_dir>/checkpoints/")
    saved, now = _settings_in(path), run_settings(cfg)
    allowed = [str(k) for k in (cfg.get("resume") or {}).get("allow_changes") or []]
    changed = {k: [saved.get(k), now.get(k)] for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)}
    refused = {k: v for k, v in changed.items() if not any(k == a or k.startswith(f"{a}.") for a in allowed)}
    if refused:
        # names and switches first (peft.name, task.name, sparsity.enabled): the line leads with what changed
        keys = sorted(refused, key=lambda k: (not k.endswith((".name", ".enabled")), k))
        shown = ", ".join(f"{k} {refused[k][0]} -> {refused[k][1]}" for k in keys[:SHOWN])
        more = f" (and {len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
        raise InputError(
            f"ckpt_path {path} was saved by a run with other settings: {shown}{more}; resume with the settings "
            f"it was saved with (its run's config.yaml), or allow them with resume.allow_changes=[{keys[0]}]"
        )
    return str(path), changed


def _settings_in(path: Path) -> dict[str, Any]:
    reason = None
    try:
        # weights_only: a checkpoint is data, never code to run (Lightning loads it the same way)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # text, random bytes, a pickle of something else
        reason = "not a torch checkpoint file"
    except Exception as err:  # truncated zip archive, ...
        reason = str(err).strip().splitlines()[0][:80] if str(err).strip() else type(err).__name__
    if reason is not None:
        raise InputError(f"ckpt_path {path} is not a readable checkpoint ({reason}); pass a tsft last.ckpt")
    settings = checkpoint.get(SETTINGS_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(settings, dict):
        raise InputError(f"ckpt_path {path} was not saved by tsft (no '{SETTINGS_KEY}' entry); pass a tsft last.ckpt")
    return settings
