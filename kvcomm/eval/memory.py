"""Keeping evaluation inside a memory budget: measure resident memory, size batches to fit.

The estimate is deliberately simple and conservative: per item, the KV of every layer for the
longest prompt plus the answer (held twice: the sender's and the receiver's cache), one layer's
activations and attention scores at a time, and one row of logits.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator, Sequence

from kvcomm.agents import Agents
from kvcomm.tasks.base import Item, Task

GIB = 1 << 30


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024


def item_bytes(agents: Agents, tokens: int) -> int:
    """Estimated working memory of one item whose longest sequence has ``tokens`` tokens."""
    cfg = agents.receiver.config
    element = next(agents.receiver.model.parameters()).element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * tokens  # sender + receiver
    activations = tokens * (8 * cfg.hidden_size + 3 * cfg.intermediate_size)
    scores = 2 * cfg.num_attention_heads * tokens * tokens  # scores and probabilities of one layer
    return element * (kv + activations + scores + cfg.vocab_size)


def plan_batches(agents: Agents, task: Task, items: Sequence[Item], batch_size: int,
                 budget: int | None, rows_per_item: int = 1) -> Iterator[list[Item]]:
    """Consecutive batches of at most ``batch_size`` items, the largest that ``budget`` bytes hold
    where it would not hold that many (never below one item).

    Args:
        rows_per_item: receiver rows each item takes at once: configurations that answer a batch
            together (:meth:`~kvcomm.methods.base.Method.fuse_key`) run ``k`` rows per item.
    """
    start = 0
    while start < len(items):
        size = min(batch_size, len(items) - start)
        if budget is not None:
            model = agents.receiver
            tokens = [len(model.encode_message(task.skyline_message(i))) + task.max_new_tokens
                      for i in items[start:start + size]]
            while size > 1 and size * rows_per_item * item_bytes(agents, max(tokens[:size])) > budget:
                size -= 1
        yield list(items[start:start + size])
        start += size
