"""What the KV messages of every request in flight may decode to, together.

``max_decoded_bytes`` bounds one request; requests waiting for the model hold what they decoded
while they wait, so without a bound on all of them together a queue of chats multiplies it (12
chats of 56 MiB each held 794 MiB at once). A :class:`DecodedBudget` is that bound: a request
takes each message's share from its header, before anything is decoded, and gives it all back
when it ends (:meth:`Hold.release`, also when the request object is dropped unreleased, e.g. a
stream that never started). One that does not fit is refused with 503 and ``Retry-After``:
nothing of it was decoded, and it can be sent again once others have ended.
"""

from __future__ import annotations

import threading
import weakref

from kvcomm.serve.errors import ServiceRefusal
from kvcomm.serve.retry import busy_headers


class DecodedBudget:
    """At most ``total`` decoded bytes held by all requests at once."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0
        # re-entrant: a share tied to a dropped request is given back inside garbage collection,
        # which may run on a thread that holds this lock already (allocating in _take)
        self._lock = threading.RLock()

    def hold(self) -> Hold:
        """An empty share for one request (take into it as its messages' headers come)."""
        return Hold(self)

    def _take(self, size: int) -> None:
        with self._lock:
            held = self.held
            fits = held + size <= self.total
            if fits:
                self.held += size
        if not fits:  # the refusal is made outside the lock
            raise ServiceRefusal(
                503, f"the requests in flight hold {held:,} decoded bytes of KV and this one needs {size:,} "
                     f"more; the service holds at most {self.total:,} at once: retry when others have ended",
                "decoded_budget_busy", "kv_messages", headers=busy_headers())

    def _give(self, size: int) -> None:
        with self._lock:
            self.held -= size


class Hold:
    """One request's share of a :class:`DecodedBudget`."""

    def __init__(self, budget: DecodedBudget) -> None:
        self._budget = budget
        self.size = 0
        self._released = False
        self._lock = threading.Lock()

    def take(self, size: int) -> None:
        """Adds ``size`` bytes to this share.

        Raises:
            ServiceRefusal: 503 (``decoded_budget_busy``) when the budget has not that much left.
        """
        with self._lock:
            if self._released:
                raise RuntimeError("this share of the decoded budget was given back already")
            self._budget._take(size)
            self.size += size

    def release(self) -> None:
        """Gives the whole share back (once; later calls do nothing)."""
        with self._lock:
            if not self._released:
                self._released = True
                self._budget._give(self.size)

    def tie(self, owner: object) -> None:
        """Releases this share when ``owner`` is garbage (if nothing released it before)."""
        weakref.finalize(owner, self.release)
