"""How far the gated DoRA update is from peft's DoRA when dropout is on (docs/gate.md, "DoRA with dropout").

In training with dropout, peft's DoRA update is ``k * W0 d + c B A d`` with ``d = dropout(x)``; the gate
computes ``k * W0 x + c B A d`` from the frozen output it already has, so the two differ by
``k * W0 (x - d)``: zero-mean, zero at dropout 0 and in eval (k = m / ||W0 + s B A||_c - 1, c its scale).
At initialisation k = 0, so the difference only appears once the magnitude has trained. This script

1. fine-tunes DoRA (the CSR recipe: r 32, alpha 64, dropout 0.05, q/k/v/up/down) on SmolLM2-135M for a
   few steps on the real BoolQ training rows, so that k is the size a short run gives it, then
2. runs held-out rows in train mode through every gated layer twice with the same dropout mask, once by
   the gate (tau = 0: every token on) and once by peft's own forward, and prints per layer kind
   ``||gate - peft|| / ||peft - W0 x - b||`` (the update's relative error) and ``||gate - peft|| / ||peft||``.

    python scripts/measure_dora_dropout.py [--steps 40] [--lr 1e-3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import layer as lora_layer  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from tsft.gate import GateConfig, add_token_gates  # noqa: E402
from tsft.gate.hosts import GatedLoraLinear  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def text_batches(tokenizer, rows, batch_size: int, seq: int):
    texts = [f"{row['instruction']}\n{row['output']}" for row in rows]
    for start in range(0, len(texts) - batch_size + 1, batch_size):
        enc = tokenizer(
            texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=seq
        )
        yield enc["input_ids"], enc["attention_mask"]


def magnitude_factor(layer: GatedLoraLinear) -> torch.Tensor:
    """DoRA's k = m / ||W0 + s B A||_c - 1 of one layer."""
    with torch.no_grad():
        lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        dora = layer.lora_magnitude_vector["default"]
        norm = dora.get_weight_norm(layer.get_base_layer().weight, lora_B @ lora_A, layer.scaling["default"])
        return dora.weight / norm - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("~/.cache/tsft/models/smollm2-135m").expanduser())
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("TSFT_DATA_DIR", REPO.parent / "shared" / "data"))
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dropout", type=float, default=0.05)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    config = LoraConfig(r=32, lora_alpha=64, lora_dropout=args.dropout, target_modules=TARGETS, use_dora=True)
    model = get_peft_model(model, config)
    gates = add_token_gates(model, GateConfig())  # tau = 0 and never stepped: every token is on
    rows = json.loads((args.data / "csr" / "boolq" / "train.json").read_text())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    batches = text_batches(tokenizer, rows, 4, 64)
    for step in range(args.steps):
        ids, mask = next(batches)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0:
            print(f"step {step} loss {loss.item():.3f}", flush=True)

    errors: dict[str, list[tuple[float, float, float]]] = defaultdict(list)

    def compare(module, inputs, gated_out):
        x = inputs[0]
        with torch.no_grad():
            torch.set_rng_state(module._rng_before)
            peft_out = lora_layer.Linear.forward(module, x)  # peft's DoRA forward, same dropout mask
            base = module.base_layer(x)
        diff = (gated_out - peft_out).norm().item()
        errors[module.token_gate.kind].append((diff, (peft_out - base).norm().item(), peft_out.norm().item()))

    def keep_rng(module, inputs):
        module._rng_before = torch.get_rng_state()

    hooks = []
    for module in model.modules():
        if isinstance(module, GatedLoraLinear):
            hooks += [module.register_forward_pre_hook(keep_rng), module.register_forward_hook(compare)]
    held_out = text_batches(tokenizer, rows[-400:], 4, 64)
    with torch.no_grad():
        for _ in range(5):
            ids, mask = next(held_out)
            model(input_ids=ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    k_sizes = [magnitude_factor(m).abs().mean().item() for m in model.modules() if isinstance(m, GatedLoraLinear)]
    print(
        f"\nSmolLM2-135M DoRA r32 alpha64 dropout {args.dropout}, {args.steps} steps lr {args.lr} "
        f"on BoolQ train (4 x 64 tokens); mean |k| {sum(k_sizes) / len(k_sizes):.2e}; "
        f"{len(gates)} gated layers, 5 held-out batches"
    )
    print(f"{'kind':10s} {'|gate-peft| / |peft delta|':>28s} {'|gate-peft| / |peft out|':>26s}")
    for kind, rows_ in errors.items():
        rel_delta = sum(d for d, _, _ in rows_) / sum(u for _, u, _ in rows_)
        rel_out = sum(d for d, _, _ in rows_) / sum(o for _, _, o in rows_)
        print(f"{kind:10s} {rel_delta:28.4f} {rel_out:26.2e}")


if __name__ == "__main__":
    main()
