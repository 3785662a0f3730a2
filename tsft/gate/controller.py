"""Target sparsity instead of a λ search (beyond the paper): ``sparsity.target=0.55``.

The paper tunes λ per task over [1e-8, 1e-3]; λ does not transfer between scales (docs/small-scale.md), and
what a user wants is usually a sparsity. With a target, a controller steers each threshold step towards it.

Control law, once per optimizer step, after the threshold step:

    s_t      = 1 - (gated-on real tokens) / (real tokens) of this step        (Eq. 21 over the step's batch)
    s_bar    = ema * s_bar + (1 - ema) * s_t                                   (running sparsity)
    trend    = ema * trend + (1 - ema) * (s_bar - s_bar_previous)
    z       += clip(gain * (target - (s_bar + horizon * trend)), -max_step, +max_step)
    c        = unit * sinh(z),  |c| <= drive_max
    g       += c * T     for the next threshold step, T the step's real tokens    (ThresholdOptimizer.drive)

overall (one c for all gates) or, with ``target_per_module``, per gate on its own sparsity. λ stays as
configured (0 is a fine choice with a target).

Why a drive on g and not λ itself (measured on tiny-bert, 300 steps): λ weighs only the tokens that are on
(Eq. 15's ``λ S_i``), so (1) with λ >= 0 no target below the loss term's own sparsity is reachable
(0.26-0.46 at λ = 0, depending on the seed), and (2) once every token of a gate is off, no λ of either sign
moves its tau: the count term is 0. ``c * T`` acts on every real token, on or off: c > 0 raises tau, c < 0
lowers it, whatever the gate's state.

Why it settles: Adam moves tau by at most about alpha * s a step whatever the size of g (Eq. 16-20), so c
mainly decides the direction of each step. Below the target c grows until it outweighs the loss term and
tau rises; above it, c falls (through 0, to negative) and tau falls. sinh makes the update multiplicative
far from 0 (it crosses decades of |c| at the same pace) and additive near 0. The bounded step limits the
overshoot; projecting the error along the sparsity's trend (``horizon`` steps ahead) starts the way back
before the target is crossed. The EMA keeps one noisy batch from steering; the warm-up leaves c at 0 while
tau is still near 0. The reachable range is set by s: tau moves at most alpha * s a step.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from tsft.gate.gate import TokenGate
from tsft.gate.threshold import ThresholdOptimizer


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    target: float
    per_module: bool = False
    gain: float = 2.0  # change of z per unit of sparsity error, per step
    max_step: float = 0.1  # largest change of z in one step (far from 0: a factor of 1.105 in c)
    ema: float = 0.9
    horizon: float = 50.0  # steps ahead the error is projected along the sparsity's trend (damping)
    warmup: float = 0.0  # fraction of the steps before c moves
    unit: float = 1e-8  # below this |c| the update is additive
    # |c| <= drive_max: beyond it the drive outweighs any loss term already, and letting it run on while tau
    # moves at its largest rate (integral wind-up) only delays the way back
    drive_max: float = 1.0
    proportional: float = 3.0  # the error's direct share of z (a PI controller): reacts before the sum builds up

    def __post_init__(self) -> None:
        if not 0.0 < self.target < 1.0:
            raise ValueError(f"sparsity.target must lie in (0, 1) (got {self.target}); e.g. sparsity.target=0.55")
        if self.gain <= 0 or self.max_step <= 0 or not 0.0 <= self.ema < 1.0:
            raise ValueError("sparsity.target_gain and sparsity.target_max_step must be > 0, target_ema in [0, 1)")
        if not 0.0 <= self.warmup < 1.0 or self.horizon < 0:
            raise ValueError("sparsity.target_warmup must lie in [0, 1) and sparsity.target_horizon be >= 0")
        if not 0 < self.unit < self.drive_max:
            raise ValueError(f"sparsity.target_drive_max must be > {self.unit} (got {self.drive_max})")

    @classmethod
    def from_mapping(cls, cfg) -> "ControllerConfig | None":
        """From ``cfg.sparsity``: None when ``target`` is unset (the paper's fixed λ, nothing else)."""
        if cfg.get("target") is None:
            return None
        return cls(
            target=float(cfg["target"]),
            per_module=bool(cfg.get("target_per_module", False)),
            gain=float(cfg.get("target_gain", 2.0)),
            max_step=float(cfg.get("target_max_step", 0.1)),
            ema=float(cfg.get("target_ema", 0.9)),
            warmup=float(cfg.get("target_warmup", 0.0)),
            horizon=float(cfg.get("target_horizon", 50.0)),
            drive_max=float(cfg.get("target_drive_max", 1.0)),
            proportional=float(cfg.get("target_proportional", 3.0)),
        )


class SparsityController:
    """Sets the threshold optimizer's drive after each threshold step (``update``); ``trajectory``: one row a step."""

    def __init__(self, thresholds: ThresholdOptimizer, config: ControllerConfig, total_steps: int = 0) -> None:
        self.thresholds = thresholds
        self.gates: list[TokenGate] = thresholds.gates
        self.config = config
        self.warmup_steps = int(config.warmup * total_steps)
        self.final_from = int(0.9 * total_steps)  # final_sparsity: over the last tenth of the steps
        self._final = torch.zeros(2, dtype=torch.float64)  # (gated-on, real) tokens summed over those steps
        self.z_max = math.asinh(config.drive_max / config.unit)
        self.z = torch.zeros(len(self.gates) if config.per_module else 1, dtype=torch.float64)
        self.running: torch.Tensor | None = None
        self.trend: torch.Tensor | None = None
        self.error = torch.zeros_like(self.z)  # target - projected sparsity, at the last update
        self._last: torch.Tensor | None = None  # cumulative (gated-on, real) train counts per gate
        self.trajectory: list[dict[str, float]] = []  # step, drive c (mean over gates), running sparsity

    def update(self, step: int) -> None:
        self.thresholds.clamp_thresholds(0.0)  # a negative tau is tau = 0 with a lag that the drive would wind up
        counts = torch.stack([self._train_counts(gate) for gate in self.gates])  # (gates, 2) on the gates' device
        last = self._last if self._last is not None and bool((counts >= self._last).all()) else torch.zeros_like(counts)
        delta, self._last = counts - last, counts  # the counts restart each epoch: then the delta is the count
        if dist.is_available() and dist.is_initialized():
            delta = delta.clone()
            dist.all_reduce(delta)  # every rank sees the global batch and so sets the same drive
        tokens = delta[:, 1].clone()  # per gate, this step's real tokens (the drive's scale)
        delta = delta.cpu()  # one transfer a step, and only with a target set
        if step > self.final_from:
            self._final += delta.sum(0)
        if not self.config.per_module:
            delta = delta.sum(0, keepdim=True)
        if bool((delta[:, 1] <= 0).any()):
            return  # no real tokens this step (cannot happen in training; kept safe)
        sparsity = 1.0 - delta[:, 0] / delta[:, 1]
        ema = self.config.ema
        previous = self.running
        self.running = sparsity if self.running is None else ema * self.running + (1 - ema) * sparsity
        trend = torch.zeros_like(self.running) if previous is None else self.running - previous
        self.trend = trend if self.trend is None else ema * self.trend + (1 - ema) * trend
        if step > self.warmup_steps:
            self.error = self.config.target - (self.running + self.config.horizon * self.trend)  # where it is heading
            change = (self.config.gain * self.error).clamp(-self.config.max_step, self.config.max_step)
            self.z = (self.z + change).clamp(-self.z_max, self.z_max)
        drives = self.drives()
        self.thresholds.drive = torch.tensor(drives, dtype=torch.float64, device=tokens.device) * tokens
        self.trajectory.append(
            {"step": step, "drive": sum(drives) / len(drives), "sparsity": float(self.running.mean())}
        )

    def drives(self) -> list[float]:
        z = (self.z + self.config.proportional * self.error).clamp(-self.z_max, self.z_max)
        values = (self.config.unit * torch.sinh(z)).tolist()
        return values if self.config.per_module else values * len(self.gates)

    def report(self) -> dict[str, object]:
        """For result.json: the settings, the final drive per gate and the trajectory (step, drive, sparsity)."""
        on, real = self._final.tolist()
        return {
            **dataclasses.asdict(self.config),
            # Eq. 21 over the real tokens of the last tenth of the training steps: what the target is met by
            "final_sparsity": None if real == 0 else 1.0 - on / real,
            "drive": dict(zip((gate.name for gate in self.gates), self.drives())),
            "trajectory": self.trajectory,
        }

    def state_dict(self) -> dict[str, object]:
        return {
            "z": self.z.clone(),
            "final": self._final.clone(),
            "error": self.error.clone(),
            "running": None if self.running is None else self.running.clone(),
            "trend": None if self.trend is None else self.trend.clone(),
            "last": None if self._last is None else self._last.cpu().clone(),
            "drive": None if self.thresholds.drive is None else self.thresholds.drive.cpu().clone(),
            "trajectory": list(self.trajectory),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        device = self.gates[0].tau.device
        self.z = state["z"].clone()
        self._final = state["final"].clone()
        self.error = state["error"].clone()
        self.running = None if state["running"] is None else state["running"].clone()
        self.trend = None if state["trend"] is None else state["trend"].clone()
        self._last = None if state["last"] is None else state["last"].to(device)
        self.thresholds.drive = None if state["drive"] is None else state["drive"].to(device)
        self.trajectory = list(state["trajectory"])

    @staticmethod
    def _train_counts(gate: TokenGate) -> torch.Tensor:
        account = gate.accounting
        if account.table is None:
            return torch.zeros(2, dtype=torch.float64, device=gate.tau.device)
        return account.table.counts["train"][account.index].detach()
