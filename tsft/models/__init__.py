"""Build the model of a run: a Hugging Face backbone, the PEFT method, and (for TS-PEFT) the gates."""

from tsft.models.backbone import load_backbone, load_tokenizer, resolve_source
from tsft.models.build import build_peft_model
from tsft.models.peft_methods import apply_peft, find_adalora

__all__ = ["apply_peft", "build_peft_model", "find_adalora", "load_backbone", "load_tokenizer", "resolve_source"]
