"""Generation through gated layers: peft's generate() bypasses the PeftModel's forward, and the KV
cache feeds one new position per step with the whole attention mask."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from tsft.gate import GateConfig, add_token_gates

from .conftest import tiny_llama


def tiny_gated_llama():
    base = tiny_llama(num_hidden_layers=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    gates = add_token_gates(model, GateConfig(lam=1e-5, s=1e-4))
    return model.eval(), gates


def test_generate_counts_every_real_position_once_and_no_padding():
    model, gates = tiny_gated_llama()
    # Left padding, as for batched generation: row 0 has 2 pad positions, row 1 none.
    input_ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        model(input_ids=torch.randint(3, 60, (3, 9)))  # an earlier batch of another shape leaves its (absent) mask
    for gate in gates:
        gate.reset_stats()
    new_tokens = 4
    with torch.no_grad():
        model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
    # The prompt's 8 real tokens, then one position per row for each new token but the last,
    # which is returned without being fed back.
    expected = 8 + 2 * (new_tokens - 1)
    assert [gate.counts("eval")[1] for gate in gates] == [expected] * len(gates)
