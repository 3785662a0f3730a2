"""Settings of the token gate and of its threshold update (paper §3.3-3.4, Table 6 / A.4)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping


@dataclass(frozen=True)
class GateConfig:
    """Hyperparameters of TS-PEFT.

    ``lam`` is the sparsity weight lambda of Eq. 4/15 (configs spell it ``lambda``, a Python keyword).
    ``s`` is the gradient scale of the step-function surrogate (Eq. 10) and ``alpha`` the step size
    alpha_k of Eq. 20; the paper fixes alpha = 1 and tunes s. ``adam=False`` gives the plain
    step ``tau <- tau + alpha * s * g`` of the Figure 3(b) ablation. ``ratio_eps`` keeps
    ``r_i = ||delta_i|| / ||base_i||`` finite where the base output vanishes.
    """

    lam: float = 1e-5
    s: float = 1e-4
    alpha: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    adam: bool = True
    ratio_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"sparsity.lambda must be >= 0 (got {self.lam}); set e.g. sparsity.lambda=1e-5")
        if self.s <= 0 or self.alpha <= 0:
            raise ValueError(f"sparsity.s and sparsity.alpha must be > 0 (got s={self.s}, alpha={self.alpha})")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"sparsity.{name} must lie in [0, 1) (got {value})")
        if self.eps <= 0 or self.ratio_eps <= 0:
            raise ValueError("sparsity.eps and sparsity.ratio_eps must be > 0")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "GateConfig":
        """Build from a config mapping (e.g. ``cfg.sparsity``); reads ``lambda`` by key, ignores unrelated keys."""
        known = {f.name for f in fields(cls)}
        values = {("lam" if key == "lambda" else key): cfg[key] for key in cfg.keys()}
        # YAML 1.1 reads "1e-5" (no dot) as a string: coerce numbers here rather than fail later.
        return cls(**{key: (bool(v) if key == "adam" else float(v)) for key, v in values.items() if key in known})

    def to_dict(self) -> dict[str, Any]:
        """The settings under their config names (``lambda``, not ``lam``), for configs and exports."""
        out = asdict(self)
        out["lambda"] = out.pop("lam")
        return out
