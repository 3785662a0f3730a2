"""tsft: token-selective parameter-efficient fine-tuning (TS-PEFT)."""

__version__ = "0.1.0"

# The configs use tsft's OmegaConf resolvers (${s_suffix:...}); importing tsft registers them for any composition
# of its configs (train.py, hydra.compose in a notebook, tests).
from tsft import config as _config  # noqa: E402,F401
