"""The link to an agent, as measured by the KV messages a client fetches from it.

The receiving end is where a link can be measured: a sender's writes complete as soon as the
kernel's buffers and the link's queue take them, megabytes before they arrive (a sender timing
its own sends over a 100 Mbit/s link measured 22 Gbit/s). A :class:`~kvcomm.serve.Client` times
every message of at least :data:`MIN_BYTES` it fetches, from its body's first chunk to its last
(the bytes after the first: what came before the first chunk, the round trip and the agent's own
work, is latency, not bandwidth; a fast link behind a slow store lookup measured 81 Mbit/s where it
carried the body at 30 Gbit/s); its estimate is the median of the last :data:`SAMPLES` transfers,
rounded to two significant figures (so that contexts chosen for the same link share their content
address). With codec ``auto`` and no bandwidth given, the client declares that estimate to the
agent as measured.

A message received while it arrives (``Client.arriving``, ``receive_message``) is read by a
thread that hands its chunks to the decoder through a bounded queue (:mod:`kvcomm.wire.streaming`).
Where the decoder is slower than the link the queue fills, the reader waits for room, TCP's flow
control holds the sender back, and the transfer's time is the decoder's, not the link's. Timing
only the reads would not help: while the reader waits the kernel's buffer fills at the link's
rate, and the reads after it are served from memory (34 MB over a 400 Mbit/s link, taken at
90 Mbit/s: the reads alone said 636 Mbit/s, more the longer the message). Such a transfer shows
only that the link is faster than the decoder, so :meth:`LinkMeter.timed` does not record it: a
streamed transfer is recorded when its reader spent at most :data:`HELD_BACK` of the time waiting
to hand chunks on; the link then was the slower, and the time measures it to within about that
fraction. A receiver whose decoding is always the slower measures nothing this way (a whole read,
``Client.get_message``, does).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator

from kvcomm.wire.codecs.auto import two_figures

MIN_BYTES = 1 << 20  # smaller transfers say more about latency than about bandwidth
SAMPLES = 5
HELD_BACK = 0.1  # a streamed transfer whose reader waited longer on its consumer measured the consumer


class LinkMeter:
    """A link's bandwidth from timed transfers (thread-safe: streamed bodies are timed on the
    thread that pulls them)."""

    def __init__(self, min_bytes: int | None = None, samples: int = SAMPLES) -> None:
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self._rates: deque[float] = deque(maxlen=samples)
        self._lock = threading.Lock()

    def record(self, size: int, seconds: float) -> None:
        """One transfer of ``size`` bytes that took ``seconds`` (too small or instantaneous: ignored)."""
        if size >= self.min_bytes and seconds > 0:
            with self._lock:
                self._rates.append(size * 8 / seconds / 1e6)

    def timed(self, chunks: Iterable[bytes], streamed: bool = True) -> Iterator[bytes]:
        """``chunks`` (a body being read), passed on as they come; once the last is in, the
        transfer of the bytes after the first chunk, from its arrival, is recorded, unless whoever
        takes the chunks (a decoder: ``streamed``) held the reading back for more than
        :data:`HELD_BACK` of it (then it measured the consumer, not the link: see the module's
        description). A whole read (not ``streamed``) only gathers the chunks: it is recorded."""
        size, held, began = 0, 0.0, None
        for chunk in chunks:
            if began is None:
                began = time.perf_counter()  # the first chunk is in: the link's latency is behind
            else:
                size += len(chunk)
            handed = time.perf_counter()
            yield chunk
            held += time.perf_counter() - handed
        if began is not None:
            seconds = time.perf_counter() - began
            if not streamed or held <= HELD_BACK * seconds:
                self.record(size, seconds)

    @property
    def mbit(self) -> float | None:
        """Mbit/s: the median of the last transfers, to two figures; None before any."""
        with self._lock:
            return min(two_figures(statistics.median(self._rates)), 1e6) if self._rates else None
