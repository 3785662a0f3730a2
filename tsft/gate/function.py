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

``csrc/gated_update.cpp`` is this autograd function written in C++, operation for operation (bit-identical
results, tests/gate/test_native.py); training and evaluation use it when it is built (tsft.gate.native),
because the Python around ~20 tensor operations per gated layer costs a few % of a step. This file is the
reference, the fallback, and what runs under functorch transforms and torch.compile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from tsft.gate import native

if TYPE_CHECKING:
    from tsft.gate.gate import TokenGate


def update(
    base: torch.Tensor, u: torch.Tensor, B: torch.Tensor, k: Optional[torch.Tensor], bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """delta = u B^T (+ k (base - bias)) in base's dtype, in fresh memory (callers may write into it)."""
    delta = F.linear(u, B)  # u @ B^T as one call
    if delta.dtype != base.dtype:  # dtype checks in Python: a no-op ``.to`` still costs a dispatch
        delta = delta.to(base.dtype)
    if k is not None:
        frozen = base - bias if bias is not None else base
        delta.addcmul_(frozen, k.to(base.dtype))
    return delta


def update_and_mask(
    base: torch.Tensor,
    u: torch.Tensor,
    B: torch.Tensor,
    k: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    tau: torch.Tensor,
    ratio_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """delta and the gate S (Eq. 3) as a ``(..., 1)`` column of 0 / 1 in the output dtype, ready to
    multiply ``delta`` and, in backward, the rank-r terms. Runs without autograd (inside GatedUpdate or
    under no_grad), so ``delta`` and the norms are scratch tensors that may be updated in place."""
    delta = update(base, u, B, k, bias)
    norm_dtype = torch.promote_types(base.dtype, torch.float32)  # at least float32, even for bf16 models
    ratio = torch.linalg.vector_norm(delta, dim=-1, keepdim=True, dtype=norm_dtype)
    base_norm = torch.linalg.vector_norm(base, dim=-1, keepdim=True, dtype=norm_dtype)
    # r_i = ||delta_i|| / max(||base_i||, eps), then S_i = 1(r_i >= tau) written over r_i: in place on
    # fresh temporaries, one operation per step of Eq. 3 (inside a training step each extra small
    # operation costs 15-30 us, because the layer's GEMMs have just evicted its code and data from cache).
    on = ratio.div_(base_norm.clamp_min_(ratio_eps)).ge_(tau)
    return delta, on if on.dtype == base.dtype else on.to(base.dtype)


def gated_sum(base: torch.Tensor, on: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``base + S * delta``, written into ``delta``'s memory: one output-sized allocation fewer per
    layer, which on CPU saves the page faults of a fresh buffer (several % of a step at small widths)."""
    return torch.addcmul(base, on, delta, out=delta)


class GatedUpdate(torch.autograd.Function):
    """out = base + S * delta; backward also accumulates the threshold gradient g into the gate.

    The layer-sized products are the ones the dense method runs too; what the gate adds per layer is
    a fixed count of small operations, so this path avoids every conversion that is not needed
    (each costs a dispatch, which at small widths is a visible share of the step).
    """

    @staticmethod
    def forward(ctx, base, u, B, scale, k, bias, tau, real, gate_module: "TokenGate"):
        scaled_B = scaled(B, scale)
        delta, on = update_and_mask(base, u, scaled_B, k, bias, tau, gate_module.config.ratio_eps)
        ctx.gate_module, ctx.scale = gate_module, scale
        ctx.save_for_backward(u, scaled_B, on, real, k, bias, base if k is not None else None)
        return gated_sum(base, on, delta)

    @staticmethod
    def backward(ctx, grad_out):
        u, B, on, real, k, bias, base = ctx.saved_tensors
        width, rank = grad_out.shape[-1], u.shape[-1]
        on_u = on if on.dtype == u.dtype else on.to(u.dtype)
        # The rank-r products run in u's dtype. Under autocast (bf16-mixed) u is bf16 while B is still the
        # float32 parameter, as autocast's own linear would cast it; autograd casts grad_B back to B's dtype.
        if B.dtype != u.dtype:
            B = B.to(u.dtype)
        g_lr = grad_out if grad_out.dtype == u.dtype else grad_out.to(u.dtype)
        acc = torch.promote_types(grad_out.dtype, torch.float32)  # mu and g are accumulated in >= float32

        # grad_B = c (S g)^T u (B was saved scaled, u was not). A constant c is the GEMM's alpha; a tensor c
        # (AdaLoRA's rank count) goes onto the (..., 1) mask column: either way no pass over a fresh GEMM output.
        alpha, on_c = (ctx.scale, on_u) if isinstance(ctx.scale, (int, float)) else (1, on_u * ctx.scale)
        if on_c.dtype != u.dtype:  # a float32 rank count on a bf16 mask (autocast) promotes it
            on_c = on_c.to(u.dtype)
        u_on = (u * on_c).reshape(-1, rank)
        g2 = g_lr.reshape(-1, width)
        if rank < 16:
            # Very thin products run 2-3x faster on CPU GEMM in transposed form, (r, out) @ (out, T) and
            # (r, T) @ (T, out), than as g @ B and g^T @ u (timed per product for r = 4, 8; from r = 16
            # the direct form is as fast or faster). scripts/bench_gate_overhead.py times whole steps.
            Bt = B.t()
            gB = (Bt @ g2.t()).t().reshape(u.shape)  # splitting the token dim again is a view
            grad_B = torch.addmm(Bt, u_on.t(), g2, beta=0, alpha=alpha).t()  # beta=0: Bt only gives the shape
        else:
            gB = g_lr @ B
            grad_B = torch.addmm(B, g2.t(), u_on, beta=0, alpha=alpha)
        # gB (..., r) is what LoRA's own backward computes for d loss / d u; grad_B = (S g)^T u needs
        # no (T, out) copy of g. mu (Eq. 9) goes through the low-rank factor: <g_i, delta_i> = <g_i B, u_i>.
        mu = torch.linalg.vecdot(gB, u) if gB.dtype == acc else (gB.to(acc) * u.to(acc)).sum(-1)
        grad_u = gB * on_u  # gated-off tokens get no gradient

        grad_base, grad_k = grad_out, None
        if k is not None:
            frozen = base - bias if bias is not None else base
            g_frozen = (grad_out * frozen).to(acc)  # (..., out), shared by mu and grad_k
            mu = mu + g_frozen @ k.to(acc)
            if ctx.needs_input_grad[4]:  # k
                grad_k = (on.reshape(-1).to(acc) @ g_frozen.reshape(-1, width)).to(k.dtype)
            # d out / d base = 1 + S * k, because the DoRA delta rescales the frozen output.
            grad_base = torch.addcmul(grad_out, grad_out * k.to(grad_out.dtype), on.to(grad_out.dtype))

        ctx.gate_module.accumulate_threshold_grad(mu, on, real)
        return grad_base, grad_u, grad_B, None, grad_k, None, None, None, None


# ``GatedUpdate.apply`` first runs functorch's argument handling in Python (unwrapping dead wrappers,
# looking for a setup_context), which only matters under functorch transforms (vmap, grad) and cost
# ~40 us per gated layer inside a training step: 0.7 % of a step of the width-256 benchmark Llama
# (scripts/bench_gate_overhead.py). Training enters autograd's C++ ``apply`` directly, as that
# wrapper itself does last; under functorch or torch.compile the public ``apply`` runs unchanged.
_cpp_apply = super(torch.autograd.Function, GatedUpdate).apply


def apply_gated_update(base, u, B, scale, k, bias, tau, real, gate_module: "TokenGate") -> torch.Tensor:
    """``GatedUpdate.apply`` (same arguments), by the C++ build of this function when it is available
    (tsft.gate.native), else without the Python prologue when that is not needed."""
    if _transforms_or_compiling():
        return GatedUpdate.apply(base, u, B, scale, k, bias, tau, real, gate_module)
    compiled = native.module()
    if compiled is None:
        return _cpp_apply(base, u, B, scale, k, bias, tau, real, gate_module)
    accounting = gate_module.accounting
    if accounting.queue is None:
        accounting.queue = compiled.RecordQueue()
    number, tensor = _number_or_tensor(scale)
    eps = gate_module.config.ratio_eps
    return compiled.gated_update(base, u, B, number, tensor, k, bias, tau, real, eps, accounting.queue)


def update_mask_and_norms(
    base: torch.Tensor,
    u: torch.Tensor,
    B: torch.Tensor,
    k: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    tau: torch.Tensor,
    ratio_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``update_and_mask`` for evaluation, which also returns each token's ``(r_i, ||delta_i||)`` as a
    ``(..., 2)`` float32 (or wider) tensor: the relative and absolute update norms that Table 4's norm
    criteria rank modules by. Not used in training, so the training step keeps its in-place ratio."""
    delta = update(base, u, B, k, bias)
    norm_dtype = torch.promote_types(base.dtype, torch.float32)
    delta_norm = torch.linalg.vector_norm(delta, dim=-1, keepdim=True, dtype=norm_dtype)
    base_norm = torch.linalg.vector_norm(base, dim=-1, keepdim=True, dtype=norm_dtype)
    ratio = delta_norm / base_norm.clamp_min_(ratio_eps)
    on = ratio.ge(tau)
    return delta, on if on.dtype == base.dtype else on.to(base.dtype), torch.cat((ratio, delta_norm), dim=-1)


def gated_forward(base, u, B, scale, k, bias, tau, ratio_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(base + S * delta, S, norms)`` outside autograd (evaluation, generation), by the C++ build when it is
    available: at one token per sequence, as in generation, the Python around the gate's operations is most of
    its cost. ``norms`` holds ``(r_i, ||delta_i||)`` per token (``update_mask_and_norms``)."""
    compiled = None if _transforms_or_compiling() else native.module()
    if compiled is None:
        delta, on, norms = update_mask_and_norms(base, u, scaled(B, scale), k, bias, tau, ratio_eps)
        return gated_sum(base, on, delta), on, norms
    return compiled.gated_forward(base, u, B, *_number_or_tensor(scale), k, bias, tau, ratio_eps)


def differentiable_eval_forward(
    base, u, B, scale, k, bias, tau, ratio_eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(base + S * delta, S, norms)`` in eval mode with autograd on (saliency, attribution, adversarial evaluation):
    the same S as ``gated_forward``, differentiable in the input and the PEFT weights by plain autograd.

    S is held fixed (it is a step function: its derivative is zero almost everywhere) and tau gets
    no gradient, because Eq. 15 is a training statistic: a backward through an evaluation pass must not
    move the threshold. Not a hot path, so it is written for clarity rather than speed."""
    scaled_B = scaled(B, scale)
    with torch.no_grad():
        _, on, norms = update_mask_and_norms(base, u, scaled_B, k, bias, tau, ratio_eps)
    delta = F.linear(u, scaled_B)
    if delta.dtype != base.dtype:
        delta = delta.to(base.dtype)
    if k is not None:
        frozen = base - bias if bias is not None else base
        delta = delta + frozen * k.to(base.dtype)
    return torch.addcmul(base, on, delta), on, norms


def _transforms_or_compiling() -> bool:
    return torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling()


def _number_or_tensor(scale) -> tuple[float, Optional[torch.Tensor]]:
    """The C++ functions take the branch constant c as a number, or as a tensor with the number 1."""
    return (1.0, scale) if isinstance(scale, torch.Tensor) else (scale, None)


def scaled(B: torch.Tensor, scale) -> torch.Tensor:
    """``B * scale``, skipping the multiply for the common ``scale == 1``."""
    return B if _is_one(scale) else B * scale


def _is_one(scale) -> bool:
    return isinstance(scale, (int, float)) and scale == 1
