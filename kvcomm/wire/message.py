"""``KVMessage``: the binary format in which one sender's shared KV travels.

Layout (all integers little-endian)::

    b"KVCM"  u16 version  u32 header length  header (UTF-8 JSON)  u32 crc32(header)
    per layer, in order:   u32 payload length  payload (safetensors)  u32 crc32(payload)
    per extra (version 3+): u32 payload length  payload (safetensors)  u32 crc32(payload)
    b"KEND"  16-byte BLAKE2b digest: version 6 on, of the header part (up to its crc32) and each
             frame's length and crc32; before, of every byte before it

The header (:mod:`kvcomm.wire.header`) describes itself: model fingerprint, codec and
parameters, context length, sink position, mask mode and, per layer, whether it is shared in
full, its token count and its payload length. Payloads are safetensors blobs (a plain,
zero-copy-readable tensor container; never pickle). Each frame has its own CRC so a streaming
reader can use layer 0 before the last layer arrives; the final digest binds the frames, in their
order, to the header. (Up to version 5 it hashed every byte again: at ~650 MB/s on this CPU, a
second pass that cost more than decoding an entropy-coded message. What it added was a second
check of each frame's bytes against accidental damage, which its CRC catches but for one time in
2**32; against a forger neither helps, since the digest was never keyed.)
Any problem raises a :class:`~kvcomm.errors.WireError` subclass and nothing partly decoded is
returned. Versions 1 (mode in ``meta``), 2 (no extra frames) and 3 (token ids only) still read.
From version 4 on, versions differ in the entropy coder of an entropy-coded codec's payloads
(:func:`~kvcomm.wire.codecs.base.header_codec`): ``constriction`` up to 4, then kvcomm's rANS on
two states (5), on four (6), with two or four small codes to a symbol (7: pairs where a stream
has at most 16 distinct codes; 8: at most 32); and in the final digest (6 on, above).
Extra frames carry the context's token ids, which blending (recomputing tokens) needs, and hidden
states entering a layer (through the message's codec), which recomputing layers (DroidSpeak)
needs; a layer may be left out (0 tokens, no payload) where the receiver computes it itself.
From version 9 a layer not shared may hold an opening (the header's ``opening`` tokens from
position 0, as a receiver of passages keeps them) instead of one sink token.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import save as st_save

from kvcomm.config import describe
from kvcomm.errors import CorruptMessage, MessageTooLarge, TruncatedMessage, UnsupportedVersion, WireError
from kvcomm.files import atomic_write
from kvcomm.models.fingerprint import Fingerprint, check_fingerprint
from kvcomm.protocol.layout import MaskMode
from kvcomm.protocol.shared import SharedKV, received_positions
from kvcomm.wire.checksum import crc32
from kvcomm.wire.codecs import Codec, make_codec
from kvcomm.wire.codecs.base import FLOAT16_MAX, all_finite, header_codec, in_two_lanes, side_by_side, value_range
from kvcomm.wire.header import (
    DIGEST_OF_CRCS_SINCE,
    FRAME_OVERHEAD,
    MAX_HEADER,
    READABLE,
    VERSION,
    CodecEntry,
    ExtraEntry,
    Header,
    LayerEntry,
    parse_header,
)
from kvcomm.wire.payload import payload_tensors

MAGIC, END = b"KVCM", b"KEND"
DEFAULT_MAX_BYTES = 1 << 31
DEFAULT_MAX_DECODED = 1 << 33  # 8 GiB of float32 KV; services set their own, smaller limit


@dataclass
class LayerKV:
    """One layer of a message: keys and values ``[H, T, D]`` (T = |C| if full, 1 for the sink or
    the opening's width where passages keep one, 0 where the layer is left out)."""

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
        sink_position: RoPE position of the sink at non-shared layers (0, or |C|-1 for shift-back);
            an opening (layers not shared holding more than one token, :attr:`opening`) starts there.
        layers: one entry per model layer, in order.
        codec: how payloads are (or were) encoded.
        meta: free-form JSON-serialisable notes (sender name, …).
        mode: the mask mode the receiver must use (one of ``kvcomm.protocol.MASK_MODES``).
        token_ids: the context's token ids (``[C]``), when the sender sends them.
        hidden: ``{layer: [C, H]}`` the sender's hidden states entering those layers, when sent.
    """

    fingerprint: Fingerprint
    context_len: int
    sink_position: int
    layers: list[LayerKV]
    codec: Codec = field(default_factory=lambda: make_codec("fp16"))
    meta: dict[str, Any] = field(default_factory=dict)
    mode: MaskMode = "causal"
    token_ids: torch.Tensor | None = None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_shared(cls, shared: SharedKV, fingerprint: Fingerprint, codec: Codec | str = "fp16",
                    meta: dict[str, Any] | None = None) -> KVMessage:
        """A message from a one-row :class:`SharedKV` (use ``SharedKV.row(i)`` for a batch)."""
        if shared.context_len.shape[0] != 1:
            raise WireError("a KV message holds one context; pass SharedKV.row(i)")
        sink = next((int(p[0, 0]) for p, full in zip(shared.positions, shared.full) if not full and p.shape[1]), 0)
        layers = [LayerKV(i, full, k[0].float(), v[0].float())
                  for i, (k, v, full) in enumerate(zip(shared.keys, shared.values, shared.full))]
        ids = None if shared.token_ids is None else shared.token_ids[0].to(torch.int64)
        hidden = {layer: h[0].float() for layer, h in shared.hidden.items()}
        return cls(fingerprint, int(shared.context_len[0]), sink, layers,
                   make_codec(codec) if isinstance(codec, str) else codec, dict(meta or {}), shared.mode, ids, hidden)

    def to_shared(self, dtype: torch.dtype = torch.float32) -> SharedKV:
        """The one-row :class:`SharedKV` a receiver builds its cache from."""
        return SharedKV(
            keys=[layer.keys[None].to(dtype) for layer in self.layers],
            values=[layer.values[None].to(dtype) for layer in self.layers],
            positions=[received_positions(layer.full, layer.keys.shape[1], self.context_len, self.sink_position)
                       for layer in self.layers],
            valid=[torch.ones(1, layer.keys.shape[1], dtype=torch.bool) for layer in self.layers],
            context_len=torch.tensor([self.context_len]), full=[layer.full for layer in self.layers],
            mode=self.mode, token_ids=None if self.token_ids is None else self.token_ids[None],
            hidden={layer: h[None].to(dtype) for layer, h in self.hidden.items()},
            columns=torch.ones(1, self.context_len, dtype=torch.bool),
        )

    @classmethod
    def round_trip(cls, shared: SharedKV, sender: Fingerprint, receiver: Fingerprint, codec: Codec,
                   dtype: torch.dtype = torch.float32,
                   encoding: Callable[[], AbstractContextManager[Any]] = nullcontext) -> tuple[SharedKV, list[int]]:
        """Each row of ``shared`` encoded as a message from ``sender`` and decoded as ``receiver``
        does (its fingerprint checked): what a batch looks like after the wire, and each
        message's size in bytes. Each encoding runs inside ``encoding()`` (e.g. a timer that
        charges it to the sender)."""
        rows, sizes = [], []
        for i in range(shared.context_len.shape[0]):
            with encoding():
                data = cls.from_shared(shared.row(i), sender, codec).to_bytes()
            rows.append(cls.from_bytes(data, receiver=receiver).to_shared(dtype))
            sizes.append(len(data))
        return SharedKV.stack(rows), sizes

    @property
    def shared_layers(self) -> list[int]:
        """The layers whose KV the message holds in full (the others hold the sink, or an opening)."""
        return [layer.index for layer in self.layers if layer.full]

    @property
    def opening(self) -> int:
        """How many tokens the layers not shared hold when that is more than a sink (0: a sink each).

        Raises:
            WireError: those layers hold different numbers of tokens.
        """
        held = {int(layer.keys.shape[1]) for layer in self.layers if not layer.full} - {0}
        if len(held) > 1:
            raise WireError(f"the layers not shared hold {sorted(held)} tokens: one sink, or one opening, each")
        width = held.pop() if held else 0
        return width if width > 1 else 0

    # -- writing -------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The message in the wire format (:meth:`from_bytes` reads it; :meth:`save` writes it to a file)."""
        buffer = io.BytesIO()
        self.write(buffer)
        return buffer.getvalue()

    def write(self, out: BinaryIO) -> int:
        """Encodes and writes the message; returns the number of bytes written. A codec that chooses
        per message (``auto``) encodes it with its choice, named in the header with its reasons."""
        if not self.layers:
            raise WireError("a message holds at least one layer")
        largest, extent = self.codec.largest_value(), 0.0

        def check_values(tensor: torch.Tensor, what: str) -> None:
            nonlocal extent
            low, high = value_range(tensor)
            if not (math.isfinite(low) and math.isfinite(high)):
                raise WireError(f"{what} hold NaN or infinity; a message carries finite values only")
            extent = max(extent, -low, high)
            if largest is not None and max(-low, high) > largest:
                half = largest <= FLOAT16_MAX
                stored = "float16 values, ranges or steps" if half else "bfloat16 values"
                raise WireError(f"{what}: {self.codec.name} stores {stored}, and these exceed "
                                f"{'float16' if half else 'bfloat16'}'s range (|x| up to {max(-low, high):.3g}); "
                                "send it with " + ("fp32 or bf16" if half else "fp32"))

        for layer in self.layers:  # before any codec (``auto`` measures them all) sees the values
            if layer.keys.shape != layer.values.shape or layer.keys.dim() != 3:
                raise WireError(f"layer {layer.index}: keys {tuple(layer.keys.shape)} and values "
                                f"{tuple(layer.values.shape)} must both be [heads, tokens, head_dim]")
            for tensor in (layer.keys, layer.values):
                check_values(tensor, f"layer {layer.index}: the keys or values")
        first = self.layers[0].keys
        if odd := [layer.index for layer in self.layers if layer.keys.shape[1] and (
                layer.keys.shape[0], layer.keys.shape[2]) != (first.shape[0], first.shape[2])]:
            raise WireError(f"layers {odd} have other heads or head size than layer {self.layers[0].index}'s "
                            f"{first.shape[0]} × {first.shape[2]}: one message holds one model's KV")
        for index, hidden in self.hidden.items():
            if hidden.dim() != 2 or hidden.shape[0] != self.context_len or not 0 <= index < len(self.layers):
                raise WireError(f"a hidden state must be [{self.context_len}, width] and enter a layer of the "
                                f"message; got {tuple(hidden.shape)} entering layer {index}")
            check_values(hidden, f"the hidden state entering layer {index}")  # as keys and values (before: a
            # bare error from the codec, or a message every reader refused)
        ids = self._ids_frame()
        codec, notes = self.codec.for_message(self.layers, extent, self.hidden,
                                              sum(len(data) + FRAME_OVERHEAD for _, data in ids))
        payloads = [self._encode_layer(layer, codec) for layer in self.layers]
        extras = ids + self._encode_hidden(codec)
        try:
            header = Header(
                fingerprint=self.fingerprint, context_len=self.context_len, sink_position=self.sink_position,
                opening=self.opening,
                codec=CodecEntry(name=codec.name, params=codec.params()),
                heads=int(first.shape[0]), head_dim=int(first.shape[2]), mode=self.mode, meta={**self.meta, **notes},
                layers=[LayerEntry(index=layer.index, full=layer.full, tokens=int(layer.keys.shape[1]), bytes=len(p))
                        for layer, p in zip(self.layers, payloads)],
                extras=[entry for entry, _ in extras],
            )
            blob = header.to_json()
            if len(blob) > MAX_HEADER:  # what every reader refuses is not written
                raise WireError(f"this message cannot be written: its header would be {len(blob):,} bytes, readers "
                                f"accept {MAX_HEADER:,} (a large meta?)")
            try:
                parse_header(blob, VERSION)  # e.g. an integer of 26 digits, or meta nested 20 deep
            except CorruptMessage as err:
                raise WireError(f"this message cannot be written: readers would refuse its header ({err})") from None
            if header.too_expanded:
                raise WireError(f"this KV encodes to {header.payload_bytes:,} bytes that decode to "
                                f"{header.decoded_bytes:,}, more than readers accept from so few (a decompression "
                                "bomb's mark): it is nearly constant; send it with fp16")
        except ValidationError as err:
            raise WireError(describe(err, "this message cannot be written")) from None
        except TypeError as err:
            raise WireError(f"this message cannot be written: {err}") from None
        digest = hashlib.blake2b(digest_size=16)
        written = 0

        def emit(*parts: bytes) -> None:
            nonlocal written
            for data in parts:
                out.write(data)
                written += len(data)

        start = MAGIC + struct.pack("<HI", VERSION, len(blob)) + blob + struct.pack("<I", crc32(blob))
        digest.update(start)
        emit(start)
        for payload in [*payloads, *(data for _, data in extras)]:
            length, crc = struct.pack("<I", len(payload)), struct.pack("<I", crc32(payload))
            digest.update(length + crc)
            emit(length, payload, crc)
        out.write(END + digest.digest())
        return written + len(END) + 16

    def _encode_layer(self, layer: LayerKV, codec: Codec) -> bytes:
        """One layer's payload (its shape and values checked by :meth:`write`)."""
        if layer.keys.shape[1] == 0:  # left out: the receiver computes this layer itself
            return b""
        tensors = codec.encode(layer.keys.float(), layer.values.float(), layer.index, len(self.layers))
        return st_save({name: t.contiguous() for name, t in tensors.items()})

    def _ids_frame(self) -> list[tuple[ExtraEntry, bytes]]:
        """The token ids' frame, if the message carries them (no codec touches it)."""
        if self.token_ids is None:
            return []
        ids = self.token_ids.reshape(-1)
        if ids.numel() != self.context_len or (ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= 1 << 31)):
            raise WireError(f"token ids must be {self.context_len} non-negative int32 values")
        data = st_save({"ids": ids.to(torch.int32).contiguous()})
        return [(ExtraEntry(kind="token_ids", tokens=self.context_len, bytes=len(data)), data)]

    def _encode_hidden(self, codec: Codec) -> list[tuple[ExtraEntry, bytes]]:
        out = []
        for layer, hidden in sorted(self.hidden.items()):  # (shapes checked by write)
            tensors = codec.encode_hidden(hidden.float(), layer, len(self.layers))
            data = st_save({name: t.contiguous() for name, t in tensors.items()})
            out.append((ExtraEntry(kind="hidden", tokens=self.context_len, bytes=len(data), layer=layer,
                                   width=int(hidden.shape[1])), data))
        return out

    def save(self, path: str | Path) -> int:
        """Writes the message to ``path`` atomically (a partial file is never left under that name)."""
        data = self.to_bytes()
        atomic_write(path, data)
        return len(data)

    # -- reading -------------------------------------------------------------------------------

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int = DEFAULT_MAX_BYTES, receiver: Fingerprint | None = None,
                   max_decoded_bytes: int = DEFAULT_MAX_DECODED,
                   admit: Callable[[Header], None] | None = None) -> KVMessage:
        """Decodes and verifies a whole message (see :class:`MessageReader` for the arguments)."""
        if len(data) > max_bytes:
            raise MessageTooLarge(f"message is {len(data)} bytes, the limit is {max_bytes}")
        stream = io.BytesIO(data)
        message = cls.read(stream, max_bytes, receiver, max_decoded_bytes, admit)
        if stream.read(1):
            raise CorruptMessage("trailing bytes after the end of the message")
        return message

    @classmethod
    def load(cls, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, receiver: Fingerprint | None = None,
             max_decoded_bytes: int = DEFAULT_MAX_DECODED) -> KVMessage:
        """The message saved at ``path`` (checked as :meth:`read` checks it).

        Raises:
            WireError: the file cannot be read (missing, a folder, no permission), or what
                :meth:`read` raises.
        """
        path = Path(path)
        try:
            with path.open("rb") as f:
                if (size := os.fstat(f.fileno()).st_size) > max_bytes:
                    raise MessageTooLarge(f"{path} is {size} bytes, the limit is {max_bytes}")
                message = cls.read(f, max_bytes, receiver, max_decoded_bytes)
                if f.read(1):
                    raise CorruptMessage(f"{path}: trailing bytes after the end of the message")
        except OSError as err:
            raise WireError(f"cannot read the message {path}: {err.strerror or err}") from None
        return message

    @classmethod
    def read(cls, stream: BinaryIO, max_bytes: int = DEFAULT_MAX_BYTES, receiver: Fingerprint | None = None,
             max_decoded_bytes: int = DEFAULT_MAX_DECODED, admit: Callable[[Header], None] | None = None) -> KVMessage:
        """Reads one whole message; returns it only once every check has passed."""
        reader = MessageReader(stream, max_bytes, receiver, max_decoded_bytes, admit)
        return cls.from_reader(reader, list(reader.layers(whole=True)))

    @classmethod
    def from_reader(cls, reader: MessageReader, layers: list[LayerKV]) -> KVMessage:
        """The message a reader has read to its end (``layers``: what its :meth:`~MessageReader.layers` yielded)."""
        h = reader.header
        return cls(dict(h.fingerprint), h.context_len, h.sink_position, layers, reader.codec, dict(h.meta), h.mode,
                   reader.token_ids, reader.hidden)


class MessageReader:
    """Reads a message frame by frame: :attr:`header` first, then :meth:`layers` one at a time.

    The header is checked before any payload is read: its schema, its sizes against each other,
    the fingerprint against ``receiver`` (when given), and the decoded size against
    ``max_decoded_bytes`` and the payload size. Each yielded layer has passed its own CRC and
    decoded cleanly; the whole-message digest is checked after the last layer, so a consumer that
    starts early must discard its work if iteration raises.

    Args:
        max_bytes: the most bytes the message may take on the wire.
        receiver: the fingerprint of the model that will use the message.
        max_decoded_bytes: the most float32 bytes its keys and values may take once decoded.
        admit: what will use the message checks its header (it raises to refuse it), after the
            checks above and before any payload is read (e.g. a service: the context against its
            model's positions).
    """

    def __init__(self, stream: BinaryIO, max_bytes: int = DEFAULT_MAX_BYTES, receiver: Fingerprint | None = None,
                 max_decoded_bytes: int = DEFAULT_MAX_DECODED, admit: Callable[[Header], None] | None = None) -> None:
        self._stream, self._max, self._read = stream, max_bytes, 0
        self._digest = hashlib.blake2b(digest_size=16)
        start = self._take(10, "the start of the message")
        if start[:4] != MAGIC:
            raise CorruptMessage("not a KV message (bad magic bytes)")
        version, size = struct.unpack("<HI", start[4:])
        if version not in READABLE:
            raise UnsupportedVersion(f"message format version {version}; this reader supports "
                                     f"{', '.join(map(str, READABLE))}")
        if size > MAX_HEADER:
            raise CorruptMessage(f"header length {size} exceeds {MAX_HEADER}")
        blob = self._take(size, "the header")
        (crc,) = struct.unpack("<I", self._take(4, "the header checksum"))
        if crc32(blob) != crc:
            raise CorruptMessage("header checksum mismatch")
        self.version = version
        self.token_ids: torch.Tensor | None = None  # set once the extra frames are read
        self.hidden: dict[int, torch.Tensor] = {}  # likewise
        self.header = parse_header(blob, version)
        if receiver is not None:
            check_fingerprint(self.header.fingerprint, receiver)
        self.header.check_size(max_decoded_bytes, max_bytes)
        if admit is not None:
            admit(self.header)
        try:
            self.codec = header_codec(self.header.codec.name, self.header.codec.params, version)
        except (WireError, ValueError, TypeError) as err:
            raise CorruptMessage(f"header names an unusable codec: {err}") from None

    def _take(self, size: int, what: str, hashed: bool = True) -> bytes:
        if self._read + size > self._max:
            raise MessageTooLarge(f"message exceeds the limit of {self._max} bytes")
        data = _read_exactly(self._stream, size)
        if len(data) != size:
            raise TruncatedMessage(f"message ends inside {what} ({len(data)} of {size} bytes)")
        self._read += size
        if hashed:
            self._digest.update(data)
        return data

    def _frame(self, declared: int, what: str) -> bytes:
        """One ``length | payload | crc32`` frame whose length the header declared."""
        (size,) = struct.unpack("<I", self._take(4, f"{what}'s length"))
        if size != declared:
            raise CorruptMessage(f"{what} holds {size} bytes, the header says {declared}")
        payload = self._take(size, what, hashed=self.version < DIGEST_OF_CRCS_SINCE)
        (crc,) = struct.unpack("<I", self._take(4, f"{what}'s checksum"))
        if crc32(payload) != crc:
            raise CorruptMessage(f"{what}: checksum mismatch")
        return payload

    def layers(self, whole: bool = False) -> Iterator[LayerKV]:
        """The layers in order, each decoded as its frame arrives; with ``whole`` (the caller
        wants every layer before using any), every frame is read and checked first, then every
        payload's tensors, and then the codec's calls decode two at a time
        (:func:`_decode_layers`), so a bad frame anywhere is refused before a bad payload in an
        earlier layer."""
        h = self.header
        if whole:
            frames = deque((entry, self._frame(entry.bytes, f"layer {entry.index}")) for entry in h.layers)
            yield from _decode_layers(self.codec, frames, h.heads, h.head_dim)
        else:
            for entry in h.layers:
                payload = self._frame(entry.bytes, f"layer {entry.index}")
                yield _decode_layer(self.codec, entry, payload, (h.heads, entry.tokens, h.head_dim), len(h.layers))
        for extra in h.extras:
            payload = self._frame(extra.bytes, f"the {extra.kind} frame")
            if extra.kind == "token_ids":
                self.token_ids = _decode_ids(payload, extra.tokens)
            else:
                assert extra.layer is not None and extra.width is not None
                self.hidden[extra.layer] = _decode_hidden(self.codec, payload, (extra.tokens, extra.width),
                                                          extra.layer, len(h.layers))
        end = self._take(4 + 16, "the end marker", hashed=False)
        if end[:4] != END or end[4:] != self._digest.digest():
            raise CorruptMessage("end marker or whole-message digest mismatch")


READ_PIECE = 1 << 20
"""The most bytes asked of a stream at once: a buffered reader allocates what it is asked for
before any arrives, so a frame is read in pieces and memory follows the bytes that came."""


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    """``size`` bytes, or fewer only at the end of the stream (pipes and sockets return short reads),
    asked for :data:`READ_PIECE` at a time (at once from memory, which returns no more than it holds)."""
    whole = size <= READ_PIECE or isinstance(stream, io.BytesIO)
    data = stream.read(size if whole else READ_PIECE)
    if data is None:
        data = b""
    if len(data) == size or not data:
        return data
    parts = [data]
    remaining = size - len(data)
    while remaining:
        more = stream.read(min(remaining, READ_PIECE))
        if not more:
            break
        parts.append(more)
        remaining -= len(more)
    return b"".join(parts)


def _decode_layer(codec: Codec, entry: LayerEntry, payload: bytes, shape: tuple[int, int, int],
                  num_layers: int) -> LayerKV:
    if entry.tokens == 0:  # left out (the header checked it has no payload)
        return LayerKV(entry.index, entry.full, torch.zeros(shape), torch.zeros(shape))
    with _payload_errors(entry):  # as a whole message's layers: the tensors checked, then keys, then values
        keys, values = codec.decoders(payload_tensors(payload), shape, entry.index, num_layers)
    return LayerKV(entry.index, entry.full, *side_by_side(functools.partial(_run_call, codec, keys, entry, shape),
                                                          functools.partial(_run_call, codec, values, entry, shape),
                                                          shape))


def _decode_layers(codec: Codec, frames: deque[tuple[LayerEntry, bytes]], heads: int,
                   head_dim: int) -> list[LayerKV]:
    """Every layer of a whole message, in order: each payload's tensors are checked on this thread
    (:meth:`~kvcomm.wire.codecs.base.Codec.decoders`; ``frames`` is emptied, each payload let go
    once read), then the codec's calls, keys and values of every layer, run two at a time
    (:func:`~kvcomm.wire.codecs.base.in_two_lanes`): the entropy coders' calls are compiled code that
    runs without the GIL, so both cores decode with no Python between. The first bad layer in order
    is refused (a payload found malformed once the layers before it have decoded)."""
    calls: list[Callable[[], torch.Tensor]] = []
    malformed: CorruptMessage | None = None
    entries = [entry for entry, _ in frames]
    while frames:
        entry, payload = frames.popleft()
        shape = (heads, entry.tokens, head_dim)
        if entry.tokens == 0:  # left out (the header checked it has no payload)
            calls += [functools.partial(torch.zeros, shape)] * 2
            continue
        try:
            with _payload_errors(entry):
                pair = codec.decoders(payload_tensors(payload), shape, entry.index, len(entries))
        except CorruptMessage as err:
            malformed = err
            break
        calls += [functools.partial(_run_call, codec, call, entry, shape) for call in pair]
    largest = max((entry.tokens for entry in entries), default=0)  # small layers stay on one lane
    tensors = in_two_lanes(calls, heads * largest * head_dim)
    if malformed is not None:
        raise malformed
    return [LayerKV(entry.index, entry.full, tensors[2 * i], tensors[2 * i + 1]) for i, entry in enumerate(entries)]


def _run_call(codec: Codec, call: Callable[[], torch.Tensor], entry: LayerEntry,
              shape: tuple[int, int, int]) -> torch.Tensor:
    """One of a codec's decoding calls, its errors the reader's, its tensor checked."""
    with _payload_errors(entry):
        tensor = call()
    return _checked(codec, entry, tensor, shape)


@contextmanager
def _payload_errors(entry: LayerEntry) -> Iterator[None]:
    """A layer's payload that does not decode raises :class:`CorruptMessage` naming the layer."""
    try:
        yield
    except WireError:  # e.g. a codebook this machine lacks: say so, not "corrupt"
        raise
    except (SafetensorError, KeyError, ValueError, RuntimeError, TypeError, IndexError) as err:
        raise CorruptMessage(f"layer {entry.index}: payload does not decode ({type(err).__name__}: {err})") from None
    except Exception as err:  # a codec library's own error type (zstd, constriction): still corrupt input
        raise CorruptMessage(f"layer {entry.index}: payload does not decode ({type(err).__name__})") from None


def _checked(codec: Codec, entry: LayerEntry, tensor: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """A layer's decoded keys or values, once they have ``shape`` and are finite."""
    if tuple(tensor.shape) != shape:
        raise CorruptMessage(f"layer {entry.index}: decoded shape {tuple(tensor.shape)}, expected {shape}")
    if not codec.finite(tensor):
        raise CorruptMessage(f"layer {entry.index}: decoded keys or values are not finite")
    return tensor


def _decode_hidden(codec: Codec, payload: bytes, shape: tuple[int, int], layer: int, num_layers: int) -> torch.Tensor:
    """A hidden-state frame: ``shape`` (tokens, width) finite float32 values."""
    try:
        hidden = codec.decode_hidden(payload_tensors(payload), shape, layer, num_layers)
    except WireError:
        raise
    except Exception as err:  # malformed tensors or a codec library's own error: corrupt input
        raise CorruptMessage(f"the hidden state entering layer {layer} does not decode ({type(err).__name__})") \
            from None
    if tuple(hidden.shape) != shape or not all_finite(hidden):
        raise CorruptMessage(f"the hidden state entering layer {layer} is not {shape} finite values")
    return hidden


def _decode_ids(payload: bytes, tokens: int) -> torch.Tensor:
    """The token ids frame: ``tokens`` non-negative int32 values (as int64)."""
    try:
        ids = payload_tensors(payload)["ids"]
    except (SafetensorError, KeyError, ValueError) as err:
        raise CorruptMessage(f"the token ids frame does not decode ({type(err).__name__})") from None
    if ids.dtype != torch.int32 or tuple(ids.shape) != (tokens,) or (tokens and int(ids.min()) < 0):
        raise CorruptMessage(f"the token ids frame must hold {tokens} non-negative int32 ids")
    return ids.to(torch.int64)
