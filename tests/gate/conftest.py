"""Small models whose gate arithmetic can be checked by hand."""

from __future__ import annotations

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from torch import nn


class TwoLayer(nn.Module):
    """q: 8 -> 6, v: 6 -> 8, with a nonlinearity between; accepts (and ignores) attention_mask."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 6)
        self.v = nn.Linear(6, 8)

    def forward(self, x, attention_mask=None):
        return self.v(torch.tanh(self.q(x)))


class OneLinear(nn.Module):
    """A single 2 -> 2 identity layer, so ``base = x`` and deltas are read off the LoRA factors."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 2)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(2))
            self.proj.bias.zero_()

    def forward(self, x, attention_mask=None):
        return self.proj(x)


def peft_model(kind: str, model: nn.Module | None = None, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """A peft model over ``TwoLayer`` with non-zero B (so deltas are non-trivial) for kind in lora/dora/adalora."""
    torch.manual_seed(seed)
    model = model or TwoLayer()
    if kind == "adalora":
        config = AdaLoraConfig(
            init_r=4,
            target_r=2,
            lora_alpha=8,
            lora_dropout=dropout,
            target_modules=["q", "v"],
            total_step=40,
            tinit=2,
            tfinal=2,
            deltaT=1,
        )
        pm = get_peft_model(model, config)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_E" in name or "lora_B" in name:
                    p.normal_(0, 0.5)
        return pm
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        lora_dropout=dropout,
        target_modules=["q", "v"],
        use_dora=(kind == "dora"),
        init_lora_weights=False,
    )
    pm = get_peft_model(model, config)
    if kind == "dora":
        with torch.no_grad():  # move the magnitude off its initial value so k = m/||W|| - 1 is non-zero
            for name, p in pm.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(torch.linspace(0.5, 1.5, p.numel()))
    return pm


def adapter_model(seed: int = 0) -> nn.Module:
    """``TwoLayer`` frozen, with Parallel Adapters (hidden 3, scale 2) on q and v and non-zero up-projections."""
    from tsft.gate import add_parallel_adapters

    torch.manual_seed(seed)
    model = TwoLayer()
    model.requires_grad_(False)
    add_parallel_adapters(model, ["q", "v"], hidden_size=3, scale=2.0)
    with torch.no_grad():
        for layer in (model.q, model.v):
            layer.adapter_up.weight.normal_()
    return model


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def tiny_llama(num_hidden_layers: int = 2, **config):
    """A random-weight Llama (vocabulary 64, hidden 32) for gate tests that need a real transformers model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**settings, **config}))
