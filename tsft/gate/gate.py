"""TokenGate: the per-module state of TS-PEFT (threshold, its Adam moments, statistics)."""

from __future__ import annotations

import re
from typing import Optional, Union

import torch
from torch import nn

from tsft.gate.accounting import SPLITS, GateAccounting, Record, reduce_pending, zero_grads
from tsft.gate.config import GateConfig
from tsft.gate.function import apply_gated_update, differentiable_eval_forward, gated_forward


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

    Backward and eval passes only queue their per-token records; ``tsft.gate.accounting`` reduces
    the queues of all gates at once when they are read (``threshold_grad``, ``counts``) or when
    the threshold optimizer steps.
    """

    MAX_PENDING = 64  # records kept per split before a gate reduces its own queue (bounds memory)
    STATE = ("tau", "step", "exp_avg", "exp_avg_sq")  # the persistent buffers, in ThresholdOptimizer's order

    def __init__(self, name: str, config: GateConfig, context: GateContext) -> None:
        super().__init__()
        self.name = name
        self.config = config
        self.context = context
        for buffer in self.STATE:
            self.register_buffer(buffer, torch.zeros((), dtype=torch.float32))
        self.accounting = GateAccounting()
        self.trainable_params: Optional[int] = None  # the host PEFT layer's trainable weights (add_token_gates)
        self.register_state_dict_post_hook(TokenGate._own_state_copies)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        base: torch.Tensor,
        u: torch.Tensor,
        B: torch.Tensor,
        scale: Union[float, torch.Tensor] = 1.0,
        k: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``base + S * delta`` for ``delta = u (scale B)^T (+ k (base - bias))``; see tsft.gate.function."""
        real = self._real_tokens(base)
        differentiable = torch.is_grad_enabled() and (u.requires_grad or B.requires_grad or base.requires_grad)
        if not self.training:
            # model.eval() is evaluation in any grad mode: the eval split counts the pass, tau gets no gradient.
            forward = differentiable_eval_forward if differentiable else gated_forward
            out, on, norms = forward(base, u, B, scale, k, bias, self.tau, self.config.ratio_eps)
            self._record("eval", None, on, real, norms)
            return out
        if differentiable:
            # Training: statistics and g are recorded in backward, which runs once per micro-batch
            # even when gradient checkpointing runs this forward twice. The C++ backward queues them
            # where Python cannot bound the queue, so that happens here, before the next pass.
            queue = self.accounting.queue
            if queue is not None and len(queue) >= self.MAX_PENDING:
                reduce_pending([self])
            return apply_gated_update(base, u, B, scale, k, bias, self.tau, real, self)
        # Train mode without autograd records nothing, on purpose: that pass is reentrant gradient
        # checkpointing's first forward, whose tokens backward counts again (docs/gate.md, "What a pass records").
        out, _, _ = gated_forward(base, u, B, scale, k, bias, self.tau, self.config.ratio_eps)
        return out

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

    def state_buffers(self, names: tuple[str, ...] = STATE) -> list[torch.Tensor]:
        """The named state buffers, read straight from the buffer table: the threshold optimizer reads
        all of them for every gate at every step, and ``nn.Module.__getattr__`` costs ~1 us per read."""
        return [self._buffers[name] for name in names]

    def use_state_storage(self, column: torch.Tensor) -> None:
        """Make the state buffers views of ``column`` (one entry per name in STATE), keeping their values:
        a ThresholdOptimizer keeps all gates' state in one matrix and steps it as a whole."""
        with torch.no_grad():
            column.copy_(torch.stack(self.state_buffers()))
        for name, view in zip(self.STATE, column.unbind(0)):
            self._buffers[name] = view

    def _apply(self, fn, recurse: bool = True):
        """Device moves apply to the state, dtype casts do not: it stays float32. ``model.half()``,
        ``model.to(torch.bfloat16)`` or Lightning's "bf16-true" would otherwise round tau, whose Adam steps
        (at most ``alpha * s``, 1e-4 by default) are below bf16's resolution once tau passes ~0.03 and would be
        lost, and overflow fp16's exp_avg_sq (g^2 of sums over tokens)."""

        def move_only(tensor: torch.Tensor) -> torch.Tensor:
            moved = fn(tensor)
            return moved if moved.dtype == tensor.dtype else tensor.to(moved.device)

        return super()._apply(move_only, recurse)

    @staticmethod
    def _own_state_copies(module: "TokenGate", state_dict: dict, prefix: str, local_metadata: dict) -> None:
        """state_dict hook: copies of the state buffers, which may be views of one shared matrix
        (``use_state_storage``); safetensors refuses to save tensors that share memory."""
        for name in module.STATE:
            if prefix + name in state_dict:
                state_dict[prefix + name] = state_dict[prefix + name].clone()

    # ---------------------------------------------------------------- accounting
    def accumulate_threshold_grad(self, mu: torch.Tensor, on: torch.Tensor, real: Optional[torch.Tensor]) -> None:
        """Queue one backward pass's share of Eq. 15 and its token counts (called from backward)."""
        self._record("train", mu, on, real)

    def _record(
        self,
        split: str,
        mu: Optional[torch.Tensor],
        on: torch.Tensor,
        real: Optional[torch.Tensor],
        norms: Optional[torch.Tensor] = None,
    ) -> None:
        pending = self.accounting.pending[split]
        pending.append(Record(mu, on, real, norms))
        if len(pending) >= self.MAX_PENDING:
            reduce_pending([self])

    @property
    def threshold_grad(self) -> Optional[torch.Tensor]:
        """g (Eq. 15) summed over the real tokens of every backward pass since the last threshold step."""
        reduce_pending([self])
        grad = self.accounting.grad()
        return None if grad is None else grad.clone()

    def zero_threshold_grad(self) -> None:
        zero_grads([self])

    # ---------------------------------------------------------------- statistics
    def counts(self, split: str = "train") -> tuple[int, int]:
        """(gated-on real tokens, real tokens) counted since the last reset of ``split``."""
        reduce_pending([self])
        return self.accounting.counts(split)

    def mean_norms(self, split: str = "eval") -> tuple[Optional[float], Optional[float]]:
        """Mean ``||delta_i|| / ||base_i||`` and mean ``||delta_i||`` over the real tokens of the passes that
        recorded them since the last reset (evaluation passes do; training passes do not)."""
        reduce_pending([self])
        return self.accounting.mean_norms(split)

    def sparsity(self, split: str = "train") -> Optional[float]:
        """Eq. 21 over the real tokens seen since the last reset: the share left un-updated."""
        active, tokens = self.counts(split)
        return None if tokens == 0 else 1.0 - active / tokens

    def reset_stats(self, split: Optional[str] = None) -> None:
        reduce_pending([self])  # so queued g is kept while only the counts are reset
        for name in SPLITS if split is None else (split,):
            self.accounting.reset_counts(name)

    @property
    def layer(self) -> Optional[int]:
        match = re.search(r"\.(?:layers?|h|blocks?)\.(\d+)\.", f".{self.name}.")
        return int(match.group(1)) if match else None

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    def extra_repr(self) -> str:
        return f"name={self.name}, tau={float(self.tau):.4g}"
