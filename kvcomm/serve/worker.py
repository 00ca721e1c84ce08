"""The one model of an agent, used by one request at a time, and the ways a request's work stops.

Requests queue on a lock and run in a worker thread, so concurrent requests never mix and the
event loop stays free. Each request carries a :class:`Job`: a deadline (waiting for the model,
prefill and decoding all count) and a cancellation flag set when the client goes away. The model
thread checks the job between prefill chunks and decoding steps, so abandoned or overdue work
stops within one step and the next request does not wait for it; work abandoned while still
queued never starts.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import anyio
from starlette.requests import Request

from kvcomm.serve.errors import ServiceRefusal
from kvcomm.serve.metrics import ServiceMetrics

T = TypeVar("T")


class Stopped(Exception):
    """A job stopped before finishing; ``reason`` is ``deadline`` or ``disconnected``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Job:
    """One request's claim on the model: a deadline and a cancellation flag."""

    timeout_s: float
    started: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def deadline(self) -> float:
        return self.started + self.timeout_s

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def check(self) -> None:
        """Raises :class:`Stopped` if the client went away or the deadline passed."""
        if self.cancelled.is_set():
            raise Stopped("disconnected")
        if time.monotonic() > self.deadline:
            raise Stopped("deadline")


class ModelWorker:
    """Runs model work one job at a time in a thread, counting running and waiting requests."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._model = threading.Lock()  # the model itself, whichever loop's request holds it
        self.metrics = metrics

    def _model_lock(self) -> asyncio.Lock:
        """The lock a request of the running event loop queues on (an asyncio lock binds to the first
        loop that waits on it: the same app served again on a new loop, as a second TestClient or a
        restarted server does, failed its concurrent requests). Two loops at once each queue on
        their own; the model thread's own lock keeps their work apart."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._lock, self._loop = asyncio.Lock(), loop
        return self._lock

    async def run_watched(self, request: Request, job: Job, work: Callable[[Job], T]) -> T:
        """:meth:`run`, stopped at the model thread's next check when the client of ``request`` goes away."""
        watcher = asyncio.create_task(watch_disconnect(request, job))
        try:
            return await self.run(job, work)
        finally:
            watcher.cancel()

    async def run(self, job: Job, work: Callable[[Job], T]) -> T:
        """``work(job)`` in the model thread, once the model is free.

        Raises:
            ServiceRefusal: 504 when the deadline passes (waiting or working), 499 when the client left.
        """
        self.metrics.waiting.inc()
        lock = self._model_lock()
        try:
            stopped = await _acquire(lock, job)
        finally:
            self.metrics.waiting.dec()
        if stopped is not None:
            self.metrics.cancelled.labels(stopped).inc()
            if stopped == "deadline":
                raise ServiceRefusal(504, f"no model time within {job.timeout_s:g} s", "timeout")
            raise ServiceRefusal(499, "the client closed the request", "client_closed_request")
        self.metrics.running.inc()
        try:
            job.check()  # abandoned while it waited: do not start
            # the thread is not abandoned when this coroutine is cancelled: the lock is held until
            # the work returns, and the job's flag makes it return at its next check
            return await anyio.to_thread.run_sync(self._alone, work, job)
        except Stopped as stop:
            self.metrics.cancelled.labels(stop.reason).inc()
            if stop.reason == "deadline":
                raise ServiceRefusal(504, f"request exceeded {job.timeout_s:g} s", "timeout") from None
            raise ServiceRefusal(499, "the client closed the request", "client_closed_request") from None
        finally:
            self.metrics.running.dec()
            lock.release()


    def _alone(self, work: Callable[[Job], T], job: Job) -> T:
        """``work(job)`` with the model to itself, also against another event loop's requests (model thread)."""
        with self._model:
            return work(job)


async def _acquire(lock: asyncio.Lock, job: Job, every_s: float = 0.05) -> str | None:
    """Waits for ``lock`` until ``job`` is cancelled or its deadline passes: None once it is held,
    else why it was given up (``disconnected``, ``deadline``; then it is not held). Before, a
    request whose client had left waited on in the queue, with its share of the decoded budget,
    until the model came to it."""
    acquiring = asyncio.ensure_future(lock.acquire())
    try:
        while not acquiring.done():
            if job.cancelled.is_set() or job.remaining() <= 0:
                break
            await asyncio.wait({acquiring}, timeout=min(every_s, job.remaining()))
    except asyncio.CancelledError:  # this request's own task was cancelled: the lock is not left held
        await _give_up(lock, acquiring)
        raise
    if acquiring.done() and not acquiring.cancelled():
        return None
    if await _give_up(lock, acquiring, keep=True):
        return None  # granted while it was being given up: held, so used
    return "disconnected" if job.cancelled.is_set() else "deadline"


async def _give_up(lock: asyncio.Lock, acquiring: asyncio.Future[Literal[True]], keep: bool = False) -> bool:
    """Stops waiting for ``lock``; whether it was granted meanwhile (then, unless ``keep``, released)."""
    acquiring.cancel()  # a future already granted stays granted: awaiting it then gives True
    try:
        await acquiring
    except asyncio.CancelledError:
        return False
    if not keep:
        lock.release()
    return True


async def watch_disconnect(request: Request, job: Job, every_s: float = 0.1) -> None:
    """Sets ``job.cancelled`` when the client of ``request`` disconnects (run as a task)."""
    while not job.cancelled.is_set():
        if await request.is_disconnected():
            job.cancelled.set()
            return
        await asyncio.sleep(every_s)
