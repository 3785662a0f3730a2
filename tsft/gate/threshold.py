"""The threshold update of TS-PEFT: proximal step with an Adam-style scale (paper Eq. 15-20)."""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from tsft.gate.accounting import reduce_pending, share_table, zero_grads
from tsft.gate.config import GateConfig
from tsft.gate.gate import TokenGate


class ThresholdOptimizer:
    """Moves every gate's tau once per optimizer step.

    The gates' backward passes have summed ``g`` (Eq. 15) over the real tokens of every
    micro-batch since the last step; ``step`` combines the ranks' g into the g of the global batch
    (``_gathered_grad``), so all ranks take the same step, the one a single process would take, then
    applies (per gate, elementwise over the stacked gates)

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
        self._table = share_table(self.gates, self.gates[0].tau.device)
        self._state: Optional[torch.Tensor] = None  # (len(STATE), gates); its entries are the gates' buffers
        self._views: list[torch.Tensor] = []
        self.drive: Optional[torch.Tensor] = None  # per gate, added to g: the target-sparsity controller's term
        self.skipped_steps = 0  # steps skipped because the loss scaler found inf/NaN gradients
        # Linked now rather than at the first step: a DistributedDataParallel wrapper built after this
        # collects the model's buffers once, and its buffer broadcast must reach the tensors the step updates.
        self._linked_state()

    @torch.no_grad()
    def step(self, loss_scale: float = 1.0, found_inf: bool = False) -> bool:
        """One threshold step; returns whether tau moved.

        ``loss_scale``: the factor the loss was multiplied by before backward (a GradScaler's
        ``get_scale()``); g's loss term is divided by it. ``found_inf``: the scaler found inf/NaN
        gradients and skips the PEFT optimizer's step; tau then skips it too (and with a loss scale,
        so does a step whose g is not finite), so an overflowing fp16 backward never reaches tau.
        """
        cfg = self.config
        reduce_pending(self.gates)  # all gates' queued backward records in one batched pass
        state = self._linked_state()
        g = self._gathered_grad(loss_scale).to(state.dtype)
        if self.drive is not None:  # tsft.gate.controller: the same on every rank (set from all-reduced counts)
            g = g + self.drive.to(g.dtype)
        if found_inf or (loss_scale != 1 and not bool(torch.isfinite(g).all())):
            self._skip()
            return False
        if cfg.adam:
            tau, step, m, v = state.unbind(0)  # views: updating them updates every gate's buffers
            step += 1
            m.mul_(cfg.beta1).add_(g, alpha=1 - cfg.beta1)
            v.mul_(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
            m_hat = m / (1 - cfg.beta1**step)
            v_hat = v / (1 - cfg.beta2**step)
            tau += cfg.alpha * cfg.s * m_hat / (v_hat.sqrt() + cfg.eps)
        else:
            state[0] += cfg.alpha * cfg.s * g
        self.zero_grad()
        return True

    def _skip(self) -> None:
        self.skipped_steps += 1
        if self.skipped_steps == 1:
            warnings.warn(
                "threshold step skipped: the loss scaler found inf/NaN gradients (fp16 overflow), so tau keeps "
                "its value for this step as the PEFT weights do; further skips are counted in "
                "ThresholdOptimizer.skipped_steps without a warning",
                RuntimeWarning,
                stacklevel=3,
            )
        self.zero_grad()

    @torch.no_grad()
    def clamp_thresholds(self, low: float = 0.0) -> None:
        """tau <- max(tau, low) for every gate. A tau below 0 switches no more tokens on than 0 does (the ratio is
        >= 0), so below 0 only builds up a lag; the target-sparsity controller projects tau back after each step."""
        self._linked_state()[0].clamp_(min=low)

    def taus(self) -> torch.Tensor:
        """Every gate's tau as one vector (a copy), in gate order: one small copy, cheap to take every step."""
        return self._linked_state()[0].clone()

    def zero_grad(self) -> None:
        zero_grads(self.gates)

    def _linked_state(self) -> torch.Tensor:
        """All gates' state as one (len(STATE), gates) matrix whose entries are the gates' buffers.

        The step then updates every gate with a few vector ops, instead of stacking every scalar buffer
        and copying each back (which took most of the step's time with 20 gates). The buffers are re-linked
        whenever one was replaced rather than updated in place (``model.to(device)``,
        ``load_state_dict(assign=True)``, assignment), so the matrix never holds stale values.
        """
        current = [buffer for gate in self.gates for buffer in gate.state_buffers()]
        if self._state is None or not all(now is view for now, view in zip(current, self._views)):
            first = current[0]
            gate_major = torch.empty(len(self.gates), len(TokenGate.STATE), dtype=first.dtype, device=first.device)
            self._state = gate_major.t()
            for gate, column in zip(self.gates, self._state.unbind(1)):
                gate.use_state_storage(column)  # copies the gate's values in, then aliases them
            self._views = [buffer for gate in self.gates for buffer in gate.state_buffers()]
        return self._state

    def _gathered_grad(self, loss_scale: float) -> torch.Tensor:
        """g of every gate for the whole (global) batch: what one process that saw it would compute.

        The loss term is a derivative of this rank's loss, so it is divided by the loss scale and, like
        the PEFT weights' gradients under DDP (which averages them), averaged over ranks; the count term
        lambda S is counted per token and summed. Without that split, W ranks would weigh the loss term
        W times against lambda (measured: exactly 2.0000x with 2 gloo ranks).
        """
        accounts = [gate.accounting for gate in self.gates]
        if not all(account.table is self._table and account.index == i for i, account in enumerate(accounts)):
            self._table = share_table(self.gates, self._table.grad.device)  # another optimizer took them over
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        g = torch.add(self._table.penalty, self._table.grad, alpha=1.0 / (float(loss_scale) * world))
        if world > 1:
            dist.all_reduce(g)  # one collective for all gates: every rank then takes the same step
        return g
