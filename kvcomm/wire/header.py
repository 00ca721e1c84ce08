"""The KV message header: parsed with bounds, validated by a schema, consistent before any tensor exists.

The header is JSON. Before it is parsed its nesting depth and number sizes are bounded (a deeply
nested or huge-number header would otherwise raise ``RecursionError`` or ``ValueError``); then a
strict schema checks every field, and the sizes are checked against each other and against the
fingerprint (layers, heads, head size), so that the decoded size of the whole message is known and
bounded before a payload is read. Everything wrong is a :class:`~kvcomm.errors.CorruptMessage`.

Versions: 1 carried the mask mode in ``meta``; 2 makes ``mode`` a checked field; 3 adds ``extras``,
frames after the layers that carry what some receivers need besides KV (the context's token ids,
for recomputing tokens when pieces are blended); 4 adds ``hidden`` extras (the sender's hidden
state entering a layer, for recomputing layers: DroidSpeak) and layers left out (0 tokens: the
receiver computes them); 5 codes entropy-coded codecs with kvcomm's table-driven rANS (their
parameters name the ``coder``; earlier messages are read as ``constriction``-coded); 6, 7 and 8
change the digest and the rANS streams (:mod:`kvcomm.wire.message`), not the header's fields; 9
adds ``opening``: where it is above 1, a layer not shared holds the context's first ``opening``
tokens (the opening of a prompt cut in two, ``pieces="passages"``; causal mode) instead of one
sink token.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, model_validator

from kvcomm.config import describe
from kvcomm.errors import CorruptMessage, MessageTooLarge
from kvcomm.protocol.layout import MaskMode

VERSION = 9
READABLE = (1, 2, 3, 4, 5, 6, 7, 8, 9)
OPENING_SINCE = 9
FRAME_OVERHEAD = 8  # bytes a frame adds to its payload: its length before it and its CRC after (uint32 each)
DIGEST_OF_CRCS_SINCE = 6  # the final digest covers the frames' lengths and CRCs, not their bytes again
MAX_HEADER = 1 << 18  # 256 KiB: ~60 bytes per layer entry, a fingerprint and small notes
MAX_DEPTH = 16  # JSON nesting (the fingerprint's RoPE parameters are the deepest part: 3 levels)
MAX_DIGITS = 20  # an integer longer than this is not a size
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_CONTEXT = 1 << 22  # tokens
MAX_WIDTH = 1 << 16  # hidden size
MAX_EXPANSION = 256  # decoded float32 bytes per payload byte that any codec may claim
EXPANSION_SLACK = 1 << 16  # fixed allowance per message (sink-only layers of tiny contexts)

# a JSON string, or an unclosed one to the end: each step takes one plain byte or one escape, so a
# header that never closes its quote is one linear scan (a pattern that can fail there rescans from
# every quote: quadratic, minutes for a 256 KiB header of escaped quotes)
_STRING = re.compile(rb'"(?:[^"\\]|\\.?)*"?', re.DOTALL)


def decoded_bytes(heads: int, head_dim: int, tokens: int) -> int:
    """Float32 bytes of one layer's keys and values."""
    return 2 * 4 * heads * tokens * head_dim


class LayerEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    index: Annotated[StrictInt, Field(ge=0, lt=MAX_LAYERS)]
    full: StrictBool
    tokens: Annotated[StrictInt, Field(ge=0, le=MAX_CONTEXT)]
    bytes: Annotated[StrictInt, Field(ge=0, lt=1 << 40)]


class ExtraEntry(BaseModel):
    """A frame after the layers: ``token_ids`` (int32, one per context token), or ``hidden`` (the
    hidden state entering ``layer``, ``tokens`` × ``width``, through the message's codec)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["token_ids", "hidden"]
    tokens: Annotated[StrictInt, Field(ge=1, le=MAX_CONTEXT)]
    bytes: Annotated[StrictInt, Field(ge=0, lt=1 << 40)]
    layer: Annotated[StrictInt, Field(ge=0, lt=MAX_LAYERS)] | None = None
    width: Annotated[StrictInt, Field(ge=1, le=MAX_WIDTH)] | None = None

    @model_validator(mode="after")
    def _fields_of_its_kind(self) -> ExtraEntry:
        if (self.kind == "hidden") != (self.layer is not None and self.width is not None) or \
                (self.kind == "token_ids" and (self.layer, self.width) != (None, None)):
            raise ValueError(f"a {self.kind} frame {'needs' if self.kind == 'hidden' else 'has no'} layer and width")
        return self

    @property
    def decoded_bytes(self) -> int:
        return 8 * self.tokens if self.kind == "token_ids" else 4 * self.tokens * (self.width or 0)


class CodecEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    params: dict[StrictStr, Any]


class Header(BaseModel):
    """The fields of a message header (version 9; versions 1–8 are read into the same model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fingerprint: dict[StrictStr, Any]
    codec: CodecEntry
    context_len: Annotated[StrictInt, Field(ge=1, le=MAX_CONTEXT)]
    sink_position: Annotated[StrictInt, Field(ge=0, lt=MAX_CONTEXT)]
    heads: Annotated[StrictInt, Field(ge=1, le=MAX_HEADS)]
    head_dim: Annotated[StrictInt, Field(ge=1, le=MAX_HEAD_DIM)]
    layers: Annotated[list[LayerEntry], Field(min_length=1, max_length=MAX_LAYERS)]
    mode: MaskMode = "causal"
    meta: dict[StrictStr, Any]
    extras: Annotated[list[ExtraEntry], Field(max_length=8)] = []
    opening: Annotated[StrictInt, Field(ge=0, le=MAX_CONTEXT)] = 0

    @model_validator(mode="after")
    def _consistent(self) -> Header:
        if self.sink_position >= self.context_len:
            raise ValueError(f"sink_position {self.sink_position} is outside a {self.context_len}-token context")
        if self.opening == 1 or self.opening > self.context_len:
            raise ValueError(f"an opening of {self.opening} tokens: it must be 0 (a sink) or 2..{self.context_len}")
        if self.opening and (self.sink_position != 0 or self.mode != "causal"):
            raise ValueError(f"an opening starts at position 0 in causal mode, not at {self.sink_position} "
                             f"in {self.mode} mode")
        unshared = (0, self.opening) if self.opening else (0, 1)
        for i, entry in enumerate(self.layers):
            if entry.index != i:
                raise ValueError(f"layer entry {i} has index {entry.index}")
            if entry.full and entry.tokens != self.context_len or not entry.full and entry.tokens not in unshared:
                kind = "full" if entry.full else "opening" if self.opening else "sink"
                holds = self.context_len if entry.full else f"{unshared[1]} (or 0: left out)"
                raise ValueError(f"layer {i} holds {entry.tokens} tokens; a {kind} layer of a "
                                 f"{self.context_len}-token context holds {holds}")
            if entry.tokens == 0 and entry.bytes != 0:
                raise ValueError(f"layer {i} is left out but has a {entry.bytes}-byte payload")
        kinds = [(extra.kind, extra.layer) for extra in self.extras]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"an extra frame appears twice: {kinds}")
        if any(extra.layer is not None and extra.layer >= len(self.layers) for extra in self.extras):
            raise ValueError(f"a hidden frame names a layer outside 0..{len(self.layers) - 1}")
        left_out = [entry.index for entry in self.layers if entry.tokens == 0]
        if left_out and (left_out != list(range(left_out[0], left_out[-1] + 1))
                         or ("hidden", left_out[0]) not in kinds):
            raise ValueError(f"left-out layers {left_out} must be one block with a hidden frame entering its first")
        if any(extra.tokens != self.context_len for extra in self.extras):
            raise ValueError(f"an extra frame holds another token count than the context's {self.context_len}")
        expected = {"num_layers": len(self.layers), "num_kv_heads": self.heads, "head_dim": self.head_dim}
        for key, value in expected.items():
            if key in self.fingerprint and self.fingerprint[key] != value:
                raise ValueError(f"fingerprint says {key}={self.fingerprint[key]!r}, the message has {value}")
        return self

    @property
    def decoded_bytes(self) -> int:
        """Float32 bytes of every layer's keys and values and hidden states (and int64 token ids) once decoded."""
        kv = sum(decoded_bytes(self.heads, self.head_dim, entry.tokens) for entry in self.layers)
        return kv + sum(extra.decoded_bytes for extra in self.extras)

    @property
    def payload_bytes(self) -> int:
        return sum(entry.bytes for entry in self.layers) + sum(extra.bytes for extra in self.extras)

    def check_size(self, max_decoded_bytes: int, max_bytes: int | None = None) -> None:
        """Refuses a message whose decoded size is over ``max_decoded_bytes`` or more than
        :data:`MAX_EXPANSION` times its payload (a decompression bomb), or whose frames the header
        declares larger than ``max_bytes`` in all, before anything is read or decoded."""
        if max_bytes is not None and self.payload_bytes > max_bytes:
            raise MessageTooLarge(f"the header declares {self.payload_bytes:,} payload bytes, "
                                  f"the limit is {max_bytes:,}")
        decoded = self.decoded_bytes
        if decoded > max_decoded_bytes:
            raise MessageTooLarge(f"message decodes to {decoded:,} bytes, the limit is {max_decoded_bytes:,}")
        if self.too_expanded:
            raise CorruptMessage(f"{self.payload_bytes:,} payload bytes cannot honestly decode to {decoded:,}")

    @property
    def too_expanded(self) -> bool:
        """Whether the message decodes to more than :data:`MAX_EXPANSION` times its payload (plus
        :data:`EXPANSION_SLACK`): what readers refuse as a decompression bomb."""
        return self.decoded_bytes > MAX_EXPANSION * self.payload_bytes + EXPANSION_SLACK

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), separators=(",", ":")).encode()


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise CorruptMessage(f"header holds an integer of {len(text)} digits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: infinity, which the header could not be written back with
        raise CorruptMessage(f"header holds {text}, beyond a finite number")
    return value


def _no_constant(name: str) -> None:
    raise CorruptMessage(f"header holds {name}, which is not JSON")


def nesting_depth(blob: bytes) -> int:
    """Deepest ``[``/``{`` nesting of a JSON text, strings excluded (no recursion, no parse)."""
    bare = np.frombuffer(_STRING.sub(b'""', blob), dtype=np.uint8)
    step = np.isin(bare, (ord("["), ord("{"))).astype(np.int64) - np.isin(bare, (ord("]"), ord("}")))
    return int(step.cumsum().max()) if step.size else 0


def parse_header(blob: bytes, version: int) -> Header:
    """A validated :class:`Header` from the raw header bytes of a message of ``version``.

    Raises:
        CorruptMessage: malformed JSON, too deep, a huge number, a missing, extra or inconsistent field.
    """
    if nesting_depth(blob) > MAX_DEPTH:
        raise CorruptMessage(f"header JSON nests deeper than {MAX_DEPTH} levels")
    try:
        raw = json.loads(blob.decode(), parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptMessage(f"header is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise CorruptMessage("header is not a JSON object")
    try:  # a lone surrogate ("\\ud800") is valid JSON but no text: printing or storing it fails later
        json.dumps(raw, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise CorruptMessage("header holds text that is not valid Unicode (a lone surrogate escape)") from None
    if version == 1:
        if "mode" in raw:
            raise CorruptMessage("a version 1 header has no 'mode' field")
        meta = raw.get("meta")
        raw = {**raw, "mode": meta.get("mode", "causal") if isinstance(meta, dict) else "causal"}
    elif "mode" not in raw:
        raise CorruptMessage("header lacks the 'mode' field")
    if version < 3 and "extras" in raw:
        raise CorruptMessage(f"a version {version} header has no 'extras' field")
    if version >= 3 and "extras" not in raw:
        raise CorruptMessage("header lacks the 'extras' field")
    if version < OPENING_SINCE and "opening" in raw:
        raise CorruptMessage(f"a version {version} header has no 'opening' field")
    if version >= OPENING_SINCE and "opening" not in raw:
        raise CorruptMessage("header lacks the 'opening' field")
    try:
        header = Header.model_validate(raw)
    except ValidationError as err:
        raise CorruptMessage(describe(err, "header")) from None
    if version < 4 and (any(e.tokens == 0 for e in header.layers) or any(e.kind == "hidden" for e in header.extras)):
        raise CorruptMessage(f"a version {version} message has no hidden frames or left-out layers")
    return header
