"""Token accounting of the gates: Eq. 15's threshold gradient g and Eq. 21's token counts.

Gates only queue one small record per pass (``mu`` per token in backward, the gate ``S`` and the
real-token mask); ``reduce_pending`` turns the queues of many gates into their g and counts in one
stacked pass. Reducing inside every layer's backward took ~15 small tensor ops per layer, which
cost more than the gate's own arithmetic at the widths of small models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, NamedTuple, Optional

import torch

if TYPE_CHECKING:
    from tsft.gate.gate import TokenGate


SPLITS = ("train", "eval")


class Record(NamedTuple):
    """One pass through a gate: ``mu`` per token (backward only), the gate ``S``, the real-token mask."""

    mu: Optional[torch.Tensor]  # flat
    gate: torch.Tensor  # bool, token-shaped
    real: Optional[torch.Tensor]  # bool, token-shaped; None when every position is a real token


class GateAccounting:
    """What one gate has counted: queued records, g since the last threshold step, token counts.

    A plain object rather than module attributes: it is touched for every gate at every step, and
    ``nn.Module`` attribute access is several times slower than a plain one.
    """

    __slots__ = ("pending", "grad", "has_grad", "counts")

    def __init__(self) -> None:
        self.pending: dict[str, list[Record]] = {split: [] for split in SPLITS}
        self.grad: Optional[torch.Tensor] = None  # g (Eq. 15), float64 scalar, zeroed in place per step
        self.has_grad = False  # whether a backward pass has added to ``grad`` since the last step
        self.counts: dict[str, Optional[torch.Tensor]] = dict.fromkeys(SPLITS)  # (gated-on, real), float64

    def ensure(self, split: str, device: torch.device) -> None:
        """Create the accumulators of ``split`` on first use; called for every gate at every reduction,
        so it only checks when they exist (entering ``inference_mode(False)`` costs ~10 us)."""
        need_counts = self.counts[split] is None
        need_grad = split == "train" and self.grad is None
        if not (need_counts or need_grad):
            return
        with torch.inference_mode(False):  # Lightning evaluates in inference mode; these outlive it
            if need_counts:
                self.counts[split] = torch.zeros(2, dtype=torch.float64, device=device)
            if need_grad:
                self.grad = torch.zeros((), dtype=torch.float64, device=device)


@torch.no_grad()
def reduce_pending(gates: Iterable["TokenGate"]) -> None:
    """Move the queued records of ``gates`` into their g and (gated-on, real) token counts.

    g = sum_i { 1[1(mu_i >= 0) = S_i] mu_i + lambda S_i } over real tokens only (Eq. 15).
    """
    gates = list(gates)
    groups: dict[tuple, list[tuple[int, Record]]] = {}
    for index, gate in enumerate(gates):
        for split, pending in gate.accounting.pending.items():
            for record in pending:
                mu_dtype = None if record.mu is None else record.mu.dtype
                key = (split, record.gate.numel(), record.gate.device, mu_dtype, record.real is None)
                groups.setdefault(key, []).append((index, record))
            pending.clear()
    by_split: dict[str, list[tuple[torch.Tensor, list[int]]]] = {}
    for (split, *_), entries in groups.items():
        lam = [gates[index].config.lam for index, _ in entries]
        rows = _stats([record for _, record in entries], lam)
        by_split.setdefault(split, []).append((rows, [index for index, _ in entries]))
    for split, parts in by_split.items():
        rows = parts[0][0] if len(parts) == 1 else torch.cat([part_rows for part_rows, _ in parts])
        order = [index for _, indices in parts for index in indices]
        if len(set(order)) < len(order):  # several micro-batches of one gate: sum them per gate first
            involved = sorted(set(order))
            per_gate = torch.zeros(len(gates), 3, dtype=rows.dtype, device=rows.device)
            rows = per_gate.index_add_(0, torch.tensor(order, device=rows.device), rows)[involved]
            order = involved
        targets = [gates[index].accounting for index in order]
        for accounting in targets:
            accounting.ensure(split, rows.device)
        torch._foreach_add_([accounting.counts[split] for accounting in targets], list(rows[:, 1:].unbind(0)))
        if split == "train":
            torch._foreach_add_([accounting.grad for accounting in targets], list(rows[:, 0].unbind(0)))
            for accounting in targets:
                accounting.has_grad = True


def zero_grads(gates: Iterable["TokenGate"]) -> None:
    """Start a new threshold step: g back to zero; queued passes still count toward the token statistics."""
    gates = list(gates)
    reduce_pending(gates)
    accounts = [gate.accounting for gate in gates]
    grads = [account.grad for account in accounts if account.grad is not None]
    if grads:
        torch._foreach_zero_(grads)
    for account in accounts:
        account.has_grad = False


def _stats(records: list[Record], lam: list[float]) -> torch.Tensor:
    """(records, 3) float64 rows: [g (0 for eval records), gated-on real tokens, real tokens]."""
    n = len(records)
    on = torch.stack([record.gate for record in records]).reshape(n, -1)  # (records, tokens)
    device = on.device
    if records[0].real is None:
        real = None
        tokens = torch.full((n,), on.shape[1], dtype=torch.float64, device=device)
    else:
        real = torch.stack([record.real for record in records]).reshape(n, -1)
        tokens = real.sum(1, dtype=torch.float64)
    on_real = on if real is None else on & real
    active = on_real.sum(1, dtype=torch.float64)
    if records[0].mu is None:
        g = torch.zeros_like(active)
    else:
        mu = torch.stack([record.mu for record in records])
        consistent = (mu >= 0) == on
        if real is not None:
            consistent &= real
        g = torch.where(consistent, mu, 0).sum(1, dtype=torch.float64)
        g += torch.tensor(lam, dtype=torch.float64, device=device) * active
    return torch.stack((g, active, tokens), 1)
