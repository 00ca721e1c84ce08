"""What two models must share for KV to travel between them, and the one check that compares it.

A fingerprint is the model's KV layout (architecture, layers, KV heads, head size, RoPE
parameters) plus a hash of its vocabulary. The same check serves loading a sender/receiver pair
and reading a KV message: both compare a fingerprint against the receiver's, field by field.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kvcomm.errors import ConfigError, FingerprintMismatch, ModelError

Fingerprint = dict[str, Any]  # JSON object: model_type, num_layers, num_kv_heads, head_dim, rope, vocab_sha256


def make_fingerprint(config: Any, vocab: dict[str, int]) -> Fingerprint:
    """The fingerprint of a model with text config ``config`` and tokenizer vocabulary ``vocab``.

    A config without ``num_key_value_heads`` (multi-head attention, e.g. GPT-2) has one KV head
    per attention head; one without ``head_dim`` has ``hidden_size / num_attention_heads``.

    Raises:
        ModelError: ``unsupported architecture``: the config lacks a field the KV layout needs
            (``model_type``, ``num_hidden_layers``, ``num_attention_heads``, ``hidden_size``).
    """
    heads = _required(config, "num_attention_heads")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or _required(config, "hidden_size") // int(heads)
    rope = getattr(config, "rope_parameters", None) or {}
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()[:32]
    return {
        "model_type": _required(config, "model_type"),
        "num_layers": int(_required(config, "num_hidden_layers")),
        "num_kv_heads": int(kv_heads),
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
    if not isinstance(receiver, dict):  # a caller's mistake: a model where its fingerprint goes
        hint = " (a loaded model's .fingerprint)" if hasattr(receiver, "fingerprint") else ""
        raise ConfigError(f"the receiver's fingerprint is a dict{hint}, not {type(receiver).__name__}")
    if not isinstance(given, dict):
        raise FingerprintMismatch(f"{source} carries no model fingerprint (got {type(given).__name__})")
    diffs = [f"{k}: {label} {given.get(k)!r}, receiver {receiver[k]!r}"
             for k in receiver if given.get(k) != receiver[k]]
    if diffs:
        raise FingerprintMismatch(f"{source} was made by an incompatible model; they cannot exchange KV caches: "
                                  + "; ".join(diffs))


def _required(config: Any, field: str) -> Any:
    """``config.field``; a ModelError naming the architecture when it has none."""
    value = getattr(config, field, None)
    if value is None or value == "":
        architecture = getattr(config, "model_type", None) or type(config).__name__
        raise ModelError(f"unsupported architecture {architecture!r}: its config has no {field}, which "
                         "kvcomm needs to describe its KV cache")
    return value
