"""The budget as an output: the smallest fraction of layers that keeps the answers.

Given a ranking, the calibration items are answered (greedy decoding, the task's metric) with the
top layers at each ratio of a grid and with all layers; the budget is the smallest ratio whose
score is within ``tolerance`` of all layers'. Each item's sender prefill is made once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from kvcomm.agents import Agents
from kvcomm.errors import ConfigError
from kvcomm.eval.batch import Batch
from kvcomm.protocol import greedy_generate, receiver_input, share
from kvcomm.selection.rules import layer_count, top_layers
from kvcomm.tasks.base import Item, Pieces, Task
from kvcomm.tasks.metrics import METRICS

GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def check_tolerance(tolerance: Any) -> None:
    """Refuses a budget's tolerance that is not a finite number >= 0 (``ConfigError``)."""
    if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"a budget's tolerance must be a finite number >= 0, not {tolerance!r}")


def smallest_ratio(agents: Agents, task: Task, items: Sequence[Item], ranking: Sequence[int], tolerance: float,
                   grid: Sequence[float] = GRID, batch_size: int = 8, pieces: Pieces = "chats") -> dict[str, Any]:
    """``{"ratio", "layers", "tolerance", "scores": {ratio: score}, "all_layers"}``: the fewest
    layers (of the ``grid`` ratios' counts) whose calibration score is at least all layers' minus
    ``tolerance`` (every layer if none is), each item read as ``pieces`` lays it out
    (:meth:`~kvcomm.eval.batch.Batch.reading`). ``ratio`` is four decimals that share exactly
    ``layers`` layers when given back as ``--ratio`` (the exact ``layers / L``, e.g. 3/28, printed
    to six figures, shared one layer more).

    Raises:
        ConfigError: ``tolerance`` is negative or not finite.
    """
    check_tolerance(tolerance)
    metric = METRICS[task.metric]
    ratios = sorted({layer_count(r, len(ranking)) / len(ranking) for r in grid} | {1.0})
    totals = dict.fromkeys(ratios, 0.0)
    receiver = agents.receiver
    for start in range(0, len(items), batch_size):
        batch = Batch(agents, task, list(items[start:start + batch_size]))
        read = batch.reading(1, pieces)
        for ratio in ratios:
            shared = share(receiver.model, read.kv, top_layers(ranking, ratio), opening=read.opening)
            answers = greedy_generate(receiver.model, receiver_input(shared), read.prompt.input_ids, read.prompt.valid,
                                      task.max_new_tokens, receiver.stop_ids, receiver.pad_id)
            totals[ratio] += sum(metric(receiver.decode(a), item.answers) for a, item in zip(answers, batch.items))
    scores = {ratio: total / len(items) for ratio, total in totals.items()}
    floor = scores[1.0] - tolerance
    chosen = next((ratio for ratio in ratios if scores[ratio] >= floor - 1e-12), 1.0)
    layers = layer_count(chosen, len(ranking))
    given_back = math.floor(layers / len(ranking) * 1e4) / 1e4  # layer_count(given_back) == layers
    return {"ratio": given_back, "layers": layers, "tolerance": tolerance,
            "scores": {f"{r:.3f}": s for r, s in scores.items()}, "all_layers": scores[1.0], "items": len(items)}
