"""Dequantize SmolLM2-135M-Instruct into a Hugging Face folder, once, for `model=smollm2-135m`.

    python scripts/prepare_smollm2.py                   # -> <paths.cache_dir>/models/smollm2-135m
    python scripts/prepare_smollm2.py --tokenizer-only  # just the tokenizer (tests, model=tiny-llama)
    python scripts/prepare_smollm2.py --out DIR

Runs use it without this script too: a model config with ``prepare: smollm2`` converts on first use
(tsft.models.smollm2 says how).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere: import tsft from this checkout

from tsft import paths  # noqa: E402
from tsft.models import smollm2  # noqa: E402


def default_out_dir() -> Path:
    """``<paths.cache_dir>/models/smollm2-135m``, the folder configs/model/smollm2-135m.yaml loads."""
    return paths.cache_dir(OmegaConf.load(REPO / "configs" / "paths" / "default.yaml")) / "models" / smollm2.FOLDER


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="default: <paths.cache_dir>/models/smollm2-135m")
    parser.add_argument("--tokenizer-only", action="store_true", help="write only the tokenizer (~10 s)")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    args = parser.parse_args()
    out_dir = (args.out or default_out_dir()).expanduser().resolve()
    if smollm2.is_prepared(out_dir, args.tokenizer_only) and not args.force:
        print(f"{out_dir} is ready")
        return
    start = time.perf_counter()
    smollm2.prepare(out_dir, args.tokenizer_only, force=args.force)
    print(f"wrote {out_dir} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
