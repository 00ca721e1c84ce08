"""Whether the store's backend answers, known without ever blocking the event loop on it.

A probe (``ping``, for stores that have one) runs in a thread; ``/healthz`` waits for it at most a
few milliseconds and otherwise reports the last probe's answer, until the running probe has taken
:data:`SLOW_S`: then the store is reported as not answering, so a paused Redis makes the agent
*degraded*, never unresponsive, and a store that answers in 100 ms is not. Results are kept for a
second.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anyio

from kvcomm.serve.stores import MessageStore, Pingable, StoreError, StoreUnavailable, store_kind_of

UNAVAILABLE = "the message store is unavailable: "
SLOW_S = 2.0  # a probe running this long says the store is not answering (before: 50 ms, every poll)


class StoreHealth:
    """The last known state of one store, refreshed by at most one probe at a time."""

    def __init__(self, store: MessageStore, fresh_s: float = 1.0) -> None:
        self.store, self.fresh_s = store, fresh_s
        self._state: dict[str, Any] = {"kind": store_kind_of(store), "ok": True, "error": None}
        self._checked = self._failed = -float("inf")
        self._probe: asyncio.Task[None] | None = None
        self._probe_started = -float("inf")

    async def _run_probe(self) -> None:
        assert isinstance(self.store, Pingable)
        try:
            await anyio.to_thread.run_sync(self.store.ping)
            self._state = {**self._state, "ok": True, "error": None}
        except StoreError as err:
            self._state = {**self._state, "ok": False, "error": str(err)}
        self._checked = time.monotonic()

    def record_failure(self, error: str) -> None:
        """A route found the store down: report it until the next probe says otherwise (a store
        that cannot be probed: for ``fresh_s``, then the next request tries it again)."""
        self._state = {**self._state, "ok": False, "error": error.removeprefix(UNAVAILABLE)}
        self._failed = time.monotonic()
        self._checked = -float("inf")  # the next /healthz probes again (recovery is seen at once)

    async def state(self, wait_s: float = 0.05) -> dict[str, Any]:
        """The store's state, waiting at most ``wait_s`` for a probe to answer."""
        if not isinstance(self.store, Pingable):
            if not self._state["ok"] and time.monotonic() - self._failed >= self.fresh_s:
                self._state = {**self._state, "ok": True, "error": None}  # no probe: a failure is not for ever
            return self._state
        if time.monotonic() - self._checked < self.fresh_s:
            return self._state
        if self._probe is None or self._probe.done():
            self._probe, self._probe_started = asyncio.create_task(self._run_probe()), time.monotonic()
        done, _ = await asyncio.wait({self._probe}, timeout=wait_s)
        if not done:
            running = time.monotonic() - self._probe_started
            if running < SLOW_S:  # a slow answer is not yet no answer: what the last probe said
                return self._state
            return {**self._state, "ok": False, "error": f"the store did not answer within {running:.1f} s"}
        return self._state

    async def require(self, wait_s: float = 3.0) -> None:
        """Raises :class:`StoreUnavailable` unless the store answers within ``wait_s``."""
        state = await self.state(wait_s)
        if not state["ok"]:
            raise StoreUnavailable(f"{UNAVAILABLE}{state['error']}")
