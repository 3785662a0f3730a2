"""What a finished run leaves to be used elsewhere: ``<run_dir>/adapter/`` and the way back to a model.

    <run_dir>/adapter/   adapter_config.json + adapter_model.safetensors (peft's format; tsft_adapter.json for a
                         Parallel Adapter) + token_gates.json (TS runs) + README.md (a model card)

    model, tokenizer, cfg = load_run("results/runs/glue/sst2/<run>")   # the base model + the run's adapter
    metrics = evaluate_run("results/runs/glue/sst2/<run>")             # the run's evaluation, again

The pipeline writes the adapter after evaluating and before result.json, so a finished run always has one
(``export.adapter=false`` skips it). Under FSDP2 the adapter's tensors are gathered from the shards first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tsft import paths
from tsft.gate.attach import find_token_gates
from tsft.integrations.export import _write_atomically, load_gated_model, save_gated_model

ADAPTER_SUBDIR = "adapter"
CARD_FILE = "README.md"
# the entries of a peft model's state dict that save_pretrained keeps (the frozen base is never gathered)
_ADAPTER_MARKERS = ("lora_", "ranknum", "modules_to_save", "adapter_")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The adapter's entries of ``model.state_dict()``, gathered whole if sharded; None when nothing is sharded
    (then peft reads the model itself). Collective under FSDP2: every rank must call it."""
    from torch.distributed.tensor import DTensor

    state = model.state_dict()
    if not any(isinstance(v, DTensor) for v in state.values()):
        return None
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
        for k, v in state.items()
        if any(marker in k for marker in _ADAPTER_MARKERS)
    }


def save_run_adapter(model: nn.Module, run_dir: Path, cfg: DictConfig, result: dict[str, Any], write: bool) -> Path:
    """``<run_dir>/adapter/``: the adapter with its gates and a model card (``write``: this is the rank that writes;
    every rank must call this under FSDP2, where gathering the adapter is collective)."""
    directory = run_dir / ADAPTER_SUBDIR
    gathered = adapter_state(model)
    if write:
        save_gated_model(model, directory, state_dict=gathered)
        _write_atomically(directory / CARD_FILE, model_card(cfg, result, run_dir))
    return directory


def model_card(cfg: DictConfig, result: dict[str, Any], run_dir: Path) -> str:
    """A short README for the adapter: what it was trained from and how, what it scored, how to load it."""
    sparsity = result.get("sparsity") or {}
    command_file = run_dir / "command.txt"
    command = command_file.read_text().strip() if command_file.is_file() else "(not started from train.py)"
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in (result.get("metrics") or {}).items() if isinstance(v, float))
    lines = [
        f"# {result['method']} on {cfg.task.name} ({cfg.model.name})",
        "",
        f"- base model: `{cfg.model.path}`",
        f"- method: {result['method']} (peft={cfg.peft.name}, targets {list(cfg.peft.target_modules)})",
    ]
    if cfg.sparsity.enabled:
        overall = sparsity.get("overall")
        lines.append(
            f"- token selection: λ {cfg.sparsity['lambda']:g}, s {cfg.sparsity.s:g}; evaluation sparsity "
            + ("n/a" if overall is None else f"{100 * overall:.1f} %")
        )
    score = result.get("score")
    lines += [
        f"- score: {'n/a' if score is None else f'{score:.2f}'} ({metrics})",
        f"- scale: {json.dumps(result.get('scale'))}",
        f"- seed {cfg.seed}, preset {cfg.preset}, tsft commit {result.get('git_commit') or 'unknown'}",
        "",
        "Trained with:",
        "",
        f"    {command}",
        "",
        "Load it (the base model is rebuilt from the run's config.yaml):",
        "",
        "    from tsft.integrations.run_adapter import load_run",
        f"    model, tokenizer, cfg = load_run('{run_dir}')",
        "",
        "or onto a base model of your own: `tsft.integrations.export.load_gated_model(base_model, '<this folder>')`.",
        "",
    ]
    return "\n".join(lines)


def load_run(run_dir: str | Path) -> tuple[nn.Module, Any, DictConfig]:
    """The run's base model rebuilt from its config.yaml, with its adapter and gates; (model, tokenizer, cfg)."""
    import lightning as L

    from tsft.models import load_tokenizer
    from tsft.models.backbone import load_backbone
    from tsft.models.build import heads_file, load_heads
    from tsft.pipeline import task_family

    run_dir = Path(run_dir)
    adapter = run_dir / ADAPTER_SUBDIR
    if not adapter.is_dir():
        raise FileNotFoundError(f"{adapter} does not exist: the run did not finish, or ran with export.adapter=false")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    family = task_family(cfg)
    tokenizer = load_tokenizer(cfg.model, paths.cache_dir(cfg.paths))
    if cfg.task.family in ("csr", "vit"):  # their data modules give the tokenizer a pad token
        from tsft.data.csr import ensure_pad_token

        ensure_pad_token(tokenizer)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # a random-init backbone is the run's own again
    cache = paths.cache_dir(cfg.paths)
    backbone = load_backbone(cfg.model, family.auto_class, tokenizer, cache, **family.model_kwargs(cfg))
    if cfg.model.get("init_from"):
        load_heads(backbone, heads_file(cfg))
    if cfg.task.family in ("csr", "vit"):
        from tsft.lit.causal_lm import fit_embeddings_to_tokenizer

        fit_embeddings_to_tokenizer(backbone, tokenizer)
    return load_gated_model(backbone, adapter).eval(), tokenizer, cfg


def evaluate_run(run_dir: str | Path) -> dict[str, Any]:
    """Evaluate the run's saved adapter on the run's own evaluation data and settings; returns the metrics."""
    return evaluate_model(*load_run(run_dir))


def evaluate_model(model: nn.Module, tokenizer: Any, cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``model`` on the evaluation data and settings of the run whose config is ``cfg``; the metrics.
    Its gates (if any) count the evaluation tokens as in the run (each gate's ``sparsity("eval")``)."""
    import lightning as L

    from tsft.pipeline import task_family

    family = task_family(cfg)
    datamodule = family.datamodule(cfg, tokenizer)
    datamodule.setup("fit")
    module = family.lightning_module(cfg, model, datamodule)
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator if cfg.trainer.accelerator != "gpu" or torch.cuda.is_available() else "cpu",
        devices=1,
        precision=cfg.trainer.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    for gate in find_token_gates(model):
        gate.reset_stats("eval")  # the counts then cover this evaluation only, as the run's callback does
    getattr(trainer, family.evaluate)(module, datamodule=datamodule, verbose=False)
    model.eval()  # Lightning leaves the module in training mode after an evaluation loop
    return module.eval_metrics


def push_to_hub(run_dir: str | Path, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Upload ``<run_dir>/adapter/`` (card included) to a model repository of the Hugging Face hub; returns its
    URL. Where the hub is unreachable (or HF_HUB_OFFLINE is set) it refuses at once instead of retrying."""
    from tsft.hub import hub_reachable

    adapter = Path(run_dir) / ADAPTER_SUBDIR
    if not adapter.is_dir():
        raise FileNotFoundError(f"{adapter} does not exist: the run did not finish, or ran with export.adapter=false")
    if not hub_reachable():
        raise ConnectionError(
            f"the Hugging Face hub is not reachable from here (or HF_HUB_OFFLINE is set); copy {adapter} to a "
            "machine that reaches it and push from there"
        )
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(adapter), repo_id=repo_id, commit_message="tsft adapter")
    return f"https://huggingface.co/{repo_id}"
