"""Is the Hugging Face hub reachable? Asked once per process, so that an offline machine fails in a second.

Without this, a missing local dataset or model costs ~30 s of huggingface_hub's retries before the error
that says "put the files here". Offline (by ``HF_HUB_OFFLINE=1`` or because the host does not answer),
hub loads run in local-files-only mode: cached copies still load, anything else fails at once.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


def offline_by_env() -> bool:
    return any(os.environ.get(key, "").lower() in _TRUE for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.cache
def hub_reachable() -> bool:
    """False when offline mode is set or the hub's host (``HF_ENDPOINT``) does not accept a connection."""
    if offline_by_env():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError:  # no DNS, refused, timed out
        return False
    return True


def use_local_files_only() -> None:
    """Switch huggingface_hub and datasets to their offline modes for the rest of the process."""
    import datasets.config
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
