"""The C++ gated update (tsft/gate/csrc, tsft.gate.native) against the Python reference (tsft.gate.function),
in training (the autograd function) and in evaluation (gated_forward). The C++ backward's gradcheck is in
test_arithmetic.py, beside the Python one's.

Every other gate test runs on the C++ build (the default once it is built); these check that it computes
exactly what the Python ``GatedUpdate`` computes, and that the gate falls back to Python when it cannot
be built.
"""

from __future__ import annotations

import copy
import os
import pickle
import time
import warnings

import pytest
import torch
from torch.utils import cpp_extension

from tsft.gate import ThresholdOptimizer, add_token_gates, find_token_gates, native

from .conftest import adapter_model, peft_model, tiny_llama
from .test_training import CONFIG, batch, loss_fn

KINDS = ["lora", "dora", "adalora", "adapter"]


@pytest.fixture
def python_gate(monkeypatch):
    """The gate as it runs when the C++ build is not available."""
    monkeypatch.setattr(native, "_module", None)


def test_the_cpp_build_is_available():
    """make install builds it; without it every training step pays the Python around the gate (~2-3 %)."""
    if not native.enabled():
        pytest.skip("TSFT_GATE_NATIVE=0")
    assert native.module() is not None, "the C++ gated update did not build: run `make install` and read its output"


def _model(kind: str):
    if kind == "llama":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
        return get_peft_model(tiny_llama(), config)
    return adapter_model() if kind == "adapter" else peft_model(kind)


def _train(model, steps: int, autocast: bool = False, tau: float = 0.4):
    """A few steps with tau started inside the range of the ratios, so both sides of the gates are used."""
    gates = add_token_gates(model, CONFIG)
    for gate in gates:
        gate.tau.fill_(tau)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    thresholds = ThresholdOptimizer(gates)
    trace = []
    for step in range(steps):
        for micro in range(2):  # accumulation: two queued passes per gate and step
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = loss_fn(model, *batch(10 * step + micro))
            loss.backward()
            trace.append(loss.detach())
        trace += [gate.threshold_grad for gate in gates]
        trace += [torch.tensor(gate.counts("train")) for gate in gates]
        optimizer.step()
        thresholds.step()
        optimizer.zero_grad()
        trace += [gate.tau.clone() for gate in gates]
    trace += [p.detach().clone() for p in model.parameters()]
    return trace, gates


def _llama_batch(step: int):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 64, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[step % 3, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("kind", KINDS)
def test_cpp_and_python_gates_train_bit_for_bit_alike(kind, autocast, monkeypatch):
    """Losses, g, token counts, tau and weights over three accumulated steps, with padding and gates on
    both sides of tau: identical, not close (same tensor operations in the same order)."""
    if not native.module():
        pytest.skip("the C++ build is not available")
    model = _model(kind)
    twin = copy.deepcopy(model)
    tau = 0.04 if kind == "adalora" else 0.4  # AdaLoRA's updates are smaller here (scaling / ranknum)
    cpp, gates = _train(model, 3, autocast, tau)
    active = [gate.counts("train") for gate in gates]
    assert any(0 < on < tokens for on, tokens in active), active  # gated-off tokens are part of the check
    monkeypatch.setattr(native, "_module", None)
    python, _ = _train(twin, 3, autocast, tau)
    assert len(cpp) == len(python)
    for a, b in zip(cpp, python):
        assert a is not None and b is not None and torch.equal(a, b)


def test_cpp_and_python_gates_train_a_llama_alike(monkeypatch):
    """The same on a transformers Llama (rank-4 LoRA on q_proj and down_proj; padding in every batch)."""
    if not native.module():
        pytest.skip("the C++ build is not available")
    results = []
    for build in (native.module(), None):
        monkeypatch.setattr(native, "_module", build)
        model = _model("llama")
        gates = add_token_gates(model, CONFIG)
        thresholds = ThresholdOptimizer(gates)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(3):
            ids, mask = _llama_batch(step)
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
            optimizer.step(), thresholds.step(), optimizer.zero_grad()
        results.append([gate.tau.clone() for gate in gates] + [torch.tensor(g.counts("train")) for g in gates])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert all(float(tau) != 0 for tau in results[0][: len(gates)])


@pytest.mark.parametrize("kind", KINDS)
def test_cpp_and_python_evaluation_alike(kind, monkeypatch):
    """Evaluation passes (no autograd; C++ gated_forward): same outputs and eval counts, bit for bit."""
    if not native.module():
        pytest.skip("the C++ build is not available")
    results = []
    for build in (native.module(), None):
        monkeypatch.setattr(native, "_module", build)
        model = _model(kind)
        gates = add_token_gates(model, CONFIG)
        model.eval()
        for gate in gates:
            gate.tau.fill_(0.04 if kind == "adalora" else 0.4)
        with torch.no_grad():
            outputs = [model(x, attention_mask=mask) for x, mask, _ in map(batch, range(3))]
        results.append((outputs, [gate.counts("eval") for gate in gates], [gate.mean_norms("eval") for gate in gates]))
    (cpp_out, cpp_counts, cpp_norms), (py_out, py_counts, py_norms) = results
    assert all(torch.equal(a, b) for a, b in zip(cpp_out, py_out))
    assert cpp_counts == py_counts and any(0 < on < tokens for on, tokens in cpp_counts), cpp_counts
    assert cpp_norms == py_norms and all(ratio > 0 and norm > 0 for ratio, norm in cpp_norms), cpp_norms


def test_copies_of_a_model_carry_its_queued_records():
    """copy.deepcopy or pickle of a model between backward and threshold step: the records the C++ backward
    queued travel as Python records, so a pickle does not need the compiled module to load."""
    model = peft_model("lora")
    gates = add_token_gates(model, CONFIG)
    loss_fn(model, *batch(0)).backward()
    assert all(gate.accounting.queue is not None for gate in gates) == (native.module() is not None)
    pickled = pickle.dumps(model)
    assert b"tsft_gated_update" not in pickled
    twins = [find_token_gates(copy.deepcopy(model)), find_token_gates(pickle.loads(pickled))]
    assert all(gate.accounting.queued("train") == 1 for gate in gates + twins[0] + twins[1])
    expected = [(gate.threshold_grad, gate.counts("train")) for gate in gates]
    for twin in twins:
        for copied, (g, counts) in zip(twin, expected):
            assert torch.equal(copied.threshold_grad, g) and copied.counts("train") == counts


def test_a_failed_build_falls_back_to_python_with_one_warning(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(native, "_module", native._NOT_LOADED)
    monkeypatch.delenv("TSFT_GATE_NATIVE", raising=False)
    with pytest.warns(
        RuntimeWarning,
        match=r"could not be built \(Error building extension: c\+\+: not found\).*"
        r"TSFT_GATE_NATIVE=0",
    ):
        assert native.module() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the next gated layer does not warn again
        model = peft_model("lora")
        thresholds = ThresholdOptimizer(add_token_gates(model, CONFIG))
        loss_fn(model, *batch(0)).backward()
        thresholds.step()
    assert all(float(gate.tau) != 0 and gate.accounting.queue is None for gate in thresholds.gates)


def test_switched_off_by_the_environment(monkeypatch):
    builds = []
    monkeypatch.setattr(cpp_extension, "load", lambda *args, **kwargs: builds.append(args))
    monkeypatch.setattr(native, "_module", native._NOT_LOADED)
    monkeypatch.setenv("TSFT_GATE_NATIVE", "0")
    assert native.module() is None and builds == []


def test_a_lock_left_by_an_interrupted_build_is_removed(monkeypatch, tmp_path):
    """torch's loader waits for its lock file forever; one older than any build is a leftover."""
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path))
    lock = tmp_path / "lock"
    lock.touch()
    native._remove_stale_lock(cpp_extension)
    assert lock.exists()  # a build may be running now
    old = time.time() - native.STALE_LOCK_SECONDS - 1
    os.utime(lock, (old, old))
    native._remove_stale_lock(cpp_extension)
    assert not lock.exists()
    native._remove_stale_lock(cpp_extension)  # and no lock at all is fine
