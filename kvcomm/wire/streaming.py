"""Receiving a message while it arrives: decode layer i while layer i+1 is still on the wire.

A message is framed layer by layer (``message.py``), so a reader can decode a layer as soon as
its frame is complete. Reading and decoding in one thread would still serialise them: while the
decoder works nobody reads the socket, and once the kernel's receive buffer fills the sender
stalls. :class:`ChunkStream` therefore pulls the body's chunks on a background thread into a
bounded queue, and :func:`receive` decodes frames from it on the caller's thread: the link and
the decoder work at the same time, and the time to the whole message is about the larger of the
two instead of their sum. :func:`receive` returns only once every check (the final digest too)
has passed.
"""

from __future__ import annotations

import io
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from kvcomm.errors import CorruptMessage
from kvcomm.models.fingerprint import Fingerprint
from kvcomm.wire.message import DEFAULT_MAX_BYTES, DEFAULT_MAX_DECODED, KVMessage, MessageReader

_END = object()


class ChunkStream(io.RawIOBase):
    """A readable stream over ``chunks``, which a background thread pulls ahead of the reader
    (at most ``ahead`` chunks: memory stays bounded). An error while pulling is raised to the
    reader at the point the data ran out."""

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
                if self._stop.is_set():
                    return
                if chunk:
                    self._queue.put(chunk)
            self._queue.put(_END)
        except BaseException as err:  # handed to the reader, which raises it
            self._queue.put(err)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending and not self._done:
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
        self._stop.set()
        while self._thread.is_alive():  # unblock a puller waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.05)
        super().close()


@dataclass
class Timeline:
    """When each layer of a received message was decoded (seconds from the start of reading)."""

    header: float = 0.0
    layers: list[float] = field(default_factory=list)
    done: float = 0.0


def receive(chunks: Iterable[bytes], receiver: Fingerprint | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
            max_decoded_bytes: int = DEFAULT_MAX_DECODED, timeline: Timeline | None = None) -> KVMessage:
    """A message from a stream of chunks (e.g. an HTTP body), decoded layer by layer as the
    chunks arrive; checked as :meth:`KVMessage.from_bytes` checks a whole one.

    Raises:
        WireError: as :class:`MessageReader` (and ``CorruptMessage`` for bytes after the end).
    """
    began = time.perf_counter()
    stream = ChunkStream(chunks)
    buffered = io.BufferedReader(stream, buffer_size=1 << 16)
    try:
        reader = MessageReader(buffered, max_bytes, receiver, max_decoded_bytes)
        if timeline is not None:
            timeline.header = time.perf_counter() - began
        layers = []
        for layer in reader.layers():
            layers.append(layer)
            if timeline is not None:
                timeline.layers.append(time.perf_counter() - began)
        if buffered.read(1):
            raise CorruptMessage("trailing bytes after the end of the message")
        message = KVMessage.from_reader(reader, layers)
    finally:
        stream.close()
    if timeline is not None:
        timeline.done = time.perf_counter() - began
    return message
