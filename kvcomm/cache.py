"""Where kvcomm keeps what it makes once: converted models, downloaded data, codebooks."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``KVCOMM_CACHE``, or ``~/.cache/kvcomm``."""
    return Path(os.environ.get("KVCOMM_CACHE", Path.home() / ".cache" / "kvcomm"))
