"""Each peer's link, as measured by the KV messages this agent sends it.

A message of at least :data:`MIN_BYTES` that a peer GETs is sent in chunks and timed from the
first chunk handed to the server to the last; the kernel's send buffer hides only its own size,
small next to a message of megabytes. A peer's estimate is the median of its last
:data:`SAMPLES` transfers, rounded to two significant figures (so that contexts chosen for the
same link share their content address). Codec ``auto`` chooses for it when a request from that
peer declares no bandwidth; ``GET /metrics`` exports it as ``kvcomm:peer_bandwidth_mbit``.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from math import floor, log10

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

MIN_BYTES = 1 << 20  # smaller transfers say more about latency and buffers than about bandwidth
CHUNK = 1 << 18
SAMPLES = 5
MAX_PEERS = 256  # the least recently measured peer is forgotten first


def two_figures(value: float) -> float:
    """``value`` rounded to two significant figures (94.37 → 94, 1234 → 1200)."""
    return round(value, 1 - floor(log10(abs(value)))) if value else 0.0


class LinkMeter:
    """Measured bandwidth per peer (thread-safe; bounded to :data:`MAX_PEERS` peers)."""

    def __init__(self, min_bytes: int | None = None, samples: int = SAMPLES, max_peers: int = MAX_PEERS) -> None:
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self.samples, self.max_peers = samples, max_peers
        self._peers: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, peer: str, size: int, seconds: float) -> None:
        """One transfer of ``size`` bytes to ``peer`` that took ``seconds`` (too small or too fast: ignored)."""
        if size < self.min_bytes or seconds <= 0:
            return
        with self._lock:
            rates = self._peers.pop(peer, None) or deque(maxlen=self.samples)
            rates.append(size * 8 / seconds / 1e6)
            self._peers[peer] = rates
            while len(self._peers) > self.max_peers:
                self._peers.popitem(last=False)

    def mbit(self, peer: str | None) -> float | None:
        """``peer``'s bandwidth in Mbit/s (median of its last transfers, two figures), None if unmeasured."""
        with self._lock:
            rates = self._peers.get(peer) if peer is not None else None
            return None if not rates else min(two_figures(statistics.median(rates)), 1e6)

    def peers(self) -> dict[str, float]:
        with self._lock:
            names = list(self._peers)
        return {peer: rate for peer in names if (rate := self.mbit(peer)) is not None}

    async def send(self, peer: str, data: bytes) -> AsyncIterator[bytes]:
        """``data`` in chunks for a streaming response, recording the transfer once the last chunk
        has gone (a transfer the peer broke off is not recorded)."""
        view = memoryview(data)
        began = time.perf_counter()
        for start in range(0, len(data), CHUNK):
            yield bytes(view[start:start + CHUNK])
        self.record(peer, len(data), time.perf_counter() - began)


class PeerBandwidth(Collector):
    """``kvcomm:peer_bandwidth_mbit{peer}`` from a :class:`LinkMeter`, read at each scrape."""

    def __init__(self, meter: LinkMeter) -> None:
        self.meter = meter

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("kvcomm:peer_bandwidth_mbit",
                                  "Bandwidth measured to each peer by the KV messages sent to it (Mbit/s)",
                                  labels=["peer"])
        for peer, rate in self.meter.peers().items():
            gauge.add_metric([peer], rate)
        yield gauge
