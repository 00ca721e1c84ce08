"""Derived models: variants kvcomm made by fine-tuning a base, kept in the cache and addressed by name.

Each lives in ``<cache>/derived/<name>/`` as a plain model directory (safetensors weights, config,
tokenizer) plus ``kvcomm-card.json``, the :class:`Card` that says how it was made. A derived name
resolves like an embedded one (``-m smollm2-135m-terse``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from kvcomm.cache import cache_root
from kvcomm.errors import ConfigError, DataError

CARD_FILE = "kvcomm-card.json"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class Card(BaseModel):
    """How a derived model was made, and how training went."""

    model_config = ConfigDict(extra="forbid")

    name: str
    base: str
    recipe: str
    description: str
    steps: int
    seed: int
    learning_rate: float
    rank: int
    batch_size: int
    examples: int
    max_tokens: int = 256
    data_sha256: str
    first_loss: float
    final_loss: float  # mean of the last 10 steps' losses
    losses: list[float]
    seconds: float
    trainable_parameters: int
    created: str
    versions: dict[str, str]
    extra: dict[str, Any] = {}


def derived_root() -> Path:
    return cache_root() / "derived"


def check_name(name: str) -> None:
    """Refuses a derived name that is not a plain lowercase identifier."""
    if not _NAME.match(name):
        raise ConfigError(f"derived model name {name!r} must be 1-64 lowercase letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")


def derived_path(name: str) -> Path | None:
    """The directory of the derived model ``name``, or None if there is none."""
    if not _NAME.match(name):
        return None
    path = derived_root() / name
    return path if (path / "config.json").is_file() and (path / CARD_FILE).is_file() else None


def derived_names() -> list[str]:
    root = derived_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if derived_path(p.name) is not None)


def load_card(name: str) -> Card:
    path = derived_path(name)
    if path is None:
        raise ConfigError(f"no derived model named {name!r}; derived models: {', '.join(derived_names()) or 'none'}")
    try:
        return Card.model_validate(json.loads((path / CARD_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the card of derived model {name!r}: {err}") from err
