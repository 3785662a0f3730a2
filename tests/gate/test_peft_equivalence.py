"""With every token gated on, each gated method is the peft method: same output, same gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tsft.gate import GateConfig, ThresholdOptimizer, add_parallel_adapters, add_token_gates, remove_token_gates
from tsft.gate.hosts import GatedParallelAdapter, GatedSVDLinear

from .conftest import TwoLayer, peft_model

X = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1))
COTANGENT = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(2))


def outputs_and_grads(model, x):
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * COTANGENT).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads, x.grad


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora"])
def test_delta_and_gradients_equal_peft(kind):
    """tau = 0 gates every token on (r >= 0): the gated layer must reproduce peft, backward included."""
    dense = peft_model(kind)
    gated = copy.deepcopy(dense)
    add_token_gates(gated, GateConfig())
    dense.train(), gated.train()  # dropout is 0 here; see the DoRA note in tsft.gate.hosts
    out_d, grads_d, xgrad_d = outputs_and_grads(dense, X)
    out_g, grads_g, xgrad_g = outputs_and_grads(gated, X)
    torch.testing.assert_close(out_g, out_d, rtol=1e-5, atol=1e-6)
    assert grads_g.keys() == grads_d.keys() and len(grads_d) >= 4
    for name in grads_d:
        torch.testing.assert_close(grads_g[name], grads_d[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(xgrad_g, xgrad_d, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["dora", "adalora"])
def test_eval_with_dropout_equals_peft(kind):
    dense = peft_model(kind, dropout=0.3).eval()
    gated = copy.deepcopy(dense)
    add_token_gates(gated, GateConfig())
    with torch.no_grad():
        torch.testing.assert_close(gated(X), dense(X), rtol=1e-5, atol=1e-6)


def test_dora_mu_is_the_projection_on_peft_delta():
    """mu_i = <dL/dh_i, delta_i> with delta = peft's DoRA output minus the frozen output."""
    dense = peft_model("dora")
    layer = dense.base_model.model.v
    x = torch.tanh(dense.base_model.model.q(X)).detach()
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
    gated = copy.deepcopy(dense)
    (_, gate_v) = add_token_gates(gated, GateConfig(lam=0.0))
    out = gated.base_model.model.v(x)
    (out * COTANGENT).sum().backward()
    mu = (COTANGENT * delta).sum(-1).flatten()
    expected = torch.where(mu >= 0, mu, torch.zeros_like(mu)).sum()  # all S = 1: only mu >= 0 count
    assert float(gate_v.threshold_grad) == pytest.approx(float(expected), rel=1e-5)


def test_zero_initialised_lora_equals_lora_exactly_at_step_0():
    torch.manual_seed(0)
    dense = get_peft_model(TwoLayer(), LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"]))  # B = 0
    gated = copy.deepcopy(dense)
    add_token_gates(gated, GateConfig(lam=1e-3))
    out_d, grads_d, _ = outputs_and_grads(dense, X)
    out_g, grads_g, _ = outputs_and_grads(gated, X)
    assert torch.equal(out_g, out_d)
    for name in grads_d:
        torch.testing.assert_close(grads_g[name], grads_d[name], rtol=1e-6, atol=0, msg=name)


def test_parallel_adapter_starts_as_identity_and_gates_like_the_dense_adapter():
    torch.manual_seed(0)
    model = TwoLayer()
    with torch.no_grad():
        reference = model(X)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = add_parallel_adapters(model, ["q", "v"], hidden_size=3, scale=2.0)
    assert len(layers) == 2 and all(p.requires_grad for layer in layers for p in layer.adapter_down.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(X), reference)  # zero-initialised up projection
        for layer in layers:
            layer.adapter_up.weight.normal_()
    gated = copy.deepcopy(model)
    add_token_gates(gated, GateConfig())
    assert all(isinstance(layer, GatedParallelAdapter) for layer in (gated.q, gated.v))
    out_d, grads_d, _ = outputs_and_grads(model, X)
    out_g, grads_g, _ = outputs_and_grads(gated, X)
    torch.testing.assert_close(out_g, out_d, rtol=1e-5, atol=1e-6)
    for name in grads_d:
        torch.testing.assert_close(grads_g[name], grads_d[name], rtol=1e-4, atol=1e-6, msg=name)


def test_adapter_target_that_does_not_exist_is_named():
    with pytest.raises(ValueError, match=r"\['nope'\] not found.*\['q', 'v'\]"):
        add_parallel_adapters(TwoLayer(), ["q", "nope"], hidden_size=2, scale=1.0)


def test_gated_layers_refuse_to_merge():
    pm = peft_model("lora")
    add_token_gates(pm, GateConfig())
    with pytest.raises(RuntimeError, match="token-gated: merging would apply its update to every token"):
        pm.merge_and_unload()


def test_classes_swap_and_restore():
    pm = peft_model("adalora")
    gates = add_token_gates(pm, GateConfig())
    assert [type(m) for m in (pm.base_model.model.q, pm.base_model.model.v)] == [GatedSVDLinear] * 2
    assert [g.name for g in gates] == ["base_model.model.q", "base_model.model.v"]
    assert not any("lora_" in name for name, _ in pm.named_buffers() if "token_gate" in name)
    assert not any("token_gate" in name for name, _ in pm.named_parameters())
    remove_token_gates(pm)
    assert type(pm.base_model.model.q).__name__ == "SVDLinear"
    with pytest.raises(ValueError, match="no PEFT layer found"):
        add_token_gates(TwoLayer(), GateConfig())


def test_adalora_allocator_prunes_ranks_of_gated_layers():
    pm = peft_model("adalora")
    gates = add_token_gates(pm, GateConfig(lam=1e-2, s=1e-2))
    thresholds = ThresholdOptimizer(gates)
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for step in range(8):
        out = pm(X)
        (out * COTANGENT).sum().backward()
        optimizer.step()
        thresholds.step()
        pm.base_model.update_and_allocate(step)  # scores lora_A/B/E by name; must not trip on the gates
        optimizer.zero_grad()
    ranks = [
        int((pm.base_model.model.q.lora_E["default"] != 0).sum()),
        int((pm.base_model.model.v.lora_E["default"] != 0).sum()),
    ]
    assert sum(ranks) < 2 * 4  # the allocator masked singular values of the gated layers
    assert all(float(g.tau) > 0 for g in gates)
    assert isinstance(pm.base_model.model.q, GatedSVDLinear)
