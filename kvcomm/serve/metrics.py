"""Prometheus metrics: HTTP metrics by route template, and the figures vLLM users graph.

HTTP requests and latencies come from ``prometheus-fastapi-instrumentator``, labelled by route
template (``/v1/messages/{message_id}``), so random paths cannot create new series. The service's
own figures follow vLLM's names with a ``kvcomm:`` prefix: requests running and waiting, prompt and
generation tokens, end-to-end latency, time to first token, and the store's size and hit rate.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_fastapi_instrumentator import Instrumentator

from kvcomm.serve.stores import MessageStore, Sized

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _StoreSize(Collector):
    """Messages and bytes a store holds, read when scraped (for stores that know: memory, disk)."""

    def __init__(self, store: MessageStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not isinstance(self.store, Sized):
            return
        count = GaugeMetricFamily("kvcomm:store_messages", "KV messages held by the store")
        size = GaugeMetricFamily("kvcomm:store_bytes", "Bytes of KV messages held by the store")
        try:
            count.add_metric([], self.store.count())
            size.add_metric([], self.store.size_bytes())
        except Exception:  # a store that cannot answer now reports nothing rather than failing the scrape
            return
        yield count
        yield size


class ServiceMetrics:
    """Every metric one agent exports, in its own registry."""

    def __init__(self, app: FastAPI, store: MessageStore) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        instrumentator = Instrumentator(should_group_status_codes=False, should_group_untemplated=True,
                                        excluded_handlers=["/metrics"], registry=r)
        instrumentator.instrument(app, latency_highr_buckets=LATENCY_BUCKETS)
        self.running = Gauge("kvcomm:num_requests_running", "Requests using the model now", registry=r)
        self.waiting = Gauge("kvcomm:num_requests_waiting", "Requests waiting for the model", registry=r)
        self.prompt_tokens = Counter("kvcomm:prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("kvcomm:generation_tokens", "Tokens generated", registry=r)
        self.e2e = Histogram("kvcomm:e2e_request_latency_seconds", "Chat request latency, end to end",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("kvcomm:time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.per_token = Histogram("kvcomm:time_per_output_token_seconds", "Latency per generated token",
                                   buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r)
        self.kv_received = Counter("kvcomm:kv_bytes_received", "KV message bytes used by requests", registry=r)
        self.kv_sent = Counter("kvcomm:kv_bytes_sent", "KV message bytes served", registry=r)
        self.contexts = Counter("kvcomm:contexts", "Contexts stored, by whether a prefill was spent",
                                ["prefill"], registry=r)
        self.codec_chosen = Counter("kvcomm:codec_chosen", "Messages encoded by codec 'auto', by the codec chosen",
                                    ["codec"], registry=r)
        self.lookups = Counter("kvcomm:store_lookups", "Message store lookups by result (hit rate)", ["result"],
                               registry=r)
        self.cancelled = Counter("kvcomm:requests_cancelled", "Requests stopped early, by reason", ["reason"],
                                 registry=r)
        self.stream_errors = Counter("kvcomm:stream_errors", "Streamed chats that ended in an error event after "
                                     "their 200 (recorded as 200 by the HTTP metrics), by error code", ["code"],
                                     registry=r)
        r.register(_StoreSize(store))
