"""The C++ build of the gated update (``csrc/gated_update.cpp``), compiled on first use.

Training calls the C++ autograd function when it is available and the Python ``GatedUpdate``
(tsft.gate.function) otherwise, evaluation the C++ ``gated_forward`` or the Python forward; both compute
the same thing operation for operation, and the tests compare them bit for bit. The C++ one spares each
gated layer the Python around its ~20 tensor operations, ~2-3 % of a training step of the width-256
benchmark Llama (docs/gate.md).

The build uses torch's own extension loader (a C++ compiler and ninja; ~40 s once, cached by torch in
``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). ``make install`` builds it ahead
(``tsft.gate.native.main``). Without a compiler the gate warns once and stays in Python;
``TSFT_GATE_NATIVE=0`` skips the build altogether.
"""

from __future__ import annotations

import os
import sysconfig
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

SOURCE = Path(__file__).parent / "csrc" / "gated_update.cpp"
NAME = "tsft_gated_update"
STALE_LOCK_SECONDS = 600
_NOT_LOADED = object()
_module: object = _NOT_LOADED


def enabled() -> bool:
    return os.environ.get("TSFT_GATE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def module() -> Optional[ModuleType]:
    """The compiled extension, or None when it is switched off or cannot be built (then a warning, once)."""
    global _module
    if _module is _NOT_LOADED:
        _module = _build() if enabled() else None
    return _module  # type: ignore[return-value]


def _build() -> Optional[ModuleType]:
    from torch.utils import cpp_extension

    # ninja may come from pip into this interpreter's environment without that being on PATH
    scripts = sysconfig.get_path("scripts")
    if scripts and scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), scripts]).strip(os.pathsep)
    try:
        _remove_stale_lock(cpp_extension)
        return cpp_extension.load(NAME, [str(SOURCE)], extra_cflags=["-O2"], verbose=False)
    except Exception as error:  # no compiler, no ninja, a read-only cache: the Python gate does the same work
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        warnings.warn(
            f"tsft: the C++ gated update could not be built ({reason}); the gate runs in Python, a few % slower "
            "per step. Install a C++ compiler and ninja, or set TSFT_GATE_NATIVE=0 to skip the build.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _remove_stale_lock(cpp_extension) -> None:
    """A build interrupted by Ctrl-C leaves torch's lock file behind, and every later load would wait for it
    forever; a lock older than any build (~40 s here) is such a leftover."""
    lock = Path(cpp_extension._get_build_directory(NAME, verbose=False)) / "lock"
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink()
    except FileNotFoundError:
        pass


def main() -> None:
    """``make install``: build once, ahead of the first training run, and say what happened."""
    start = time.perf_counter()
    built = module()
    status = "switched off (TSFT_GATE_NATIVE=0)" if not enabled() else "built" if built else "NOT built (see warning)"
    print(f"tsft C++ gated update: {status} ({time.perf_counter() - start:.0f} s)")
