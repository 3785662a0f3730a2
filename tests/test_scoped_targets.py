"""model.target_scope: PEFT targets of the language model only, not the vision tower's same-named layers."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from tsft.errors import InputError
from tsft.models.peft_methods import scoped_targets


def tiny_llava():
    vision = CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              patch_size=14, image_size=56)  # fmt: skip
    text = LlamaConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=96)  # fmt: skip
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=99))


def test_a_scope_keeps_the_vision_towers_attention_out():
    model = tiny_llava()
    unscoped = [n for n, _ in model.named_modules() if n.endswith(".self_attn.q_proj")]
    assert any("vision_tower" in n for n in unscoped)  # why the scope exists: CLIP uses the same names
    scoped = scoped_targets(model, ["self_attn.q_proj", "self_attn.v_proj"], "language_model")
    assert scoped == [
        "model.language_model.layers.0.self_attn.q_proj",
        "model.language_model.layers.0.self_attn.v_proj",
        "model.language_model.layers.1.self_attn.q_proj",
        "model.language_model.layers.1.self_attn.v_proj",
    ]
    assert scoped_targets(model, ["self_attn.q_proj"], None) == ["self_attn.q_proj"]
    with pytest.raises(InputError, match="target_scope 'decoder'"):
        scoped_targets(model, ["self_attn.q_proj"], "decoder")
