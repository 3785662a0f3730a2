"""The threshold update of TS-PEFT: proximal step with an Adam-style scale (paper Eq. 15-20)."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from tsft.gate.accounting import reduce_pending, zero_grads
from tsft.gate.config import GateConfig
from tsft.gate.gate import TokenGate


class ThresholdOptimizer:
    """Moves every gate's tau once per optimizer step.

    The gates' backward passes have summed ``g`` (Eq. 15) over the real tokens of every
    micro-batch since the last step; ``step`` sums it across data-parallel ranks, so all ranks
    take the same step, then applies (per gate, elementwise over the stacked gates)

        m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2            (Eq. 16-17)
        tau <- tau + alpha s m_hat / (sqrt(v_hat) + eps)               (Eq. 18-20)

    or, with ``adam=False``, the plain step ``tau <- tau + alpha s g`` (Figure 3(b)).
    A positive ``g`` (active tokens, or active tokens whose update points up the loss) raises tau,
    switching updates off; Eq. 10's surrogate ``dS/dtau = -s`` is why the step adds ``+s g``.
    """

    def __init__(self, gates: Iterable[TokenGate], config: Optional[GateConfig] = None) -> None:
        self.gates = list(gates)
        if not self.gates:
            raise ValueError("ThresholdOptimizer needs at least one TokenGate")
        self.config = config or self.gates[0].config

    @torch.no_grad()
    def step(self) -> None:
        cfg = self.config
        reduce_pending(self.gates)  # all gates' queued backward records in one batched pass
        # The gates' scalars are stacked into vectors, stepped together, and written back with one
        # foreach copy per state: per-gate Python loops cost more than the arithmetic.
        taus = [gate.tau for gate in self.gates]
        tau = torch.stack(taus)
        g = self._gathered_grad(tau.device).to(tau.dtype)
        if cfg.adam:
            steps, ms, vs = ([getattr(gate, name) for gate in self.gates] for name in ("step", "exp_avg", "exp_avg_sq"))
            step = torch.stack(steps) + 1
            m = torch.stack(ms).mul_(cfg.beta1).add_(g, alpha=1 - cfg.beta1)
            v = torch.stack(vs).mul_(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
            m_hat = m / (1 - cfg.beta1**step)
            v_hat = v / (1 - cfg.beta2**step)
            tau += cfg.alpha * cfg.s * m_hat / (v_hat.sqrt() + cfg.eps)
            for state, new_values in ((steps, step), (ms, m), (vs, v)):
                torch._foreach_copy_(state, list(new_values.unbind(0)))
        else:
            tau += cfg.alpha * cfg.s * g
        torch._foreach_copy_(taus, list(tau.unbind(0)))
        self.zero_grad()

    def zero_grad(self) -> None:
        zero_grads(self.gates)

    def _gathered_grad(self, device: torch.device) -> torch.Tensor:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        accounts = [gate.accounting for gate in self.gates]
        g = torch.stack([account.grad if account.has_grad else zero for account in accounts])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(g)  # one collective for all gates: every rank then takes the same step
        return g
