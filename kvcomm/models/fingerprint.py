"""What two models must share for KV to travel between them, and the one check that compares it.

A fingerprint is the model's KV layout (architecture, layers, KV heads, head size, RoPE
parameters) plus a hash of its vocabulary. The same check serves loading a sender/receiver pair
and reading a KV message: both compare a fingerprint against the receiver's, field by field.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kvcomm.errors import FingerprintMismatch

Fingerprint = dict[str, Any]  # JSON object: model_type, num_layers, num_kv_heads, head_dim, rope, vocab_sha256


def make_fingerprint(config: Any, vocab: dict[str, int]) -> Fingerprint:
    """The fingerprint of a model with text config ``config`` and tokenizer vocabulary ``vocab``."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()[:32]
    return {
        "model_type": config.model_type,
        "num_layers": int(config.num_hidden_layers),
        "num_kv_heads": int(config.num_key_value_heads),
        "head_dim": int(head_dim),
        "rope": {k: v for k, v in sorted(rope.items())} if isinstance(rope, dict) else str(rope),
        "vocab_sha256": digest,
    }


def check_fingerprint(given: Fingerprint, receiver: Fingerprint, source: str = "KV message",
                      label: str = "message") -> None:
    """Raises :class:`~kvcomm.errors.FingerprintMismatch` naming every field of ``receiver`` that
    ``given`` (a message's or a sender's fingerprint) does not match.

    Args:
        source: what ``given`` belongs to, for the message (``KV message``, ``sender 'x'``).
        label: how ``given``'s values are introduced per field (``message``, ``sender``).
    """
    if not isinstance(given, dict):
        raise FingerprintMismatch(f"{source} carries no model fingerprint (got {type(given).__name__})")
    diffs = [f"{k}: {label} {given.get(k)!r}, receiver {receiver[k]!r}"
             for k in receiver if given.get(k) != receiver[k]]
    if diffs:
        raise FingerprintMismatch(f"{source} was made by an incompatible model; they cannot exchange KV caches: "
                                  + "; ".join(diffs))
