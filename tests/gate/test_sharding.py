"""Gates under sharded data parallelism (FSDP2 ``fully_shard``), two gloo ranks on CPU.

The gated layers read B (DoRA also A, W0 and the magnitude) without calling the module that owns it.
Sharded inside a unit that covers the whole layer (FSDP2 on each transformer block) the weights are
whole when read; a LoRA factor that is a unit of its own is still a sharded DTensor there, and
``tsft.gate.hosts.whole`` gathers it. Either way the ranks must train as the single process does on
the global batch, with tau float32 and identical on both.
"""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tsft.gate import GateConfig, ThresholdOptimizer, add_token_gates

from .conftest import adapter_model, peft_model
from .test_training import CONFIG, WORLD, _loopback_carries_tcp, run_global_batches

KINDS = ("lora", "dora", "adapter")
# the submodules whose weights a gated layer reads directly (hosts.GatedLayerMixin.external_weights)
OWN_UNITS = ("lora_A.default", "lora_B.default", "base_layer", "lora_magnitude_vector.default", "adapter_up")


def make(kind: str):
    model = adapter_model() if kind == "adapter" else peft_model(kind)
    return model, ThresholdOptimizer(add_token_gates(model, GateConfig(lam=CONFIG.lam, s=CONFIG.s)))


def _shard(model: torch.nn.Module, layout: str) -> None:
    from torch.distributed.fsdp import fully_shard

    if layout == "own_units":
        for name, module in list(model.named_modules()):
            if name.endswith(OWN_UNITS):
                fully_shard(module)
    fully_shard(model)


def _fsdp_worker(rank: int, world: int, store: str, out_dir: str, layout: str) -> None:
    if os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    torch.set_num_threads(1)
    result = {}
    for kind in KINDS:
        model, thresholds = make(kind)
        _shard(model, layout)
        taus, _ = run_global_batches(model, thresholds, rank, world)
        weights = {n: p.full_tensor().detach() for n, p in model.named_parameters() if p.requires_grad}
        result[kind] = {"tau": taus, "weights": weights, "dtypes": [str(b.dtype) for b in model.buffers()]}
    partial = f"{out_dir}/rank{rank}.pt.partial"
    torch.save(result, partial)
    os.replace(partial, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.skipif(not _loopback_carries_tcp(), reason="loopback is down: two gloo ranks cannot connect")
@pytest.mark.parametrize("layout", ["one_unit", "own_units"])
def test_sharded_ranks_step_tau_as_one_process(tmp_path, layout):
    ranks = mp.spawn(
        _fsdp_worker, args=(WORLD, str(tmp_path / "store"), str(tmp_path), layout), nprocs=WORLD, join=False
    )
    results = [tmp_path / f"rank{rank}.pt" for rank in range(WORLD)]
    deadline = time.monotonic() + 240
    try:
        while not ranks.join(timeout=5):
            if all(result.exists() for result in results):
                break
            assert time.monotonic() < deadline, "two-rank FSDP2 run did not finish in 240 s"
    finally:
        for process in ranks.processes:
            if process.is_alive():
                process.kill()
    r0, r1 = (torch.load(result) for result in results)
    for kind in KINDS:
        assert r0[kind]["tau"] == r1[kind]["tau"], kind  # bit-identical on both ranks
        assert set(r0[kind]["dtypes"]) == {"torch.float32"}, kind
        model, thresholds = make(kind)
        one_taus, _ = run_global_batches(model, thresholds)
        assert any(tau != 0 for tau in one_taus[-1])
        for sharded_step, one_step in zip(r0[kind]["tau"], one_taus):
            assert sharded_step == pytest.approx(one_step, rel=1e-5, abs=1e-9), kind
        # the PEFT weights trained as the one process's: with full_tensor()'s gradient (each rank's own chunk,
        # never averaged) a LoRA B that is its own unit drifted, and tau with it (4e-4 relative at step 2)
        for name, weight in model.named_parameters():
            if weight.requires_grad:
                torch.testing.assert_close(r0[kind]["weights"][name], weight.detach(), rtol=1e-5, atol=1e-6)


def test_whole_gathers_a_sharded_weight_and_leaves_a_tensor_alone():
    from tsft.gate.hosts import whole

    weight = torch.randn(3, 2)
    assert whole(weight) is weight


@pytest.mark.parametrize(
    ("kind", "read_directly"),
    [
        ("lora", ["lora_B.default.weight"]),
        ("dora", ["lora_B.default.weight", "lora_A.default.weight", "base_layer.weight", "base_layer.bias",
                  "lora_magnitude_vector.default.weight"]),
        ("adapter", ["adapter_up.weight"]),
        ("adalora", []),  # its factors are the layer's own parameters, gathered around its own forward
    ],
)  # fmt: skip
def test_zero3_registers_the_weights_each_gated_layer_reads_outside_their_module(monkeypatch, kind, read_directly):
    import sys
    import types

    from tsft.gate.hosts import GatedLayerMixin
    from tsft.lit.sharding import register_external_weights

    registered = []
    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(register_external_parameter=lambda module, p: registered.append((module, p)))
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    model, _ = make(kind) if kind != "adalora" else (peft_model("adalora"), None)
    if kind == "adalora":
        add_token_gates(model, GateConfig(lam=CONFIG.lam, s=CONFIG.s))
    layers = {name: m for name, m in model.named_modules() if isinstance(m, GatedLayerMixin)}
    assert len(layers) == 2
    assert register_external_weights(model) == 2 * len(read_directly)
    for name, layer in layers.items():
        own = {id(p): n for n, p in layer.named_parameters()}
        assert [own[id(p)] for module, p in registered if module is layer] == read_directly, name
