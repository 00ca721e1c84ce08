"""Receiving a message while it arrives: decode layer i while layer i+1 is still on the wire, and
use layer i while layer i+1 is decoded.

A message is framed layer by layer (``message.py``), so a reader can decode a layer as soon as
its frame is complete. Reading and decoding in one thread would still serialise them: while the
decoder works nobody reads the socket, and once the kernel's receive buffer fills the sender
stalls. :class:`ChunkStream` therefore pulls the body's chunks on a background thread into a
bounded queue, and an :class:`Arrival` decodes frames from it on a second one: the link and the
decoder work at the same time, and the time to the whole message is about the larger of the two
instead of their sum.

An :class:`Arrival` hands out its header at once, each layer as soon as it is decoded, and the
whole message once every check (the final digest too) has passed. Its
:meth:`~Arrival.receiver_input` lets a receiver's prefill run layer by layer behind the arriving
KV (:mod:`kvcomm.protocol.arriving`); the model's last layer is handed out only after the digest
has passed, so no logit exists before the message has been checked in full. :func:`receive`
waits for the whole message.
"""

from __future__ import annotations

import io
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from kvcomm.errors import CorruptMessage, ProtocolError, WireError
from kvcomm.models.fingerprint import Fingerprint
from kvcomm.protocol.arriving import arriving_input
from kvcomm.protocol.padded import PADDED_MODES
from kvcomm.protocol.receiver import ReceiverInput, receiver_input
from kvcomm.protocol.shared import received_positions
from kvcomm.wire.fingerprint import check_fingerprint
from kvcomm.wire.header import Header
from kvcomm.wire.message import DEFAULT_MAX_BYTES, DEFAULT_MAX_DECODED, KVMessage, LayerKV, MessageReader

_END = object()


class StreamClosed(WireError):
    """Receiving was stopped (:meth:`ChunkStream.close`, :meth:`Arrival.close`) before the message was whole."""

    def __init__(self) -> None:
        super().__init__("receiving was stopped before the message was whole")


class ChunkStream(io.RawIOBase):
    """A readable stream over ``chunks``, which a background thread pulls ahead of the reader
    (at most ``ahead`` chunks: memory stays bounded). An error while pulling is raised to the
    reader at the point the data ran out. :meth:`close` never waits for the source: a puller
    blocked in it stops at its next chunk, and a reader gets :class:`StreamClosed`."""

    def __init__(self, chunks: Iterable[bytes], ahead: int = 256) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=ahead)
        self._pending = memoryview(b"")
        self._done = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pull, args=(iter(chunks),), daemon=True,
                                        name="kvcomm-receive")
        self._thread.start()

    def _pull(self, chunks: Iterator[bytes]) -> None:
        try:
            for chunk in chunks:
                if chunk and not self._put(chunk):
                    return
            self._put(_END)
        except BaseException as err:  # handed to the reader, which raises it
            self._put(err)

    def _put(self, item: object) -> bool:
        """Queues ``item`` unless the stream was closed (then False, and nothing is queued)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending and not self._done:
            if self._stop.is_set():
                raise StreamClosed()
            item = self._queue.get()
            if item is _END:
                self._done = True
            elif isinstance(item, BaseException):
                self._done = True
                raise item
            else:
                self._pending = memoryview(item)  # type: ignore[arg-type]
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def close(self) -> None:
        """Stops the puller and wakes a reader waiting for data (it gets :class:`StreamClosed`)."""
        self._stop.set()
        while True:  # drop what was queued, then leave the reader one StreamClosed
            try:
                self._queue.get_nowait()
                continue
            except queue.Empty:
                pass
            try:
                self._queue.put_nowait(StreamClosed())
                break
            except queue.Full:  # the puller's last put landed in between
                continue
        super().close()


@dataclass
class Timeline:
    """When each layer of a received message was decoded (seconds from the start of reading)."""

    header: float = 0.0
    layers: list[float] = field(default_factory=list)
    done: float = 0.0


class Arrival:
    """A message being received from ``chunks`` (e.g. an HTTP body): its :attr:`header` once
    constructed, each :meth:`layer` as soon as it is decoded, the whole :meth:`message` once every
    check has passed. Decoding runs on a background thread from construction on.

    The header is read and checked (fingerprint against ``receiver``, sizes against the limits) in
    the constructor, which raises what :class:`MessageReader` raises. A failure later (a corrupt
    frame, a bad digest, the link) is raised by every :meth:`layer` and :meth:`message` call that
    waits past it. Use it as a context manager (or :meth:`close` it): that stops the threads.
    """

    def __init__(self, chunks: Iterable[bytes], receiver: Fingerprint | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_decoded_bytes: int = DEFAULT_MAX_DECODED,
                 timeline: Timeline | None = None, admit: Callable[[Header], None] | None = None) -> None:
        self._began = time.perf_counter()
        self._timeline = timeline
        self._stream = ChunkStream(chunks)
        self._buffered = io.BufferedReader(self._stream, buffer_size=1 << 16)
        try:
            self._reader = MessageReader(self._buffered, max_bytes, receiver, max_decoded_bytes, admit)
        except BaseException:
            self._stream.close()
            raise
        self.header: Header = self._reader.header
        self._checked = receiver is not None  # the reader checked the fingerprint
        if timeline is not None:
            timeline.header = time.perf_counter() - self._began
        self._layers: list[LayerKV] = []
        self._message: KVMessage | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._decode, daemon=True, name="kvcomm-decode")
        self._thread.start()

    def _decode(self) -> None:
        try:
            for layer in self._reader.layers():
                if self._timeline is not None:
                    self._timeline.layers.append(time.perf_counter() - self._began)
                with self._changed:
                    self._layers.append(layer)
                    self._changed.notify_all()
            if self._buffered.read(1):
                raise CorruptMessage("trailing bytes after the end of the message")
            self._finish(message=KVMessage.from_reader(self._reader, self._layers))
        except BaseException as err:  # handed to whoever waits, at once (the source may stall)
            self._finish(error=StreamClosed() if self._closed else err)
        finally:
            self._stream.close()

    def _finish(self, message: KVMessage | None = None, error: BaseException | None = None) -> None:
        if self._timeline is not None:  # before anyone waiting on the message can read it
            self._timeline.done = time.perf_counter() - self._began
        with self._changed:
            self._message, self._error = message, error
            self._changed.notify_all()

    def layer(self, index: int) -> LayerKV:
        """Layer ``index``, decoded and past its own checks (waits for it)."""
        if not 0 <= index < len(self.header.layers):
            raise IndexError(f"layer {index} of a {len(self.header.layers)}-layer message")
        with self._changed:
            self._changed.wait_for(lambda: len(self._layers) > index or self._error is not None)
            if len(self._layers) > index:
                return self._layers[index]
            assert self._error is not None
            raise self._error

    def message(self) -> KVMessage:
        """The whole message, once every check has passed (waits for it)."""
        with self._changed:
            self._changed.wait_for(lambda: self._message is not None or self._error is not None)
            if self._error is not None:
                raise self._error
            assert self._message is not None
            return self._message

    def receiver_input(self, dtype: torch.dtype = torch.float32, receiver: Fingerprint | None = None) -> ReceiverInput:
        """A receiver's starting point whose layers fill in as they arrive: a forward on it runs
        layer l as soon as layer l is in, and its last layer waits for the final digest.

        The model must be the one the message was made for (``receiver``, here or when the
        arrival was made): only a model with the message's layer count reaches the last layer, the
        one that waits for the digest.

        Messages in a ``padded-*`` mode, and DroidSpeak messages (layers left out), are waited
        for whole and built as :func:`~kvcomm.protocol.receiver_input` builds them (and refused
        as it refuses them).

        Raises:
            FingerprintMismatch: ``receiver`` is not the model the message was made for.
            ProtocolError: no receiver fingerprint was given, here or to the constructor.
        """
        h = self.header
        if receiver is not None:
            check_fingerprint(h.fingerprint, receiver)
        elif not self._checked:
            raise ProtocolError("a receiver that prefills while the message arrives must check its fingerprint "
                                "first: pass receiver= (the receiving model's fingerprint)")
        if h.mode in PADDED_MODES or any(entry.tokens == 0 for entry in h.layers):
            return receiver_input(self.message().to_shared(dtype))
        last = len(h.layers) - 1

        def fetch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
            layer = self.layer(index)
            if index == last:
                self.message()  # the digest, before anything the last layer computes
            return layer.keys[None].to(dtype), layer.values[None].to(dtype)

        positions = [received_positions(entry.full, entry.tokens, h.context_len, h.sink_position)
                     for entry in h.layers]
        return arriving_input(fetch, positions, h.context_len, h.mode, torch.empty((), dtype=dtype).element_size(),
                              h.heads, h.head_dim)

    def close(self) -> None:
        """Stops receiving (a message not yet whole is abandoned: waiting calls get
        :class:`StreamClosed`) and waits for the decoder, which stops at its next read."""
        self._closed = True
        self._stream.close()
        self._thread.join()

    def __enter__(self) -> Arrival:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def receive(chunks: Iterable[bytes], receiver: Fingerprint | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
            max_decoded_bytes: int = DEFAULT_MAX_DECODED, timeline: Timeline | None = None,
            admit: Callable[[Header], None] | None = None) -> KVMessage:
    """A message from a stream of chunks (e.g. an HTTP body), decoded layer by layer as the
    chunks arrive; checked as :meth:`KVMessage.from_bytes` checks a whole one.

    Raises:
        WireError: as :class:`MessageReader` (and ``CorruptMessage`` for bytes after the end).
    """
    with Arrival(chunks, receiver, max_bytes, max_decoded_bytes, timeline, admit) as arrival:
        return arrival.message()
