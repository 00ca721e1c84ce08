"""Where kvcomm keeps what it makes once: converted models, downloaded data, codebooks."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``KVCOMM_CACHE`` (``~`` expanded), or ``~/.cache/kvcomm`` where it is unset or empty (before,
    an empty value put the cache, and what ``models remove`` deletes, in the working directory)."""
    return folder_from_env("KVCOMM_CACHE", Path.home() / ".cache" / "kvcomm")


def folder_from_env(variable: str, default: Path) -> Path:
    """The folder an environment variable names (``~`` expanded), or ``default`` where it is unset or empty."""
    value = os.environ.get(variable, "").strip()
    return Path(value).expanduser() if value else default
