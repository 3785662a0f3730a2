"""tsft: token-selective parameter-efficient fine-tuning (TS-PEFT)."""

__version__ = "0.1.0"
