"""Token accounting of the gates: Eq. 15's threshold gradient g and Eq. 21's token counts.

Gates only queue one small record per pass (``mu`` per token in backward, the gate ``S`` and the
real-token mask); ``reduce_pending`` turns the queues of many gates into their g and counts in one
stacked pass. Reducing inside every layer's backward took ~15 small tensor ops per layer, which
cost more than the gate's own arithmetic at the widths of small models.

The sums themselves are rows of an ``AccountingTable`` shared by the gates of one threshold
optimizer, so adding one step's records of every gate is a few vector adds per split (``index_add_``
when a gate queued several passes) and the optimizer reads all g as one vector (per-gate scalars took
a stack and an unbind over all gates per step).

This runs once per optimizer step, on tensors of (gates, tokens), so its cost is its count of operations:
the lean form here (11 instead of 16 tensor operations in ``_stats``, the real-token mask used once
instead of stacked per gate; 3 vector adds instead of an index tensor and 2 ``index_add_`` in the
threshold step's case) took the threshold step from ~1.2 to ~0.8 ms on the width-256 benchmark Llama
and its whole step 0.4-0.7 % (scripts/bench_gate_overhead.py, docs/gate.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, NamedTuple, Optional, Union

import torch

if TYPE_CHECKING:
    from tsft.gate.gate import TokenGate


SPLITS = ("train", "eval")


class Record(NamedTuple):
    """One pass through a gate: ``mu`` per token (backward only), the gate ``S``, the real-token mask, and
    (evaluation only) each token's relative and absolute update norm."""

    mu: Optional[torch.Tensor]  # token-shaped
    on: torch.Tensor  # S as 0 / 1 in the layer's dtype, token-shaped with a trailing 1 (as the gate multiplies)
    real: Optional[torch.Tensor]  # bool, token-shaped; None when every position is a real token
    norms: Optional[torch.Tensor] = None  # (..., 2): r_i = ||delta_i|| / ||base_i|| and ||delta_i||, float32+


class AccountingTable:
    """g, (gated-on, real) token counts and update-norm sums of several gates, one row per gate, in float64.

    g (Eq. 15) is kept as its two terms, because they scale differently: ``grad`` holds the loss term
    sum_i 1[1(mu_i >= 0) = S_i] mu_i, which is a derivative of the loss and so carries whatever the loss
    carries (a GradScaler's loss scale; under data parallelism, one rank's share of an averaged
    gradient), and ``penalty`` the count term lambda sum_i S_i, which does not. The threshold
    optimizer unscales and averages the first and sums the second (ThresholdOptimizer.step).
    """

    def __init__(self, size: int, device: torch.device) -> None:
        with torch.inference_mode(False):  # Lightning evaluates in inference mode; the sums outlive it
            self.grad = torch.zeros(size, dtype=torch.float64, device=device)
            self.penalty = torch.zeros(size, dtype=torch.float64, device=device)
            self.counts = {split: torch.zeros(size, 2, dtype=torch.float64, device=device) for split in SPLITS}
            # sum of r_i, sum of ||delta_i||, and the real tokens they were summed over (passes that recorded norms)
            self.norm_sums = {split: torch.zeros(size, 3, dtype=torch.float64, device=device) for split in SPLITS}

    def add(
        self,
        split: str,
        accounts: list["GateAccounting"],
        g: Optional["GradTerms"],
        active,
        tokens,
        norm_sums: Optional[torch.Tensor] = None,
    ) -> None:
        """Add the sums of ``accounts`` to their rows: ``g`` (None for eval passes) holds float64 vectors over
        ``accounts``, as does ``active``; ``tokens`` is one too, or a single count for all of them;
        ``norm_sums`` (passes that recorded norms) is a float64 (accounts, 3) matrix."""
        counts = self.counts[split]
        if len(accounts) == len(self.grad) and all(account.index == i for i, account in enumerate(accounts)):
            # every row once, in order (the threshold step's case): plain vector adds, no index tensor
            counts[:, 0] += active
            counts[:, 1] += tokens
            if g is not None:
                self.grad += g.loss
                self.penalty += g.penalty
            if norm_sums is not None:
                self.norm_sums[split] += norm_sums
            return
        # repeats (micro-batches of one gate) must add up: index_add_ does, += on an index does not
        rows = torch.tensor([account.index for account in accounts], device=self.grad.device)
        counts[:, 0].index_add_(0, rows, active)
        counts[:, 1].index_add_(0, rows, _per_row(tokens, len(accounts), rows.device))
        if g is not None:
            self.grad.index_add_(0, rows, g.loss)
            self.penalty.index_add_(0, rows, g.penalty)
        if norm_sums is not None:
            self.norm_sums[split].index_add_(0, rows, norm_sums)

    def zero_grad(self, rows: Optional[list[int]] = None) -> None:
        """Both terms of g back to zero, for every row or the given ones."""
        for terms in (self.grad, self.penalty):
            if rows is None:
                terms.zero_()
            else:
                terms.index_fill_(0, torch.tensor(rows, device=terms.device), 0)

    def to(self, device: torch.device) -> None:
        with torch.inference_mode(False):
            self.grad = self.grad.to(device)
            self.penalty = self.penalty.to(device)
            self.counts = {split: counts.to(device) for split, counts in self.counts.items()}
            self.norm_sums = {split: sums.to(device) for split, sums in self.norm_sums.items()}


class GradTerms(NamedTuple):
    """The two terms of g (Eq. 15) per record: the loss term (mu) and the count term (lambda S)."""

    loss: torch.Tensor
    penalty: torch.Tensor


class GateAccounting:
    """What one gate has counted: its queued records and its row of an ``AccountingTable``.

    A plain object rather than module attributes: it is touched for every gate at every step, and
    ``nn.Module`` attribute access is several times slower than a plain one.
    """

    __slots__ = ("pending", "queue", "table", "index", "has_grad")

    def __init__(self) -> None:
        self.pending: dict[str, list[Record]] = {split: [] for split in SPLITS}
        self.queue = None  # the C++ gated update's record queue (tsft.gate.native), made on its first use
        self.table: Optional[AccountingTable] = None  # created on the first reduction, or by share_table
        self.index = 0
        self.has_grad = False  # whether a backward pass has added to g since the last threshold step

    def __getstate__(self) -> dict:
        # copies and pickles take the C++ queue's records along as Python records (its object stays behind)
        self.collect_native()
        return {name: getattr(self, name) for name in self.__slots__ if name != "queue"}

    def __setstate__(self, state: dict) -> None:
        self.queue = None
        for name, value in state.items():
            setattr(self, name, value)

    def queued(self, split: str) -> int:
        """Records waiting to be reduced: Python's queue, plus the C++ one for training passes."""
        native = len(self.queue) if split == "train" and self.queue is not None else 0
        return len(self.pending[split]) + native

    def collect_native(self) -> None:
        """Move the records the C++ backward left in its queue to the Python queue."""
        if self.queue is not None:
            self.pending["train"].extend(Record(*record) for record in self.queue.drain())

    def grad(self) -> Optional[torch.Tensor]:
        """This gate's g (Eq. 15) as its own backward passes saw it: both terms, as the loss was scaled."""
        return self.table.grad[self.index] + self.table.penalty[self.index] if self.has_grad else None

    def counts(self, split: str) -> tuple[int, int]:
        if self.table is None:
            return 0, 0
        active, tokens = self.table.counts[split][self.index].tolist()
        return int(active), int(tokens)

    def mean_norms(self, split: str) -> tuple[Optional[float], Optional[float]]:
        """(mean r_i, mean ||delta_i||) over the real tokens of the passes that recorded norms; None before any."""
        if self.table is None:
            return None, None
        ratio, norm, tokens = self.table.norm_sums[split][self.index].tolist()
        return (None, None) if tokens == 0 else (ratio / tokens, norm / tokens)

    def reset_counts(self, split: str) -> None:
        if self.table is not None:
            self.table.counts[split][self.index].zero_()
            self.table.norm_sums[split][self.index].zero_()


def share_table(gates: Iterable["TokenGate"], device: torch.device) -> AccountingTable:
    """Move the sums of ``gates`` (keeping what they counted) into one new table, in this order."""
    gates = list(gates)
    reduce_pending(gates)
    accounts = [gate.accounting for gate in gates]
    table = AccountingTable(len(accounts), device)
    for index, account in enumerate(accounts):
        if account.table is not None:
            old = account.table
            table.grad[index] = old.grad[account.index]
            table.penalty[index] = old.penalty[account.index]
            for split in SPLITS:
                table.counts[split][index] = old.counts[split][account.index]
                table.norm_sums[split][index] = old.norm_sums[split][account.index]
        account.table, account.index = table, index
    return table


@torch.no_grad()
def reduce_pending(gates: Iterable["TokenGate"]) -> None:
    """Move the queued records of ``gates`` into their g and (gated-on, real) token counts.

    g = sum_i { 1[1(mu_i >= 0) = S_i] mu_i + lambda S_i } over real tokens only (Eq. 15).
    """
    groups: dict[tuple, list[tuple["TokenGate", Record]]] = {}
    for gate in gates:
        gate.accounting.collect_native()
        for split, pending in gate.accounting.pending.items():
            for record in pending:
                mu_dtype = None if record.mu is None else record.mu.dtype
                # stacked by group: the same token shape (not just count: micro-batches of 2 x 6 and 3 x 4
                # tokens do not stack), device and dtypes
                key = (
                    split,
                    record.on.shape,
                    record.on.device,
                    record.on.dtype,
                    mu_dtype,
                    record.real is None,
                    record.norms is None,
                )
                groups.setdefault(key, []).append((gate, record))
            pending.clear()
    for (split, *_), entries in groups.items():
        accounts = [gate.accounting for gate, _ in entries]
        records = [record for _, record in entries]
        g, active, tokens = _stats(records, [gate.config.lam for gate, _ in entries])
        norm_sums = _norm_sums(records, tokens)
        for table, (positions, _) in _by_table(accounts, active.device).items():
            if len(positions) == len(accounts):
                table.add(split, accounts, g, active, tokens, norm_sums)
            else:  # the group spans the tables of several threshold optimizers: each takes its part
                part = torch.tensor(positions, device=active.device)
                g_part = None if g is None else GradTerms(g.loss[part], g.penalty[part])
                tokens_part = _per_row(tokens, len(accounts), active.device)[part]
                norms_part = None if norm_sums is None else norm_sums[part]
                table.add(split, [accounts[i] for i in positions], g_part, active[part], tokens_part, norms_part)
        if split == "train":
            for account in accounts:
                account.has_grad = True


def zero_grads(gates: Iterable["TokenGate"]) -> None:
    """Start a new threshold step: g back to zero; queued passes still count toward the token statistics."""
    gates = list(gates)
    reduce_pending(gates)
    accounts = [gate.accounting for gate in gates if gate.accounting.table is not None]
    for table, (_, indices) in _by_table(accounts).items():
        table.zero_grad(None if len(set(indices)) == len(table.grad) else indices)
    for gate in gates:
        gate.accounting.has_grad = False


def _by_table(
    accounts: list[GateAccounting], device: Optional[torch.device] = None
) -> dict[AccountingTable, tuple[list[int], list[int]]]:
    """Accounts grouped by table: their positions in ``accounts`` and their rows in the table. Given a
    ``device``, an account without a table gets one of its own there, and tables elsewhere move there."""
    groups: dict[AccountingTable, tuple[list[int], list[int]]] = {}
    for position, account in enumerate(accounts):
        if device is not None:
            if account.table is None:
                account.table, account.index = AccountingTable(1, device), 0
            elif account.table.grad.device != device:
                account.table.to(device)
        positions, rows = groups.setdefault(account.table, ([], []))
        positions.append(position)
        rows.append(account.index)
    return groups


def _stats(
    records: list[Record], lam: list[float]
) -> tuple[Optional[GradTerms], torch.Tensor, Union[int, torch.Tensor]]:
    """Per record: its share of g (Eq. 15) as its two terms (None for eval records), its gated-on real tokens
    and its real tokens: float64 vectors over the records, except that the real-token count may be one
    number (or a one-element tensor) that holds for all of them.

    The records of one backward pass share one real-token mask (the batch's), so it is used as one row
    rather than stacked per record; ``1[1(mu >= 0) = S] mu`` is computed as ``min(mu, 0) + S |mu|``
    (equal for S in {0, 1}), without a comparison mask.
    """
    n = len(records)
    on = torch.stack([record.on for record in records]).view(n, -1)  # 0 / 1 in the layer's dtype
    first = records[0].real
    if first is None:
        real, tokens = None, on.shape[1]
    else:
        shared = all(record.real is first for record in records)
        real = first.reshape(1, -1) if shared else torch.stack([record.real for record in records]).view(n, -1)
        tokens = real.sum(1, dtype=torch.float64)
        on = on * real
    active = on.sum(1, dtype=torch.float64)
    if records[0].mu is None:
        return None, active, tokens
    mu = torch.stack([record.mu for record in records]).view(n, -1)
    terms = mu.clamp(max=0)
    if real is not None:
        terms.mul_(real)
    loss_term = terms.addcmul_(on, mu.abs()).sum(1, dtype=torch.float64)
    if all(value == lam[0] for value in lam):
        penalty = active * lam[0]
    else:
        penalty = active * torch.tensor(lam, dtype=torch.float64, device=active.device)
    return GradTerms(loss_term, penalty), active, tokens


def _norm_sums(records: list[Record], tokens: Union[int, torch.Tensor]) -> Optional[torch.Tensor]:
    """(records, 3) float64: sum of r_i and of ||delta_i|| over real tokens, and the real-token count; None when
    the records carry no norms (training passes). The records of a group all carry them or none do."""
    if records[0].norms is None:
        return None
    n = len(records)
    norms = torch.stack([record.norms for record in records]).view(n, -1, 2).to(torch.float64)
    if records[0].real is not None:
        real = torch.stack([record.real for record in records]).view(n, -1, 1)
        norms = norms * real
    sums = norms.sum(1)
    return torch.cat((sums, _per_row(tokens, n, sums.device).unsqueeze(1)), dim=1)


def _per_row(value: Union[int, torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    """Token counts given for all records at once (a number, or a one-element tensor) as an n-vector."""
    if not isinstance(value, torch.Tensor):
        return torch.full((n,), float(value), dtype=torch.float64, device=device)
    return value.reshape(-1).expand(n) if value.numel() == 1 else value
