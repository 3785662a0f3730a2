"""The threshold update inside training loops: accumulation, resume, data-parallel ranks."""

from __future__ import annotations

import copy
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tsft.gate import GateConfig, ThresholdOptimizer, add_token_gates, find_token_gates
from tsft.gate.accounting import reduce_pending

from .conftest import adapter_model, peft_model, tiny_llama

CONFIG = GateConfig(lam=1e-2, s=1e-2)


def batch(step: int, size: int = 4, seq: int = 5):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(size, seq, 8, generator=g)
    mask = torch.ones(size, seq, dtype=torch.long)
    # some padding, so the mask path is part of every check; the padded row moves with the step, so passes
    # reduced together have different masks
    mask[(1 + step) % size, 3:] = 0
    target = torch.randn(size, seq, 8, generator=g)
    return x, mask, target


def loss_fn(model, x, mask, target):
    out = model(x, attention_mask=mask)
    return (((out - target) ** 2).sum(-1) * mask).sum() / mask.sum()


def make(kind: str = "lora"):
    model = peft_model(kind)
    gates = add_token_gates(model, CONFIG)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer, ThresholdOptimizer(gates)


def train(model, optimizer, thresholds, steps):
    for step in steps:
        loss_fn(model, *batch(step)).backward()
        optimizer.step()
        thresholds.step()
        optimizer.zero_grad()


def test_two_half_batches_accumulate_to_one_full_batch():
    full, _, thr_full = make()
    half = copy.deepcopy(full)
    thr_half = ThresholdOptimizer(find_token_gates(half))
    x, mask, target = batch(0)
    out = full(x, attention_mask=mask)
    (((out - target) ** 2).sum(-1) * mask).sum().backward()
    for part in (slice(0, 2), slice(2, 4)):
        out = half(x[part], attention_mask=mask[part])
        (((out - target[part]) ** 2).sum(-1) * mask[part]).sum().backward()
    for gate_full, gate_half in zip(thr_full.gates, thr_half.gates):
        assert float(gate_half.threshold_grad) == pytest.approx(float(gate_full.threshold_grad), rel=1e-5)
        assert gate_half.counts("train") == gate_full.counts("train") == (int(mask.sum()) - 0, int(mask.sum()))
    thr_full.step(), thr_half.step()
    for gate_full, gate_half in zip(thr_full.gates, thr_half.gates):
        assert float(gate_half.tau) == pytest.approx(float(gate_full.tau), rel=1e-6) and float(gate_full.tau) > 0


def test_one_batched_reduction_equals_reducing_each_pass_on_its_own():
    """The threshold optimizer reduces all queued passes of all gates together (several micro-batches
    per gate included); reading g after every pass reduces each pass on its own. Same tau, same counts."""
    batched, _, thr_batched = make()
    eager = copy.deepcopy(batched)
    thr_eager = ThresholdOptimizer(find_token_gates(eager))
    for step in range(3):
        for micro in range(2):
            loss_fn(batched, *batch(10 * step + micro)).backward()
            loss_fn(eager, *batch(10 * step + micro)).backward()
            [gate.threshold_grad for gate in thr_eager.gates]  # forces a reduction per pass
        assert all(gate.accounting.queued("train") == 2 for gate in thr_batched.gates)
        thr_batched.step(), thr_eager.step()
    for a, b in zip(thr_batched.gates, thr_eager.gates):
        assert float(a.tau) == pytest.approx(float(b.tau), rel=1e-6) and float(a.tau) != 0
        assert a.counts("train") == b.counts("train") and a.counts("train")[1] == 6 * int(batch(0)[1].sum())


def test_micro_batches_of_equal_token_count_but_other_shapes_accumulate():
    """Queued passes of 2 x 6 and 3 x 4 tokens (12 each) are reduced apart, not stacked together."""
    model, _, thresholds = make()
    reference = copy.deepcopy(model)
    reference_gates = find_token_gates(reference)
    expected = [0.0] * len(reference_gates)
    for step, (size, seq) in enumerate([(2, 6), (3, 4)]):
        loss_fn(model, *batch(step, size, seq)).backward()
        loss_fn(reference, *batch(step, size, seq)).backward()
        for i, gate in enumerate(reference_gates):  # each pass reduced on its own
            expected[i] += float(gate.threshold_grad)
            gate.zero_threshold_grad()
    for gate, g in zip(thresholds.gates, expected):
        assert float(gate.threshold_grad) == pytest.approx(g, rel=1e-6)
        assert gate.counts("train")[1] == int(batch(0, 2, 6)[1].sum() + batch(1, 3, 4)[1].sum())  # real tokens


def test_one_reduction_over_the_gates_of_two_threshold_optimizers():
    """Gates split between two threshold optimizers (so two tables of sums) and reduced in one call, as
    sparsity_report does: every gate gets the g and counts its own optimizer's reduction gives it."""
    model = peft_model("lora")
    gates = add_token_gates(model, CONFIG)
    reference = copy.deepcopy(model)
    reference_gates = find_token_gates(reference)
    split_between = ThresholdOptimizer(gates[:1]), ThresholdOptimizer(gates[1:])
    one_for_all = ThresholdOptimizer(reference_gates)
    assert split_between[0]._table is not split_between[1]._table and len(one_for_all._table.grad) == len(gates)
    for step in range(2):  # two passes, so each gate also queues two records
        loss_fn(model, *batch(step)).backward()
        loss_fn(reference, *batch(step)).backward()
    reduce_pending(gates[::-1])  # both tables at once, in another order than either table's
    assert all(gate.accounting.queued("train") == 0 for gate in gates)
    for gate, expected in zip(gates, reference_gates):
        assert float(gate.threshold_grad) == pytest.approx(float(expected.threshold_grad), rel=1e-6)
        assert gate.counts("train") == expected.counts("train")


def test_queued_passes_stay_bounded_without_a_threshold_step():
    model, _, thresholds = make()
    gate = thresholds.gates[0]
    reference = copy.deepcopy(model)  # same weights and tau: g of each pass, reduced one by one
    reference_gate = find_token_gates(reference)[0]
    passes = gate.MAX_PENDING + 5
    expected = 0.0
    for step in range(passes):
        loss_fn(model, *batch(step)).backward()
        assert gate.accounting.queued("train") <= gate.MAX_PENDING
    for step in range(passes):
        loss_fn(reference, *batch(step)).backward()
        expected += float(reference_gate.threshold_grad)
        reference_gate.zero_threshold_grad()
    assert float(gate.threshold_grad) == pytest.approx(expected, rel=1e-6)
    assert gate.counts("train")[1] == passes * int(batch(0)[1].sum())


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora"])
def test_resumed_run_continues_bit_for_bit(kind, tmp_path):
    model, optimizer, thresholds = make(kind)
    train(model, optimizer, thresholds, range(3))
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    train(model, optimizer, thresholds, range(3, 6))

    resumed, resumed_opt, resumed_thr = make(kind)
    state = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["optimizer"])
    assert [float(g.step) for g in resumed_thr.gates] == [3.0, 3.0]
    train(resumed, resumed_opt, resumed_thr, range(3, 6))

    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(float(g.tau) != 0 for g in thresholds.gates)


def _loopback_carries_tcp() -> bool:
    """Gloo talks TCP over loopback; a sandbox with `lo` down would make it wait forever."""
    try:
        with socket.create_server(("127.0.0.1", 0)) as server:
            with socket.create_connection(server.getsockname(), timeout=2):
                server.settimeout(2)
                server.accept()[0].close()
        return True
    except OSError:
        return False


def position_mean_loss(model, x, mask, target):
    """Squared error over real tokens divided by the number of positions (not of real tokens), so the
    loss of a batch is exactly the mean of its halves' losses: what DDP's gradient averaging descends."""
    out = model(x, attention_mask=mask)
    return (((out - target) ** 2).sum(-1) * mask).sum() / mask.numel()


def make_for(config: GateConfig):
    model = peft_model("lora")
    thresholds = ThresholdOptimizer(add_token_gates(model, config))
    return model, thresholds


DDP_STEPS, WORLD = 3, 2


def run_global_batches(model, thresholds, rank: int = 0, world: int = 1):
    """Three steps on global batches of 4; with ``world`` ranks each takes its rows of every batch.
    Returns (every gate's tau after each step, this rank's own g before each step)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    taus, own_g = [], []
    for step in range(DDP_STEPS):
        x, mask, target = batch(step)
        rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
        position_mean_loss(model, x[rows], mask[rows], target[rows]).backward()
        own_g.append([float(g.threshold_grad) for g in thresholds.gates])
        optimizer.step()
        thresholds.step()
        optimizer.zero_grad()
        taus.append([float(g.tau) for g in thresholds.gates])
    return taus, own_g


def _ddp_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    # Bind gloo to loopback by name: its default resolves the hostname, which a sandbox may not map.
    if os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    # A file store for the rendezvous: no port to pick, so no race with other programs for one.
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    torch.set_num_threads(1)
    result = {}
    for adam in (True, False):
        model, thresholds = make_for(GateConfig(lam=CONFIG.lam, s=CONFIG.s, adam=adam))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        taus, own_g = run_global_batches(ddp, thresholds, rank, world)
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        result[adam] = {"tau": taus, "g": own_g, "weights": weights}
    partial = f"{out_dir}/rank{rank}.pt.partial"
    torch.save(result, partial)
    os.replace(partial, f"{out_dir}/rank{rank}.pt")  # the test reads a result only once it is whole
    dist.destroy_process_group()


@pytest.mark.skipif(not _loopback_carries_tcp(), reason="loopback is down: two gloo ranks cannot connect")
def test_two_ranks_step_tau_as_one_process_on_the_global_batch(tmp_path):
    """W ranks on a global batch give the g, and so the tau, of one process on that batch (Adam and plain
    step): the loss term of g is averaged over ranks as DDP averages the PEFT gradients, lambda S summed.
    Summing both (the old rule) made the loss term exactly W times too large in every gate."""
    ranks = mp.spawn(_ddp_worker, args=(WORLD, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=False)
    results = [tmp_path / f"rank{rank}.pt" for rank in range(WORLD)]
    deadline = time.monotonic() + 240
    try:
        while not ranks.join(timeout=5):  # raises if a rank failed
            # Done once both results are written: in one CI run a rank did not exit within 240 s
            # (after its last collective, since the other rank had finished), so exit is not awaited.
            if all(result.exists() for result in results):
                break
            assert time.monotonic() < deadline, "two-rank DDP run did not finish in 240 s"
    finally:
        for process in ranks.processes:  # never leave a rank behind to block the interpreter's exit
            if process.is_alive():
                process.kill()
    r0, r1 = (torch.load(result) for result in results)
    for adam in (True, False):
        model, thresholds = make_for(GateConfig(lam=CONFIG.lam, s=CONFIG.s, adam=adam))
        taus, _ = run_global_batches(model, thresholds)
        assert r0[adam]["g"] != r1[adam]["g"]  # the ranks' own g differ ...
        assert r0[adam]["tau"] == r1[adam]["tau"]  # ... their thresholds move together ...
        for name, weight in model.named_parameters():  # (the same training: PEFT weights agree)
            if weight.requires_grad:
                torch.testing.assert_close(r0[adam]["weights"][name], weight.detach(), rtol=1e-5, atol=1e-6)
        # ... and step by step exactly as the one process's
        for ddp_step, one_step in zip(r0[adam]["tau"], taus):
            assert ddp_step == pytest.approx(one_step, rel=1e-5, abs=1e-9)
    # the plain step shows g itself: tau_1 = alpha s g_1, so the ranks' g combine to the one process's g
    _, one_g = run_global_batches(*make_for(GateConfig(lam=CONFIG.lam, s=CONFIG.s, adam=False)))
    combined = [tau / CONFIG.s for tau in r0[False]["tau"][0]]
    assert combined == pytest.approx(one_g[0], rel=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_does_not_double_count(reentrant):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(1)  # the same random LoRA factors in both runs
        model = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        gates = add_token_gates(model, CONFIG)
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        results.append([(g.counts("train"), g.counts("eval"), float(g.threshold_grad)) for g in gates])
    assert results[0][0][0] == (13, 13)  # 16 positions, 3 padded, all on at tau = 0
    for plain, checkpointed in zip(*results):
        assert checkpointed[:2] == plain[:2]
        assert checkpointed[2] == pytest.approx(plain[2], rel=1e-5)


# ---------------------------------------------------------------- the optimizer's shared gate state
def test_replaced_state_buffers_are_picked_up_by_the_next_step():
    """The optimizer steps all gates' state as one matrix whose entries are the gates' buffers; a
    buffer replaced rather than updated in place (assignment, load_state_dict(assign=True)) must be
    re-linked, not stepped in a stale copy."""
    model, optimizer, thresholds = make()
    reference, ref_optimizer, ref_thresholds = make()
    train(model, optimizer, thresholds, range(2))
    train(reference, ref_optimizer, ref_thresholds, range(2))
    gate_state = {k: v.clone() for k, v in model.state_dict().items() if "token_gate" in k}
    model.load_state_dict(gate_state, strict=False, assign=True)  # every gate buffer is now a new tensor
    gate = thresholds.gates[0]
    gate.tau = torch.tensor(0.25)  # and one is set by hand
    ref_thresholds.gates[0].tau.fill_(0.25)
    train(model, optimizer, thresholds, range(2, 4))
    train(reference, ref_optimizer, ref_thresholds, range(2, 4))
    for a, b in zip(thresholds.gates, ref_thresholds.gates):
        for name in a.STATE:
            assert float(getattr(a, name)) == float(getattr(b, name)), (a.name, name)
    assert float(gate.tau) != 0.25  # the step moved the new buffer itself


@pytest.mark.parametrize("cast", ["bfloat16", "half"])
def test_casting_the_model_keeps_the_threshold_state_in_float32(cast):
    """bf16 resolves 0.3001 only to 2e-3 (and a default step of 1e-4 is lost above tau ~ 0.03); fp16's largest
    value is 65504. A cast model must keep its gates' state as it was, in float32, and keep stepping it."""
    model, optimizer, thresholds = make()
    gate = thresholds.gates[0]
    values = {"tau": 0.3001, "exp_avg": 123.456, "exp_avg_sq": 1.0e6}
    for name, value in values.items():
        getattr(gate, name).fill_(value)
    getattr(model, cast)()
    for name, value in values.items():
        assert getattr(gate, name).dtype == torch.float32
        assert float(getattr(gate, name)) == float(torch.tensor(value, dtype=torch.float32)), name
    assert next(p for p in model.parameters()).dtype != torch.float32  # the model itself was cast
    before = float(gate.tau)
    loss_fn(model, *(t.to(next(model.parameters()).dtype) if t.is_floating_point() else t for t in batch(0))).backward()
    thresholds.step()
    assert float(gate.tau) != before and gate.tau.dtype == torch.float32


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora", "adapter"])
def test_training_under_bf16_autocast_matches_float32(kind):
    """Under autocast (bf16-mixed, the GPU trainer configs) u is bf16 while B is the float32 parameter: the
    gate trains, with float32 gradients, and g and the counts stay close to a float32 run's."""
    model = adapter_model() if kind == "adapter" else peft_model(kind)
    reference = copy.deepcopy(model)
    gates, reference_gates = add_token_gates(model, CONFIG), add_token_gates(reference, CONFIG)
    x, mask, target = batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(model, x, mask, target)
    loss.backward()
    loss_fn(reference, x, mask, target).backward()
    trained = [(p, q) for p, q in zip(model.parameters(), reference.parameters()) if p.requires_grad]
    assert trained
    for p, q in trained:
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=0.05, atol=0.02 * float(q.grad.abs().max()))
    for gate, expected in zip(gates, reference_gates):
        assert gate.counts("train") == expected.counts("train")
        assert float(gate.threshold_grad) == pytest.approx(float(expected.threshold_grad), rel=0.02)
    thresholds = ThresholdOptimizer(gates)
    thresholds.step()
    assert all(float(gate.tau) != 0 for gate in gates)


def test_buffers_held_from_before_the_first_step_stay_live():
    """DDP collects a model's buffers once, when it wraps the model (after the threshold optimizer is
    built, in Lightning and with the HF Trainer); its buffer broadcast must write the tensors the
    optimizer steps, not copies the first step left behind."""
    model, optimizer, thresholds = make()
    held = [buffer for gate in thresholds.gates for buffer in gate.state_buffers()]
    train(model, optimizer, thresholds, range(2))
    assert all(a is b for a, b in zip(held, (buf for gate in thresholds.gates for buf in gate.state_buffers())))
    assert float(held[0]) != 0.0  # tau moved in the held tensor itself


def test_gate_state_in_state_dict_does_not_share_memory(tmp_path):
    """The linked buffers are views of one matrix; state_dict hands out copies so safetensors (which
    refuses tensors sharing memory) can save a gated model."""
    from safetensors.torch import save_file

    model, optimizer, thresholds = make()
    train(model, optimizer, thresholds, range(1))
    gate_state = {k: v for k, v in model.state_dict().items() if "token_gate" in k}
    assert len({v.untyped_storage().data_ptr() for v in gate_state.values()}) == len(gate_state)
    save_file(gate_state, str(tmp_path / "gates.safetensors"))


def test_second_optimizer_over_the_same_gates_keeps_the_first_correct():
    """A later ThresholdOptimizer moves the gates' sums into its own table; the first one must notice."""
    model, optimizer, thresholds = make()
    reference, ref_optimizer, ref_thresholds = make()
    ThresholdOptimizer(thresholds.gates[:1])  # takes over the first gate's row
    train(model, optimizer, thresholds, range(3))
    train(reference, ref_optimizer, ref_thresholds, range(3))
    assert [float(g.tau) for g in thresholds.gates] == [float(g.tau) for g in ref_thresholds.gates]
    assert all(float(g.tau) != 0 for g in thresholds.gates)


# ---------------------------------------------------------------- what a pass records
@pytest.mark.parametrize("kind", ["lora", "dora", "adalora", "adapter"])
def test_eval_mode_with_autograd_counts_as_evaluation_and_leaves_tau_alone(kind):
    """model.eval() is evaluation in any grad mode: a hand-written loop (or a saliency pass) that forgets
    no_grad reports the same eval sparsity and output as one under no_grad, gets PEFT gradients, and
    neither queues g nor counts training tokens."""
    model = adapter_model() if kind == "adapter" else peft_model(kind)
    gates = add_token_gates(model, CONFIG)
    ThresholdOptimizer(gates)
    with torch.no_grad():  # a threshold between the tokens' ratios, so S has both values
        for gate in gates:
            gate.tau.fill_(0.03 if kind == "adalora" else 0.3)
    model.eval()
    x, mask, target = batch(0)
    with torch.no_grad():
        expected = model(x, attention_mask=mask)
    no_grad_counts = [gate.counts("eval") for gate in gates]
    for gate in gates:
        gate.reset_stats()
    out = model(x, attention_mask=mask)
    assert torch.allclose(out, expected, atol=1e-6)
    assert [gate.counts("eval") for gate in gates] == no_grad_counts
    assert any(0 < on < tokens for on, tokens in no_grad_counts)  # the check covers a mixed gate
    (((out - target) ** 2).sum(-1) * mask).sum().backward()
    assert all(gate.counts("train") == (0, 0) for gate in gates)
    assert all(gate.threshold_grad is None or float(gate.threshold_grad) == 0 for gate in gates)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


def test_eval_mode_gradients_are_those_of_the_dense_update_on_the_gated_tokens():
    """The differentiable evaluation path is autograd through base + S * delta with S fixed: at tau = 0
    (every token on) its PEFT gradients equal the training path's."""
    x, mask, target = batch(1)
    grads = []
    for train_mode in (True, False):
        model = peft_model("lora")
        add_token_gates(model, CONFIG)
        model.train(train_mode)
        (((model(x, attention_mask=mask) - target) ** 2).sum(-1) * mask).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for trained, evaluated in zip(*grads):
        assert torch.allclose(trained, evaluated, atol=1e-6)
