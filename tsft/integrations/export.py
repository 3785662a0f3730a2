"""Save a gated model as its adapter (peft's own format) plus the gate state beside it, and load both back.

    save_gated_model(peft_model, "out/")          # adapter_config.json + adapter_model.safetensors + token_gates.json
    model = load_gated_model(base_model, "out/")  # same predictions as before saving

Parallel Adapters (not a peft method) are saved as ``tsft_adapter.json`` + ``adapter_model.safetensors``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tsft.gate.adapter import ParallelAdapterLayer, adapter_state_dict, add_parallel_adapters
from tsft.gate.attach import add_token_gates, find_token_gates
from tsft.gate.config import GateConfig
from tsft.gate.gate import TokenGate

GATE_FILE = "token_gates.json"
ADAPTER_SETTINGS_FILE = "tsft_adapter.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PathLike = Union[str, os.PathLike]


def save_gate_state(model: nn.Module, directory: PathLike) -> Path:
    """Write every gate's tau (and Adam moments, to resume) with the gate settings to ``token_gates.json``."""
    gates = find_token_gates(model)
    if not gates:
        raise ValueError("the model has no token gates to save")
    state = {
        "format": "tsft-token-gates",
        "version": 1,
        "config": gates[0].config.to_dict(),
        "gates": {g.name: {b: float(getattr(g, b)) for b in TokenGate.STATE} for g in gates},
    }
    path = Path(directory) / GATE_FILE
    _write_atomically(path, json.dumps(state, indent=1))
    return path


def load_gate_state(model: nn.Module, directory: PathLike) -> list:
    """Gate ``model`` (if it is not yet) with the saved settings and restore every gate's state."""
    path = Path(directory) / GATE_FILE
    state: dict[str, Any] = json.loads(path.read_text())
    gates = find_token_gates(model) or add_token_gates(
        model, GateConfig.from_mapping(state["config"]), only=state["gates"].keys()
    )
    by_name = {g.name: g for g in gates}
    if by_name.keys() != state["gates"].keys():
        missing, extra = state["gates"].keys() - by_name.keys(), by_name.keys() - state["gates"].keys()
        raise ValueError(
            f"{path} does not fit this model: saved-only gates {sorted(missing)}, model-only {sorted(extra)}"
        )
    with torch.no_grad():
        for name, values in state["gates"].items():
            for buffer, value in values.items():
                getattr(by_name[name], buffer).fill_(value)
    return gates


def save_gated_model(model: nn.Module, directory: PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The adapter in peft's format (or tsft's, for Parallel Adapters) and the gate state beside it.
    ``state_dict``: the model's entries to save instead of reading them from the model (gathered from shards)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    adapters = [(n, m) for n, m in model.named_modules() if isinstance(m, ParallelAdapterLayer)]
    if adapters:
        first = adapters[0][1]
        settings = {
            "target_modules": [n for n, _ in adapters],
            "hidden_size": first.adapter_down.out_features,
            "scale": first.scale,
            "activation": first.activation_name,
            "dropout": first.dropout_rate,
        }
        _write_atomically(directory / ADAPTER_SETTINGS_FILE, json.dumps(settings, indent=1))
        weights = adapter_state_dict(model) if state_dict is None else state_dict
        save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / ADAPTER_WEIGHTS_FILE))
    elif hasattr(model, "save_pretrained") and hasattr(model, "peft_config"):
        model.save_pretrained(str(directory), state_dict=state_dict)
    else:
        raise TypeError("save_gated_model expects a peft model or a model with tsft Parallel Adapters")
    if find_token_gates(model):
        save_gate_state(model, directory)


def load_gated_model(base_model: nn.Module, directory: PathLike) -> nn.Module:
    """Rebuild what ``save_gated_model`` wrote on top of a fresh ``base_model``."""
    directory = Path(directory)
    if (directory / ADAPTER_SETTINGS_FILE).exists():
        settings = json.loads((directory / ADAPTER_SETTINGS_FILE).read_text())
        for p in base_model.parameters():
            p.requires_grad_(False)
        add_parallel_adapters(base_model, **settings)
        missing = base_model.load_state_dict(load_file(str(directory / ADAPTER_WEIGHTS_FILE)), strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"adapter weights do not fit the model: {missing.unexpected_keys[:5]}")
        model = base_model
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base_model, str(directory))
        inner = getattr(model, "base_model", None)
        if hasattr(inner, "rankallocator") or type(inner).__name__ == "AdaLoraModel":
            # peft's AdaLoraModel.forward adds its orthogonal regularisation to any loss and reads the trainable
            # adapter's name for it, which a model loaded for inference lacks: name the loaded one
            inner.__dict__.setdefault("trainable_adapter_name", model.active_adapter)
    if (directory / GATE_FILE).exists():
        load_gate_state(model, directory)
    return model


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)
