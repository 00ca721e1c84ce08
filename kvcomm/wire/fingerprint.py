"""Checking a KV message's model fingerprint (see ``LoadedModel.fingerprint``) against a receiver."""

from __future__ import annotations

from typing import Any

from kvcomm.wire.errors import FingerprintMismatch


def check_fingerprint(message: dict[str, Any], receiver: dict[str, Any]) -> None:
    """Raises :class:`FingerprintMismatch` naming every field that differs."""
    diffs = [f"{k}: message {message.get(k)!r}, receiver {receiver[k]!r}" for k in receiver
             if message.get(k) != receiver[k]]
    if diffs:
        raise FingerprintMismatch("KV message was made by an incompatible model: " + "; ".join(diffs))
