"""When a refused request may be sent again: the agent says so, and the client believes only that.

An agent that refuses a request before doing any of it (its decoded-KV budget or its upload slots
are full) answers 503 with ``Retry-After`` *and* :data:`NOTHING_DONE_HEADER`. A 503 with
``Retry-After`` alone may come from a proxy in front of the agent after the agent did the work (a
gateway that timed out on a slow chat), so the client sends a request again only on the agent's
own word: its retries never make the agent do a chat or an upload twice.
"""

from __future__ import annotations

import httpx

NOTHING_DONE_HEADER = "KVComm-Nothing-Done"  # set by the agent on a refusal made before any work
RETRY_AFTER_S = 1  # what the agent asks a refused client to wait
RETRY_AFTER_MAX_S = 10.0  # the longest Retry-After the client waits for before sending a request again


def busy_headers() -> dict[str, str]:
    """The headers of an agent's refusal made before it did anything: wait, then send it again."""
    return {"Retry-After": str(RETRY_AFTER_S), NOTHING_DONE_HEADER: "1"}


def retry_after(response: httpx.Response) -> float | None:
    """The seconds to wait before sending a refused request again: a 503 that carries
    :data:`NOTHING_DONE_HEADER` and a ``Retry-After`` of at most :data:`RETRY_AFTER_MAX_S`
    seconds; None for any other answer (a date, a longer wait, a 503 from something that is not
    the agent)."""
    if response.status_code != 503 or response.headers.get(NOTHING_DONE_HEADER) != "1":
        return None
    given = response.headers.get("retry-after", "")
    if not (given.isascii() and given.isdigit()) or int(given) > RETRY_AFTER_MAX_S:  # not "²": no int
        return None
    return float(given)
