"""TokenGate: the per-module state of TS-PEFT (threshold, its Adam moments, statistics)."""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from tsft.gate.config import GateConfig
from tsft.gate.function import GatedUpdate, gated_sum, update_and_mask

SPLITS = ("train", "eval")


class GateContext:
    """State shared by all gates of one model: which positions of the current batch are real tokens.

    A forward pre-hook on the model stores ``attention_mask`` here, so gates deep inside the
    network can leave padding out of the threshold gradient and the sparsity (DESIGN: "the
    attention mask must reach the gates").
    """

    def __init__(self) -> None:
        self.token_mask: Optional[torch.Tensor] = None  # bool, (batch, seq)


class TokenGate(nn.Module):
    """Threshold tau of one gated module (Eq. 3), its Adam moments (Eq. 16-19) and its statistics.

    ``tau``, ``exp_avg``, ``exp_avg_sq`` and ``step`` are persistent buffers: checkpoints carry them
    and AdamW never sees them (they are not parameters; names avoid ``lora_``, which AdaLoRA's
    allocator scores). The threshold gradient and token counts are plain tensors, not buffers,
    so DDP's buffer broadcast cannot overwrite one rank's partial sums with another's.
    """

    def __init__(self, name: str, config: GateConfig, context: GateContext) -> None:
        super().__init__()
        self.name = name
        self.config = config
        self.context = context
        for buffer in ("tau", "exp_avg", "exp_avg_sq", "step"):
            self.register_buffer(buffer, torch.zeros((), dtype=torch.float32))
        self.threshold_grad: Optional[torch.Tensor] = None
        self._active: dict[str, Optional[torch.Tensor]] = dict.fromkeys(SPLITS)
        self._tokens: dict[str, Optional[torch.Tensor]] = dict.fromkeys(SPLITS)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        base: torch.Tensor,
        u: torch.Tensor,
        B: torch.Tensor,
        k: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``base + S * delta`` for ``delta = u B^T (+ k (base - bias))``; see tsft.gate.function."""
        real = self._real_tokens(base)
        if torch.is_grad_enabled() and (u.requires_grad or B.requires_grad or base.requires_grad):
            # Training: statistics and g are counted in backward, which runs once per micro-batch
            # even when gradient checkpointing runs this forward twice.
            out, _ = GatedUpdate.apply(base, u, B, k, bias, self.tau, real, self)
            return out
        delta, gate = update_and_mask(base, u, B, k, bias, self.tau, self.config.ratio_eps)
        if not self.training:  # a no-grad pass in train mode is reentrant checkpointing's first forward
            self._count("eval", gate, real)
        return gated_sum(base, gate, delta)

    def _real_tokens(self, base: torch.Tensor) -> Optional[torch.Tensor]:
        mask = self.context.token_mask
        if mask is None:
            return None
        positions = base.shape[:-1]
        if mask.shape == positions:
            return mask
        if len(positions) == 2 and mask.dim() == 2 and mask.shape[0] == positions[0] and mask.shape[1] > positions[1]:
            return mask[:, -positions[1] :]  # generation with a KV cache: the newest positions
        raise ValueError(
            f"attention_mask {tuple(mask.shape)} does not match the {tuple(positions)} positions seen by gate "
            f"{self.name}; call the model with an attention_mask over its input tokens (or none)"
        )

    # ---------------------------------------------------------------- backward-side accounting
    def accumulate_threshold_grad(self, mu: torch.Tensor, gate: torch.Tensor, real: Optional[torch.Tensor]) -> None:
        """Add this micro-batch's share of Eq. 15 to g and count its tokens (called from backward).

        g = sum_i { 1[1(mu_i >= 0) = S_i] mu_i + lambda S_i } over real tokens only.
        """
        consistent = (mu >= 0) == gate
        term = torch.where(consistent, mu, torch.zeros_like(mu)) + self.config.lam * gate.to(mu.dtype)
        if real is not None:
            term = term * real.to(term.dtype)
        g = term.sum(dtype=torch.float64)
        self.threshold_grad = g if self.threshold_grad is None else self.threshold_grad + g
        self._count("train", gate, real)

    def _count(self, split: str, gate: torch.Tensor, real: Optional[torch.Tensor]) -> None:
        if real is None:
            active, tokens = gate.sum(), torch.tensor(gate.numel(), device=gate.device)
        else:
            real = real.reshape(gate.shape)
            active, tokens = (gate & real).sum(), real.sum()
        if self._active[split] is None:
            self._active[split], self._tokens[split] = active, tokens
        else:
            self._active[split] = self._active[split] + active
            self._tokens[split] = self._tokens[split] + tokens

    # ---------------------------------------------------------------- statistics
    def counts(self, split: str = "train") -> tuple[int, int]:
        """(gated-on real tokens, real tokens) counted since the last reset of ``split``."""
        if self._active[split] is None:
            return 0, 0
        return int(self._active[split]), int(self._tokens[split])

    def sparsity(self, split: str = "train") -> Optional[float]:
        """Eq. 21 over the real tokens seen since the last reset: the share left un-updated."""
        active, tokens = self.counts(split)
        return None if tokens == 0 else 1.0 - active / tokens

    def reset_stats(self, split: Optional[str] = None) -> None:
        for name in SPLITS if split is None else (split,):
            self._active[name] = self._tokens[name] = None

    @property
    def layer(self) -> Optional[int]:
        match = re.search(r"\.(?:layers?|h|blocks?)\.(\d+)\.", f".{self.name}.")
        return int(match.group(1)) if match else None

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    def extra_repr(self) -> str:
        return f"name={self.name}, tau={float(self.tau):.4g}"
