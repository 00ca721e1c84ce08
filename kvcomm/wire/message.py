"""``KVMessage``: the binary format in which one sender's shared KV travels.

Layout (all integers little-endian)::

    b"KVCM"  u16 version  u32 header length  header (UTF-8 JSON)  u32 crc32(header)
    per layer, in order:   u32 payload length  payload (safetensors)  u32 crc32(payload)
    b"KEND"  16-byte BLAKE2b digest of everything before it

The header describes itself: model fingerprint, codec and parameters, context length, positions
and, per layer, whether it is shared in full, its token count and its payload length. Payloads
are safetensors blobs (a plain, zero-copy-readable tensor container; never pickle). Each frame has
its own CRC so a streaming reader can use layer 0 before the last layer arrives; the final digest
covers the whole message. Any problem raises a :class:`~kvcomm.wire.errors.WireError` subclass
and nothing partly decoded is returned.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kvcomm.protocol.receiver import SharedKV
from kvcomm.wire.codecs import Codec, make_codec
from kvcomm.wire.errors import CorruptMessage, MessageTooLarge, TruncatedMessage, UnsupportedVersion, WireError

MAGIC, END = b"KVCM", b"KEND"
VERSION = 1
MAX_HEADER = 1 << 20
MAX_EXPANSION = 256  # decoded float32 bytes per payload byte that any codec may claim
DEFAULT_MAX_BYTES = 1 << 31
_HEADER_FIELDS = {"fingerprint", "codec", "context_len", "sink_position", "heads", "head_dim", "layers", "meta"}


@dataclass
class LayerKV:
    """One layer of a message: keys and values ``[H, T, D]`` (T = |C| if full, else 1)."""

    index: int
    full: bool
    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class KVMessage:
    """What a sender sends: every layer's shared KV (or sink), with what is needed to check and use it.

    Attributes:
        fingerprint: the sender model's fingerprint (``LoadedModel.fingerprint``).
        context_len: |C|; the receiver's positions start here.
        sink_position: RoPE position of the sink at non-shared layers (0, or |C|-1 for shift-back).
        layers: one entry per model layer, in order.
        codec: how payloads are (or were) encoded.
        meta: free-form JSON-serialisable notes (sender name, mode, …).
    """

    fingerprint: dict[str, Any]
    context_len: int
    sink_position: int
    layers: list[LayerKV]
    codec: Codec = field(default_factory=lambda: make_codec("fp16"))
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_shared(cls, shared: SharedKV, fingerprint: dict[str, Any], codec: Codec | str = "fp16",
                    meta: dict[str, Any] | None = None) -> KVMessage:
        """A message from a one-row :class:`SharedKV` (use ``SharedKV.row(i)`` for a batch)."""
        if shared.context_len.shape[0] != 1:
            raise WireError("a KV message holds one context; pass SharedKV.row(i)")
        sink = next((int(p[0, 0]) for p, full in zip(shared.positions, shared.full) if not full), 0)
        layers = [LayerKV(i, full, k[0].float(), v[0].float())
                  for i, (k, v, full) in enumerate(zip(shared.keys, shared.values, shared.full))]
        return cls(fingerprint, int(shared.context_len[0]), sink, layers,
                   make_codec(codec) if isinstance(codec, str) else codec, dict(meta or {}))

    def to_shared(self, dtype: torch.dtype = torch.float32) -> SharedKV:
        """The one-row :class:`SharedKV` a receiver builds its cache from."""
        context = torch.arange(self.context_len)[None]
        return SharedKV(
            keys=[layer.keys[None].to(dtype) for layer in self.layers],
            values=[layer.values[None].to(dtype) for layer in self.layers],
            positions=[context if layer.full else torch.tensor([[self.sink_position]]) for layer in self.layers],
            valid=[torch.ones(1, layer.keys.shape[1], dtype=torch.bool) for layer in self.layers],
            context_len=torch.tensor([self.context_len]), full=[layer.full for layer in self.layers],
        )

    @property
    def shared_layers(self) -> list[int]:
        return [layer.index for layer in self.layers if layer.full]

    # -- writing -------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.write(buffer)
        return buffer.getvalue()

    def write(self, out: BinaryIO) -> int:
        """Encodes and writes the message; returns the number of bytes written."""
        payloads = [self._encode_layer(layer) for layer in self.layers]
        first = self.layers[0].keys
        header = {
            "fingerprint": self.fingerprint, "context_len": self.context_len, "sink_position": self.sink_position,
            "codec": {"name": self.codec.name, "params": self.codec.params()},
            "heads": int(first.shape[0]), "head_dim": int(first.shape[2]), "meta": self.meta,
            "layers": [{"index": l.index, "full": l.full, "tokens": int(l.keys.shape[1]), "bytes": len(p)}
                       for l, p in zip(self.layers, payloads)],  # noqa: E741
        }
        blob = json.dumps(header, separators=(",", ":")).encode()
        digest = hashlib.blake2b(digest_size=16)
        written = 0

        def emit(data: bytes) -> None:
            nonlocal written
            digest.update(data)
            out.write(data)
            written += len(data)

        emit(MAGIC + struct.pack("<HI", VERSION, len(blob)) + blob + struct.pack("<I", zlib.crc32(blob)))
        for payload in payloads:
            emit(struct.pack("<I", len(payload)) + payload + struct.pack("<I", zlib.crc32(payload)))
        out.write(END + digest.digest())
        return written + len(END) + 16

    def _encode_layer(self, layer: LayerKV) -> bytes:
        if layer.keys.shape != layer.values.shape or layer.keys.dim() != 3:
            raise WireError(f"layer {layer.index}: keys {tuple(layer.keys.shape)} and values "
                            f"{tuple(layer.values.shape)} must both be [heads, tokens, head_dim]")
        tensors = self.codec.encode(layer.keys.float(), layer.values.float(), layer.index, len(self.layers))
        return st_save({name: t.contiguous() for name, t in tensors.items()})

    def save(self, path: str | Path) -> int:
        """Writes the message to ``path`` atomically (a partial file is never left under that name)."""
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        with partial.open("wb") as f:
            size = self.write(f)
        partial.replace(path)
        return size

    # -- reading -------------------------------------------------------------------------------

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> KVMessage:
        if len(data) > max_bytes:
            raise MessageTooLarge(f"message is {len(data)} bytes, the limit is {max_bytes}")
        stream = io.BytesIO(data)
        message = cls.read(stream, max_bytes)
        if stream.read(1):
            raise CorruptMessage("trailing bytes after the end of the message")
        return message

    @classmethod
    def load(cls, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> KVMessage:
        path = Path(path)
        if path.stat().st_size > max_bytes:
            raise MessageTooLarge(f"{path} is {path.stat().st_size} bytes, the limit is {max_bytes}")
        with path.open("rb") as f:
            message = cls.read(f, max_bytes)
            if f.read(1):
                raise CorruptMessage(f"{path}: trailing bytes after the end of the message")
        return message

    @classmethod
    def read(cls, stream: BinaryIO, max_bytes: int = DEFAULT_MAX_BYTES) -> KVMessage:
        """Reads one whole message; returns it only once every check has passed."""
        reader = MessageReader(stream, max_bytes)
        layers = list(reader.layers())
        h = reader.header
        return cls(h["fingerprint"], h["context_len"], h["sink_position"], layers, reader.codec, h["meta"])


class MessageReader:
    """Reads a message frame by frame: :attr:`header` first, then :meth:`layers` one at a time.

    Each yielded layer has passed its own CRC and decoded cleanly; the whole-message digest is
    checked after the last layer, so a consumer that starts early must discard its work if
    iteration raises.
    """

    def __init__(self, stream: BinaryIO, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._stream, self._max, self._read = stream, max_bytes, 0
        self._digest = hashlib.blake2b(digest_size=16)
        start = self._take(10, "the start of the message")
        if start[:4] != MAGIC:
            raise CorruptMessage("not a KV message (bad magic bytes)")
        version, size = struct.unpack("<HI", start[4:])
        if version != VERSION:
            raise UnsupportedVersion(f"message format version {version}; this reader supports {VERSION}")
        if size > MAX_HEADER:
            raise CorruptMessage(f"header length {size} exceeds {MAX_HEADER}")
        blob = self._take(size, "the header")
        (crc,) = struct.unpack("<I", self._take(4, "the header checksum"))
        if zlib.crc32(blob) != crc:
            raise CorruptMessage("header checksum mismatch")
        self.header = _parse_header(blob)
        try:
            self.codec = make_codec(self.header["codec"]["name"], **self.header["codec"]["params"])
        except (WireError, ValueError, TypeError) as err:
            raise CorruptMessage(f"header names an unusable codec: {err}") from None

    def _take(self, size: int, what: str, hashed: bool = True) -> bytes:
        if self._read + size > self._max:
            raise MessageTooLarge(f"message exceeds the limit of {self._max} bytes")
        data = self._stream.read(size)
        if len(data) != size:
            raise TruncatedMessage(f"message ends inside {what} ({len(data)} of {size} bytes)")
        self._read += size
        if hashed:
            self._digest.update(data)
        return data

    def layers(self) -> Iterator[LayerKV]:
        h = self.header
        shape_of = lambda entry: (h["heads"], entry["tokens"], h["head_dim"])  # noqa: E731
        for entry in h["layers"]:
            (size,) = struct.unpack("<I", self._take(4, f"layer {entry['index']}'s length"))
            if size != entry["bytes"]:
                raise CorruptMessage(f"layer {entry['index']}: frame holds {size} bytes, header says {entry['bytes']}")
            payload = self._take(size, f"layer {entry['index']}")
            (crc,) = struct.unpack("<I", self._take(4, f"layer {entry['index']}'s checksum"))
            if zlib.crc32(payload) != crc:
                raise CorruptMessage(f"layer {entry['index']}: checksum mismatch")
            decoded = 2 * 4 * h["heads"] * entry["tokens"] * h["head_dim"]
            if decoded > MAX_EXPANSION * size + (1 << 20):  # guards against decompression bombs
                raise CorruptMessage(f"layer {entry['index']}: {size} bytes cannot honestly decode to {decoded}")
            yield _decode_layer(self.codec, entry, payload, shape_of(entry), len(h["layers"]))
        end = self._take(4 + 16, "the end marker", hashed=False)
        if end[:4] != END or end[4:] != self._digest.digest():
            raise CorruptMessage("end marker or whole-message digest mismatch")


def _parse_header(blob: bytes) -> dict[str, Any]:
    try:
        header = json.loads(blob.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptMessage(f"header is not valid JSON: {err}") from None
    if not isinstance(header, dict) or set(header) != _HEADER_FIELDS:
        raise CorruptMessage("header fields are not those of a KV message")
    ints = ("context_len", "sink_position", "heads", "head_dim")
    if not all(isinstance(header[k], int) and header[k] >= 0 for k in ints) or min(
            header["heads"], header["head_dim"], header["context_len"]) < 1:
        raise CorruptMessage("header sizes must be positive integers")
    layers = header["layers"]
    if not isinstance(layers, list) or not layers or not isinstance(header["codec"], dict):
        raise CorruptMessage("header has no layers or no codec")
    for i, entry in enumerate(layers):
        ok = (isinstance(entry, dict) and entry.get("index") == i and isinstance(entry.get("full"), bool)
              and entry.get("tokens") == (header["context_len"] if entry["full"] else 1)
              and isinstance(entry.get("bytes"), int) and entry["bytes"] >= 0)
        if not ok:
            raise CorruptMessage(f"header entry for layer {i} is malformed")
    if not isinstance(header["codec"].get("name"), str) or not isinstance(header["codec"].get("params"), dict):
        raise CorruptMessage("header codec entry is malformed")
    return header


def _decode_layer(codec: Codec, entry: dict[str, Any], payload: bytes, shape: tuple[int, int, int],
                  num_layers: int) -> LayerKV:
    try:
        keys, values = codec.decode(st_load(payload), shape, entry["index"], num_layers)
    except WireError:  # e.g. a codebook this machine lacks: say so, not "corrupt"
        raise
    except (SafetensorError, KeyError, ValueError, RuntimeError, TypeError, IndexError) as err:
        raise CorruptMessage(f"layer {entry['index']}: payload does not decode ({type(err).__name__}: {err})") from None
    except Exception as err:  # a codec library's own error type (zstd, constriction): still corrupt input
        raise CorruptMessage(f"layer {entry['index']}: payload does not decode ({type(err).__name__})") from None
    if tuple(keys.shape) != shape or tuple(values.shape) != shape:
        raise CorruptMessage(f"layer {entry['index']}: decoded shape {tuple(keys.shape)}, expected {shape}")
    if not (torch.isfinite(keys).all() and torch.isfinite(values).all()):
        raise CorruptMessage(f"layer {entry['index']}: decoded keys or values are not finite")
    return LayerKV(entry["index"], entry["full"], keys, values)
