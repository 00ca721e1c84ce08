"""The link to an agent, as measured by the KV messages a client fetches from it.

The receiving end is where a link can be measured: a sender's writes complete as soon as the
kernel's buffers and the link's queue take them, megabytes before they arrive (a sender timing
its own sends over a 100 Mbit/s link measured 22 Gbit/s). A :class:`~kvcomm.serve.Client` times
every message of at least :data:`MIN_BYTES` it fetches, from the request to the last byte; its
estimate is the median of the last :data:`SAMPLES` transfers, rounded to two significant figures
(so that contexts chosen for the same link share their content address). With codec ``auto`` and
no bandwidth given, the client declares that estimate to the agent as measured.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque

from kvcomm.wire.codecs.auto import two_figures

MIN_BYTES = 1 << 20  # smaller transfers say more about latency than about bandwidth
SAMPLES = 5


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

    @property
    def mbit(self) -> float | None:
        """Mbit/s: the median of the last transfers, to two figures; None before any."""
        with self._lock:
            return min(two_figures(statistics.median(self._rates)), 1e6) if self._rates else None
