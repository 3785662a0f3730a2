"""Load a Hugging Face backbone and its tokenizer from a local folder, a package, or the hub.

``model.path`` forms: ``pkg:<module>`` (a package shipping the weights, e.g. the offline MiniLM:
``<module>.get_model_path()``), an existing local folder, or a hub id. ``model.random_init``
builds an untrained model from a config instead (tiny models for tests). ``model.prepare`` names a
one-time conversion (PREPARERS) that creates the local folder on first use, e.g. SmolLM2 from its GGUF.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from tsft.errors import InputError
from tsft.hub import hub_reachable, use_local_files_only

PACKAGE_PREFIX = "pkg:"


def _prepare_smollm2(folder: Path, tokenizer_only: bool) -> None:
    from tsft.models import smollm2

    smollm2.prepare(folder, tokenizer_only)


def _prepare_llava_cpu(folder: Path, tokenizer_only: bool) -> None:
    from tsft.models import llava

    llava.prepare(folder, tokenizer_only)


# model.prepare -> fn(folder, tokenizer_only) that makes `folder` loadable; a no-op when it already is.
PREPARERS = {"smollm2": _prepare_smollm2, "llava_cpu": _prepare_llava_cpu}


def ensure_prepared(model_cfg: DictConfig, folder: str, tokenizer_only: bool) -> None:
    name = model_cfg.get("prepare")
    if not name:
        return
    if name not in PREPARERS:
        raise InputError(
            f"model.prepare '{name}' is not one of {', '.join(PREPARERS)}; fix configs/model/{model_cfg.name}.yaml"
        )
    PREPARERS[name](Path(folder).expanduser(), tokenizer_only)


def resolve_source(spec: str) -> str:
    """A folder or hub id that ``from_pretrained`` accepts."""
    if spec.startswith(PACKAGE_PREFIX):
        module_name = spec.removeprefix(PACKAGE_PREFIX)
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise InputError(f"model package '{module_name}' is not installed; run `make install`") from None
        return str(module.get_model_path())
    local = Path(spec).expanduser()
    return str(local) if local.exists() else spec


def position_limit(model_cfg: DictConfig) -> int | None:
    """The number of positions the model embeds, read from its config alone (no weights); None when the
    config is not at hand without a download or a conversion."""
    import json

    if model_cfg.random_init:
        settings = OmegaConf.to_container(model_cfg.random_init, resolve=True)
    else:
        config_file = Path(resolve_source(str(model_cfg.path or ""))) / "config.json"
        if not config_file.is_file():
            return None
        settings = json.loads(config_file.read_text())
    text = settings.get("text_config") or settings  # LLaVA: the language model's positions
    return text.get("max_position_embeddings")


def check_max_length(model_cfg: DictConfig, max_length: int) -> None:
    """Refuse a sequence length beyond the model's positions now (it would fail inside fit)."""
    limit = position_limit(model_cfg)
    if limit is not None and max_length > limit:
        raise InputError(
            f"task.max_length {max_length} exceeds the {limit} positions of model '{model_cfg.name}'; "
            f"set task.max_length={limit} or less"
        )


def load_tokenizer(model_cfg: DictConfig, cache_dir: Path) -> PreTrainedTokenizerBase:
    source = model_cfg.tokenizer or model_cfg.path
    if not source:
        raise InputError(f"model '{model_cfg.name}' names no tokenizer; set model.tokenizer=<folder or hub id>")
    ensure_prepared(model_cfg, source, tokenizer_only=True)
    return _from_pretrained(AutoTokenizer, source, model_cfg.name, cache_dir)


def load_backbone(
    model_cfg: DictConfig, auto_class: Any, tokenizer: PreTrainedTokenizerBase, cache_dir: Path, **config_kwargs: Any
) -> nn.Module:
    """``auto_class`` (e.g. AutoModelForSequenceClassification) with pretrained or random weights.

    ``config_kwargs`` set task-specific config fields such as ``num_labels``.
    """
    if model_cfg.random_init:
        settings = OmegaConf.to_container(model_cfg.random_init, resolve=True)
        if settings.get("model_type") == "llava":  # the vocabulary is the language model's; <image> is in it
            settings["text_config"] = {**settings["text_config"], "vocab_size": len(tokenizer)}
            settings["text_config"]["pad_token_id"] = tokenizer.pad_token_id
            settings["image_token_id"] = tokenizer.convert_tokens_to_ids("<image>")
            config = AutoConfig.for_model(**settings, **config_kwargs)
        else:
            config = AutoConfig.for_model(
                **settings, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **config_kwargs
            )
        # Auto* classes build from a config with from_config, concrete ones (LlavaForConditionalGeneration) by calling
        return auto_class.from_config(config) if hasattr(auto_class, "from_config") else auto_class(config)
    if not model_cfg.path:
        raise InputError(f"model '{model_cfg.name}' has neither model.path nor model.random_init")
    ensure_prepared(model_cfg, model_cfg.path, tokenizer_only=False)
    return _from_pretrained(auto_class, model_cfg.path, model_cfg.name, cache_dir, **config_kwargs)


def _from_pretrained(auto_class: Any, spec: str, model_name: str, cache_dir: Path, **kwargs: Any) -> Any:
    source = resolve_source(spec)
    if not Path(source).exists() and not hub_reachable():  # a hub id on an offline machine: the cache or nothing
        use_local_files_only()
    try:
        return auto_class.from_pretrained(source, cache_dir=str(cache_dir / "models"), **kwargs)
    except OSError as err:  # missing folder/files, or the hub unreachable
        raise InputError(
            f"could not load '{source}' for model '{model_name}' ({str(err).splitlines()[0]}); "
            "download it and set model.path=<local folder>"
        ) from None
