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

from pydantic import BaseModel, ConfigDict, ValidationError

from kvcomm.cache import cache_root
from kvcomm.errors import ConfigError, DataError

CARD_FILE = "kvcomm-card.json"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # whole names only: fullmatch


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
    """Refuses a derived name that is not a plain lowercase identifier.

    Raises:
        ConfigError: the name is not 1-64 lowercase letters, digits, '.', '_' or '-' (nothing else,
            not even a trailing newline), starting with a letter or digit.
    """
    if not _NAME.fullmatch(name):
        raise ConfigError(f"derived model name {name!r} must be 1-64 lowercase letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")


def derived_path(name: str) -> Path | None:
    """The directory of the derived model ``name`` (one with a config and a card), or None if there is none."""
    if not _NAME.fullmatch(name):
        return None
    path = derived_root() / name
    return path if (path / "config.json").is_file() and (path / CARD_FILE).is_file() else None


def derived_names() -> list[str]:
    root = derived_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if derived_path(p.name) is not None)


def no_such_model(name: str) -> ConfigError:
    """The error for a name that is not a derived model, listing those there are."""
    return ConfigError(f"no derived model named {name!r}; derived models: {', '.join(derived_names()) or 'none'}")


def load_card(name: str) -> Card:
    """The card of the derived model ``name``.

    Raises:
        ConfigError: no derived model by that name.
        DataError: its card cannot be read or does not validate; ``__cause__`` is the reason
            (:func:`card_problem` says it in one line).
    """
    path = derived_path(name)
    if path is None:
        raise no_such_model(name)
    try:
        return Card.model_validate(json.loads((path / CARD_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the card of derived model {name!r} ({path / CARD_FILE}): "
                        f"{card_problem(err)}") from err


def card_problem(err: BaseException) -> str:
    """Why a card could not be read, in one line: the first three fields that do not validate (and
    how many more), or the read or parse error."""
    if isinstance(err, ValidationError):
        problems = [f"{'.'.join(str(part) for part in e['loc']) or 'card'}: {e['msg']}" for e in err.errors()]
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        return "; ".join(problems[:3]) + more
    return " ".join(str(err).split()) or type(err).__name__
