"""The gated update as one autograd function (Eq. 2-3 forward, Eq. 9 and Eq. 15 in backward).

Every supported PEFT update has the form

    delta = u @ (c B)^T  (+ k * (base - bias)   for DoRA)

where ``u`` is the rank-r activation of the PEFT branch (LoRA ``A dropout(x)``, AdaLoRA
``(A * E) dropout(x)``, adapter ``act(down(dropout(x)))``), ``B`` the up-projection and ``c`` the
branch's constant scaling (LoRA ``alpha / r``, the adapter's ``scale``; DoRA passes ``c = 1`` and a
``B`` that carries its trainable magnitude). ``c`` is applied inside the function rather than by the
caller: a ``B * c`` outside would add an autograd node per layer. DoRA's
``k = m / ||W0 + s B A||_c - 1`` rescales the frozen output; its column norm is detached as in peft
(DoRA paper §4.3), so ``k`` is a plain vector.

Writing the gate around this factorisation rather than around a materialised ``delta`` is what
keeps it free: backward needs ``g B`` (r columns) for the PEFT gradient anyway, and
``mu_i = <g_i, delta_i> = <g_i B, u_i>`` (+ the DoRA term) reuses it, so no output-sized
tensor is saved beyond what the dense PEFT method itself saves (DoRA keeps ``base``, as peft does).

Output: ``out = base + S * delta`` with ``S_i = 1(r_i >= tau)``, ``r_i = ||delta_i|| / ||base_i||``.
``base`` is the frozen layer's full output ``W0 x + b``: it is what a gated-off token keeps
(Eq. 2), so the ratio measures the update against what the token would otherwise carry.
(Llama-family projections have no bias, so the choice only matters for encoder models.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from tsft.gate.gate import TokenGate


def update_and_mask(
    base: torch.Tensor,
    u: torch.Tensor,
    B: torch.Tensor,
    k: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    tau: torch.Tensor,
    ratio_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """delta and the gate S (Eq. 3). Runs without autograd (inside GatedUpdate or under no_grad), so
    ``delta`` is a scratch tensor that may be updated in place."""
    delta = u @ B.t()
    if delta.dtype != base.dtype:  # dtype checks in Python: a no-op ``.to`` still costs a dispatch
        delta = delta.to(base.dtype)
    if k is not None:
        frozen = base - bias if bias is not None else base
        delta.addcmul_(frozen, k.to(base.dtype))
    norm_dtype = torch.promote_types(base.dtype, torch.float32)  # at least float32, even for bf16 models
    delta_norm = torch.linalg.vector_norm(delta, dim=-1, dtype=norm_dtype)
    base_norm = torch.linalg.vector_norm(base, dim=-1, dtype=norm_dtype)
    ratio = delta_norm / base_norm.clamp_min(ratio_eps)
    return delta, ratio >= tau


def gated_sum(base: torch.Tensor, gate: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``base + S * delta``, written into ``delta``'s memory: one output-sized allocation fewer per
    layer, which on CPU saves the page faults of a fresh buffer (several % of a step at small widths).
    Also returns S as a ``(..., 1)`` column in the output dtype, which backward reuses."""
    on = gate.unsqueeze(-1).to(base.dtype)
    return torch.addcmul(base, on, delta, out=delta), on


class GatedUpdate(torch.autograd.Function):
    """out = base + S * delta; backward also accumulates the threshold gradient g into the gate.

    The layer-sized products are the ones the dense method runs too; what the gate adds per layer is
    a fixed count of small operations, so this path avoids every conversion that is not needed
    (each costs a dispatch, which at small widths is a visible share of the step).
    """

    @staticmethod
    def forward(ctx, base, u, B, scale, k, bias, tau, real, gate_module: "TokenGate"):
        scaled_B = scaled(B, scale)
        delta, gate = update_and_mask(base, u, scaled_B, k, bias, tau, gate_module.config.ratio_eps)
        out, on = gated_sum(base, gate, delta)
        ctx.gate_module, ctx.scale = gate_module, scale
        ctx.save_for_backward(u, scaled_B, gate, on, real, k, bias, base if k is not None else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        u, B, gate, on, real, k, bias, base = ctx.saved_tensors
        width = grad_out.shape[-1]
        g = grad_out.reshape(-1, width)
        u2 = u.reshape(-1, u.shape[-1])
        on = on.reshape(-1, 1)
        if on.dtype != u2.dtype:
            on = on.to(u2.dtype)
        g_lr = g if g.dtype == B.dtype else g.to(B.dtype)
        acc = torch.promote_types(g.dtype, torch.float32)  # mu and g are accumulated in >= float32

        # grad_B = c (S g)^T u (B was saved scaled, u was not): c goes onto the (T, 1) mask column
        # rather than onto the GEMM's output, one pass fewer over a fresh GEMM output (inside the
        # training step, ``grad_B *= c`` took ~40 us per layer; timed alone, ~5 us).
        u_on = u2 * _scaled_mask(on, ctx.scale)
        if u2.shape[-1] < 16:
            # Very thin products run 2-3x faster on CPU GEMM in transposed form, (r, out) @ (out, T) and
            # (r, T) @ (T, out), than as g @ B and g^T @ u (timed per product for r = 4, 8; from r = 16
            # the direct form is as fast or faster). scripts/bench_gate_overhead.py times whole steps.
            gB, grad_B = (B.t() @ g_lr.t()).t(), (u_on.t() @ g_lr).t()
        else:
            gB, grad_B = g_lr @ B, g_lr.t() @ u_on
        # gB (T, r) is what LoRA's own backward computes for d loss / d u; grad_B = (S g)^T u needs
        # no (T, out) copy of g. mu (Eq. 9) goes through the low-rank factor: <g_i, delta_i> = <g_i B, u_i>.
        mu = torch.linalg.vecdot(gB, u2) if gB.dtype == acc else (gB.to(acc) * u2.to(acc)).sum(-1)
        grad_u = (gB * on).reshape(u.shape)  # gated-off tokens get no gradient

        grad_base, grad_k = grad_out, None
        if k is not None:
            frozen = (base - bias if bias is not None else base).reshape(-1, width)
            g_frozen = (g * frozen).to(acc)  # (T, out), shared by mu and grad_k
            mu = mu + g_frozen @ k.to(acc)
            if ctx.needs_input_grad[4]:  # k
                grad_k = (on.reshape(-1).to(acc) @ g_frozen).to(k.dtype)
            # d out / d base = 1 + S * k, because the DoRA delta rescales the frozen output.
            grad_base = torch.addcmul(g, g * k.to(g.dtype), on.to(g.dtype)).reshape(grad_out.shape)

        ctx.gate_module.accumulate_threshold_grad(mu, gate, real)
        return grad_base, grad_u, grad_B, None, grad_k, None, None, None, None


def scaled(B: torch.Tensor, scale) -> torch.Tensor:
    """``B * scale``, skipping the multiply for the common ``scale == 1``."""
    return B if _is_one(scale) else B * scale


def _scaled_mask(on: torch.Tensor, scale) -> torch.Tensor:
    if _is_one(scale):
        return on
    scaled_on = on * scale
    return scaled_on if scaled_on.dtype == on.dtype else scaled_on.to(on.dtype)


def _is_one(scale) -> bool:
    return isinstance(scale, (int, float)) and scale == 1
