"""Eq. 2-3, 9, 15-21 on cases small enough to check by hand."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tsft.gate import GateConfig, ThresholdOptimizer, add_token_gates, sparsity_report
from tsft.gate.function import GatedUpdate, apply_gated_update, update_and_mask

from .conftest import OneLinear

# Identity base, LoRA r=1 with A = [1, 0], B = [1, 0]^T, scaling 1: delta(x) = (x0, 0).
# token   x            base        delta      r = |x0| / ||x||
#   1   (1, 0)       (1, 0)      (1, 0)     1
#   2   (0.1, 1)     (0.1, 1)    (0.1, 0)   0.1/sqrt(1.01) = 0.0995
#   3   (0.5, 0.5)   (0.5, 0.5)  (0.5, 0)   0.7071
TOKENS = torch.tensor([[[1.0, 0.0], [0.1, 1.0], [0.5, 0.5]]])
# dL/dh per token, chosen so that mu = <c_i, delta_i> = (1, -0.1, -1).
COTANGENT = torch.tensor([[[1.0, 0.0], [-1.0, 5.0], [-2.0, 0.0]]])


def hand_model(tau: float, lam: float = 0.01, s: float = 0.1, adam: bool = True):
    pm = get_peft_model(OneLinear(), LoraConfig(r=1, lora_alpha=1, target_modules=["proj"], init_lora_weights=False))
    layer = pm.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor([[1.0, 0.0]]))
        layer.lora_B["default"].weight.copy_(torch.tensor([[1.0], [0.0]]))
    (gate,) = add_token_gates(pm, GateConfig(lam=lam, s=s, adam=adam))
    gate.tau.fill_(tau)
    return pm, gate


def backward_once(pm, mask=None):
    out = pm(TOKENS, attention_mask=mask)
    (out * COTANGENT).sum().backward()
    return out


def test_gated_forward_by_hand():
    pm, _ = hand_model(tau=0.5)  # S = (1, 0, 1)
    with torch.no_grad():
        out = pm(TOKENS)
    expected = torch.tensor([[[2.0, 0.0], [0.1, 1.0], [1.0, 0.5]]])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("scale", [2.0, -2.0, "tensor"])  # LoRA / adapter number, its sign, AdaLoRA's tensor
@pytest.mark.parametrize("grad", [True, False])
def test_gated_forward_with_branch_scaling_by_hand(scale, grad):
    """r_i is the norm of the *scaled* update: c = 2 doubles the ratios of TOKENS to (2, 0.199, 1.414),
    so tau = 1.2 keeps tokens 1 and 3 on (unscaled ratios would switch every token off)."""
    _, gate = hand_model(tau=1.2)
    c = torch.tensor(2.0) if scale == "tensor" else scale
    base = TOKENS.clone().requires_grad_(grad)
    u = TOKENS[..., :1].clone()  # A = [1, 0]
    B = torch.tensor([[1.0], [0.0]], requires_grad=grad)
    with torch.set_grad_enabled(grad):
        out = gate(base, u, B, c)
    sign = -1.0 if scale == -2.0 else 1.0
    expected = torch.tensor([[[1 + 2 * sign, 0.0], [0.1, 1.0], [0.5 + sign, 0.5]]])
    torch.testing.assert_close(out.detach(), expected)


def test_threshold_grad_follows_eq15():
    pm, gate = hand_model(tau=0.5, lam=0.01)
    backward_once(pm)
    # token 1: mu=1 >= 0 and S=1 -> consistent, +1 ; token 2: mu=-0.1 < 0 and S=0 -> consistent, -0.1
    # token 3: mu=-1 < 0 but S=1 -> masked out ; lambda * (S1 + S3) = 0.02
    assert float(gate.threshold_grad) == pytest.approx(1 - 0.1 + 0.02, abs=1e-6)
    assert gate.counts("train") == (2, 3)
    assert gate.sparsity("train") == pytest.approx(1 / 3)


def reference_adam(tau, grads, s, alpha=1.0, b1=0.9, b2=0.98, eps=1e-8):
    """Eq. 16-20 in plain Python, one scalar."""
    m = v = 0.0
    taus = []
    for k, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**k), v / (1 - b2**k)
        tau = tau + alpha * s * m_hat / (math.sqrt(v_hat) + eps)
        taus.append(tau)
    return taus


def test_adam_threshold_steps_flip_a_token():
    """tau climbs 0.5 -> 0.6 -> 0.7 -> 0.8; at 0.8 token 3 (r = 0.707) is gated off and g changes sign."""
    pm, gate = hand_model(tau=0.5, lam=0.01, s=0.1)
    thresholds = ThresholdOptimizer([gate])
    seen_g, seen_tau = [], []
    for _ in range(4):
        backward_once(pm)
        seen_g.append(float(gate.threshold_grad))
        thresholds.step()
        seen_tau.append(float(gate.tau))
    # steps 1-3: S = (1, 0, 1), g = 0.92; step 4 (tau = 0.8): S = (1, 0, 0), token 3 now consistent:
    # g = 1 - 0.1 - 1 + 0.01 = -0.09
    assert seen_g == pytest.approx([0.92, 0.92, 0.92, -0.09], abs=1e-6)
    assert seen_tau == pytest.approx(reference_adam(0.5, [0.92, 0.92, 0.92, -0.09], s=0.1), abs=1e-6)
    assert seen_tau[:3] == pytest.approx([0.6, 0.7, 0.8], abs=1e-6)
    assert float(gate.step) == 4
    assert gate.threshold_grad is None  # consumed by the step


def test_plain_step_without_adam():
    pm, gate = hand_model(tau=0.5, lam=0.01, s=0.1, adam=False)
    backward_once(pm)
    ThresholdOptimizer([gate]).step()
    assert float(gate.tau) == pytest.approx(0.5 + 0.1 * 0.92, abs=1e-6)


def test_padding_is_left_out_of_g_and_sparsity():
    pm, gate = hand_model(tau=0.5, lam=0.01)
    backward_once(pm, mask=torch.tensor([[1, 0, 1]]))  # token 2 is padding
    assert float(gate.threshold_grad) == pytest.approx(1 + 0.02, abs=1e-6)
    assert gate.counts("train") == (2, 2)
    assert gate.sparsity("train") == 0.0
    pm.eval()  # eval statistics are counted by modules in eval mode
    with torch.no_grad():
        pm(TOKENS, attention_mask=torch.tensor([[1, 0, 1]]))
    assert gate.counts("eval") == (2, 2)
    report = sparsity_report([gate], split="train")
    assert report["overall"] == 0.0 and report["modules"][0]["tokens"] == 2


def test_kv_cache_positions_take_the_newest_mask_columns():
    pm, gate = hand_model(tau=0.5)
    pm.eval()
    with torch.no_grad():  # one new token (token 3 of TOKENS) with a 3-long mask whose last entry is real
        pm(TOKENS[:, 2:], attention_mask=torch.tensor([[0, 1, 1]]))
    assert gate.counts("eval") == (1, 1)


def test_gated_off_tokens_give_peft_no_gradient():
    pm, _ = hand_model(tau=0.5)
    out = pm(TOKENS)
    out[:, 1].sum().backward()  # token 2 is gated off
    for name, p in pm.named_parameters():
        if p.requires_grad:
            assert torch.count_nonzero(p.grad) == 0, name
    pm.zero_grad()
    pm(TOKENS)[:, 0].sum().backward()  # token 1 is gated on
    assert any(torch.count_nonzero(p.grad) for p in pm.parameters() if p.requires_grad)


@pytest.mark.parametrize("rank", [2, 16])  # backward takes thin products (r < 16) in transposed form
@pytest.mark.parametrize("with_dora", [False, True])
# the branch's scaling is applied inside the function: a number (LoRA, adapter; either sign) or a tensor
# (AdaLoRA's scaling / ranknum, which goes onto the mask in backward)
@pytest.mark.parametrize("scale", [1.0, 0.75, -0.75, "tensor"])
# the Python function, and the training entry point: the C++ build (tsft/gate/csrc) when it is built
@pytest.mark.parametrize("apply", [GatedUpdate.apply, apply_gated_update], ids=["python", "entry-point"])
def test_gated_update_gradcheck(with_dora, rank, scale, apply):
    """The hand-written backward equals finite differences (float64), with S held away from tau."""
    torch.manual_seed(0)
    if scale == "tensor":
        scale = torch.tensor(0.75, dtype=torch.float64)
    base = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, 3, rank, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, rank, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, dtype=torch.float64, requires_grad=True) if with_dora else None
    bias = torch.randn(5, dtype=torch.float64) if with_dora else None
    gate = add_token_gates(_any_gateable(), GateConfig())[0]
    with torch.no_grad():  # tau halfway between the middle two ratios: half the tokens on, none near the edge
        delta, _ = update_and_mask(base, u, B * scale, k, bias, torch.tensor(0.0), 1e-6)
        ratios = (delta.norm(dim=-1) / base.norm(dim=-1)).flatten().sort().values
    tau = (ratios[2] + ratios[3]) / 2

    def fn(base, u, B, *k):
        return apply(base, u, B, scale, k[0] if k else None, bias, tau, None, gate)

    inputs = (base, u, B) + ((k,) if with_dora else ())
    with torch.no_grad():
        _, on = update_and_mask(base, u, B * scale, k, bias, tau, 1e-6)
    assert 0 < int(on.sum()) < on.numel()  # both branches of the gate are exercised
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_training_entry_point_equals_the_public_apply():
    """apply_gated_update (the C++ build, or autograd's C++ apply entered directly): same output, gradients and
    queued g as GatedUpdate.apply; under a functorch transform it defers to the public apply (and its error)."""
    torch.manual_seed(0)
    results = []
    for apply in (GatedUpdate.apply, apply_gated_update):
        gate = add_token_gates(_any_gateable(), GateConfig(lam=0.01))[0]
        base, u, B = (torch.randn(*shape, requires_grad=True) for shape in ((2, 3, 5), (2, 3, 4), (5, 4)))
        torch.manual_seed(1)
        out = apply(base, u, B, 0.5, None, None, torch.tensor(0.3), None, gate)
        out.backward(torch.randn_like(out))
        results.append((out.detach(), base.grad, u.grad, B.grad, gate.threshold_grad))
        torch.manual_seed(0)
    for public, direct in zip(*results):
        assert torch.equal(public, direct)

    def loss(b):
        return apply_gated_update(b, u, B, 0.5, None, None, torch.tensor(0.3), None, gate).sum()

    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(loss)(base)


def _any_gateable():
    return get_peft_model(OneLinear(), LoraConfig(r=1, target_modules=["proj"]))


@pytest.mark.parametrize("grad", [False, True])  # gated_forward, and the differentiable evaluation pass
def test_evaluation_records_the_update_norms_of_real_tokens(grad):
    """Table 4's norm criteria by hand: ||delta|| = (1, 0.1, 0.5), r = (1, 0.0995, 0.7071). With token 2 as
    padding: mean r = (1 + 0.7071) / 2, mean ||delta|| = 0.75; training passes record no norms."""
    pm, gate = hand_model(tau=0.5)
    backward_once(pm)
    assert gate.mean_norms("train") == (None, None)
    pm.eval()
    inputs = TOKENS.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        pm(inputs, attention_mask=torch.tensor([[1, 0, 1]]))
    ratio, norm = gate.mean_norms("eval")
    assert ratio == pytest.approx((1 + 0.5 / math.sqrt(0.5)) / 2, rel=1e-6)
    assert norm == pytest.approx(0.75, rel=1e-6)
    module = sparsity_report([gate], split="eval")["modules"][0]
    assert module["mean_relative_norm"] == pytest.approx(ratio) and module["mean_norm"] == pytest.approx(norm)
    gate.reset_stats("eval")
    assert gate.mean_norms("eval") == (None, None)


def test_summary_names_the_trainable_weights_of_each_gated_module():
    """LoRA r = 1 on a 2 -> 2 layer: A (1 x 2) and B (2 x 1) are the module's 4 trainable weights."""
    from tsft.gate import sparsity_summary

    _, gate = hand_model(tau=0.5)
    assert sparsity_summary([gate])["modules"][0]["trainable_params"] == 4
