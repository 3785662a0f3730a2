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
        # The gates' scalars are stacked into one (states, gates) matrix, stepped together as vectors,
        # and written back with one foreach copy: per-gate Python loops cost more than the arithmetic.
        names = TokenGate.STATE if cfg.adam else ("tau",)
        per_gate = [gate.state_buffers(names) for gate in self.gates]
        buffers = [buffer for row in zip(*per_gate) for buffer in row]  # state-major: row j = names[j]
        state = torch.stack(buffers).view(len(names), len(self.gates))
        g = self._gathered_grad(state.device).to(state.dtype)
        if cfg.adam:
            tau, step, m, v = state.unbind(0)
            step += 1
            m.mul_(cfg.beta1).add_(g, alpha=1 - cfg.beta1)
            v.mul_(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
            m_hat = m / (1 - cfg.beta1**step)
            v_hat = v / (1 - cfg.beta2**step)
            tau += cfg.alpha * cfg.s * m_hat / (v_hat.sqrt() + cfg.eps)
        else:
            state[0] += cfg.alpha * cfg.s * g
        torch._foreach_copy_(buffers, list(state.view(-1).unbind(0)))
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
