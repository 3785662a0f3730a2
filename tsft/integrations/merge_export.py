"""Merge-aware export: turn a gated model's sparsity into inference speed where a gate's decision is settled.

A TS run's gate on module m applies the update to a share of the tokens. Where that share is (nearly) all of
them, the gate only costs time: the update can be folded into the frozen weight, W0 + s B A, as dense LoRA is
merged. Where it is (nearly) none, the update can be dropped. Only the modules in between keep their gate.

    model, tokenizer, cfg = load_run(run_dir); evaluate_model(model, tokenizer, cfg)   # counts each gate's tokens
    plan = plan_export(model)                      # per gated module: merge / drop / dense / gate
    write_export(model, tokenizer, plan, "out/")   # out/base (a transformers model) + out/adapter (the rest)
    model = load_export("out/")                    # base with merged weights, remaining gates on top

Actions, with the on-share ``p`` of a module measured on the evaluation data (1 - its Eq. 21 sparsity):

- ``merge`` (p >= merge_at, LoRA / DoRA / AdaLoRA): W0 <- the weight peft's merge gives (DoRA's magnitude
  included); the module becomes its plain base layer.
- ``dense`` (p >= merge_at, Parallel Adapter): its branch is non-linear and cannot be folded into W0, so it stays,
  ungated (no norms, no threshold test).
- ``drop`` (p <= drop_at): the module becomes its plain base layer; the update is gone.
- ``gate``: unchanged.

Each merged module now updates the (1 - p) share of tokens it skipped, each dropped one skips the p it updated;
``changed_decisions`` reports that share over all (module, token) pairs, and the export's score is measured,
not assumed (``scripts/export.py`` evaluates before and after on the run's dev data).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from torch import nn

from tsft.gate.adapter import ParallelAdapterLayer
from tsft.gate.attach import find_token_gates, ungate
from tsft.integrations.export import _write_atomically, load_gated_model, save_gated_model

PLAN_FILE = "export.json"
BASE_SUBDIR, ADAPTER_SUBDIR = "base", "adapter"
PEFT_PREFIX = "base_model.model."  # a peft model's module names, relative to the transformers model it wraps


@dataclass
class ModuleAction:
    name: str  # the gate's (module's) name in the gated model
    on_share: Optional[float]  # share of real evaluation tokens whose update was applied; None: counted none
    action: str  # merge | dense | drop | gate

    @property
    def changed_share(self) -> float:
        """Share of this module's tokens whose update the action changes (applied <-> skipped)."""
        if self.on_share is None or self.action == "gate":
            return 0.0
        return 1.0 - self.on_share if self.action in ("merge", "dense") else self.on_share


def plan_export(model: nn.Module, merge_at: float = 0.995, drop_at: float = 0.005) -> list[ModuleAction]:
    """Decide per gated module from the evaluation tokens its gate counted since the last reset."""
    if not 0.0 <= drop_at <= merge_at <= 1.0:  # merge is decided first, so equal thresholds are fine
        raise ValueError(f"need 0 <= drop_at <= merge_at <= 1 (got drop_at={drop_at}, merge_at={merge_at})")
    gates = find_token_gates(model)
    if not gates:
        raise ValueError("the model has no token gates: a dense adapter is merged with peft's merge_and_unload")
    plan = []
    for gate in gates:
        sparsity = gate.sparsity("eval")
        on = None if sparsity is None else 1.0 - sparsity
        host = model.get_submodule(gate.name)
        if on is None:
            action = "gate"  # no evidence either way: keep it as trained
        elif on >= merge_at:
            action = "dense" if isinstance(host, ParallelAdapterLayer) else "merge"
        elif on <= drop_at:
            action = "drop"
        else:
            action = "gate"
        plan.append(ModuleAction(gate.name, on, action))
    return plan


def apply_export_plan(model: nn.Module, plan: list[ModuleAction]) -> nn.Module:
    """Carry out ``plan`` in place: merged and dropped modules become their base layers, dense ones lose the gate."""
    for step in plan:
        if step.action == "gate":
            continue
        host = model.get_submodule(step.name)
        ungate(host)
        if step.action == "merge":
            host.merge(safe_merge=True)  # peft's own merge: DoRA's magnitude and AdaLoRA's E included
        if step.action in ("merge", "drop"):
            _replace(model, step.name, host.get_base_layer())
    return model


def changed_decisions(plan: list[ModuleAction]) -> float:
    """Share of (module, evaluation token) pairs whose update the export applies differently from the gate."""
    measured = [step for step in plan if step.on_share is not None]
    return sum(step.changed_share for step in measured) / len(measured) if measured else 0.0


def write_export(
    model: nn.Module, tokenizer: Any, plan: list[ModuleAction], directory: Path, record: dict[str, Any]
) -> Path:
    """Apply ``plan`` and write ``directory``: ``base/`` (the transformers model with the merged weights and the
    trained heads, and the tokenizer), ``adapter/`` (the modules still gated or dense, if any) and ``export.json``
    (the plan, ``record`` and how to load it). The in-memory model is consumed (unloaded into ``base``)."""
    directory, record = Path(directory), dict(record)
    apply_export_plan(model, plan)
    remaining = [step.name for step in plan if step.action in ("gate", "dense")]
    if remaining:
        _keep_only(model, [_backbone_name(n) for n in remaining])
        save_gated_model(model, directory / ADAPTER_SUBDIR)
    backbone = _unload(model)
    backbone.save_pretrained(str(directory / BASE_SUBDIR))
    tokenizer.save_pretrained(str(directory / BASE_SUBDIR))
    summary = {
        "format": "tsft-merge-aware-export",
        "version": 1,
        "auto_class": record.pop("auto_class"),
        "counts": {a: sum(s.action == a for s in plan) for a in ("merge", "dense", "drop", "gate")},
        "changed_decisions": changed_decisions(plan),
        **record,
        "modules": [asdict(step) for step in plan],
    }
    _write_atomically(directory / PLAN_FILE, json.dumps(summary, indent=1))
    return directory


def load_export(directory: Path) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from ``write_export``'s folder: the base with its merged weights and any remaining gates."""
    import transformers
    from transformers import AutoTokenizer

    directory = Path(directory)
    summary = json.loads((directory / PLAN_FILE).read_text())
    auto_class = getattr(transformers, summary["auto_class"])
    base = auto_class.from_pretrained(str(directory / BASE_SUBDIR))
    tokenizer = AutoTokenizer.from_pretrained(str(directory / BASE_SUBDIR))
    model = load_gated_model(base, directory / ADAPTER_SUBDIR) if (directory / ADAPTER_SUBDIR).is_dir() else base
    return model.eval(), tokenizer


def _unload(model: nn.Module) -> nn.Module:
    """The transformers model under the PEFT layers, each replaced by its base layer (not merged: the remaining
    updates live in ``adapter/``); peft also puts the trained heads (modules_to_save) in place."""
    if hasattr(model, "peft_config"):
        return model.unload()
    for name, module in list(model.named_modules()):
        if isinstance(module, ParallelAdapterLayer):
            _replace(model, name, module.get_base_layer())
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)  # get_submodule("") is the model itself


def _backbone_name(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX)


def _keep_only(model: nn.Module, modules: list[str]) -> None:
    """Point a peft model's config at exactly ``modules`` (full names, which peft matches as suffixes), so that
    saving and loading see only the layers that remain; a tsft Parallel Adapter's settings list its layers anyway."""
    for config in getattr(model, "peft_config", {}).values():
        config.target_modules = set(modules)
        if getattr(config, "rank_pattern", None):  # AdaLoRA's per-module ranks: only the modules that remain
            config.rank_pattern = {
                key: value
                for key, value in config.rank_pattern.items()
                if any(_backbone_name(key).startswith(f"{m}.") for m in modules)
            }
