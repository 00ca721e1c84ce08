"""Drift between two models of one shape: where a variant pair diverges, before any answer.

Both models prefill the same contexts (a task's sender messages); per layer, the relative L2
difference ``||A - B|| / ||A||`` of their keys, values and hidden states (after the layer) is
summed over every token of every item except each context's first (the attention sink, whose
outsized activations would swamp the rest). Small drift at a layer means the receiver can read
the sender's KV there as its own; DroidSpeak recomputes where it is large.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import ConfigDict
from tqdm.auto import tqdm

from kvcomm.agents import Agents
from kvcomm.errors import DataError
from kvcomm.eval.batch import Batch
from kvcomm.files import JsonFile
from kvcomm.protocol import prefill
from kvcomm.tasks.base import Item, Task


class Drift(JsonFile):
    """Per layer, the relative difference of model ``b`` from model ``a`` (JSON)."""

    model_config = ConfigDict(extra="forbid")
    what: ClassVar[str] = "drift"

    a: str
    b: str
    task: str
    items: int
    tokens: int  # tokens compared (the sinks left out)
    keys: list[float]
    values: list[float]
    hidden: list[float]  # after each layer (the state entering the next)
    weights: list[str] | None = None  # a's and b's weights digests (None: written before they were recorded)
    task_options: dict[str, Any] | None = None  # the task's item options (None: as above)
    provenance: dict[str, Any] | None = None  # the command, date, code and dtype that made it (kvcomm drift)


@torch.inference_mode()
def measure_drift(agents: Agents, task: Task, items: Sequence[Item], batch_size: int = 8,
                  progress: bool = True) -> Drift:
    """The drift of ``agents.receiver`` from ``agents.sender`` on ``items``' contexts.

    Raises:
        DataError: no items.
    """
    if not items:
        raise DataError("measuring drift needs at least one item")
    layers = agents.num_layers
    diff = torch.zeros(3, layers, dtype=torch.float64)
    norm = torch.zeros(3, layers, dtype=torch.float64)
    tokens = 0
    for first in tqdm(range(0, len(items), batch_size), desc="drift", disable=not progress):
        batch = Batch(agents, task, list(items[first:first + batch_size]))
        prompt = batch.prompt("sender", task.sender_message)
        a = prefill(agents.sender.model, prompt.input_ids, prompt.valid, range(1, layers + 1))
        b = prefill(agents.receiver.model, prompt.input_ids, prompt.valid, range(1, layers + 1))
        counted = prompt.valid & (prompt.valid.cumsum(dim=1) > 1)  # [B, C]: real tokens after the sink
        tokens += int(counted.sum())
        for layer in range(layers):
            pairs = ((a.keys[layer].transpose(1, 2), b.keys[layer].transpose(1, 2)),  # [B, C, H, D]
                     (a.values[layer].transpose(1, 2), b.values[layer].transpose(1, 2)),
                     (a.hidden[layer + 1], b.hidden[layer + 1]))
            for kind, (x, y) in enumerate(pairs):
                x, y = x[counted].double(), y[counted].double()
                diff[kind, layer] += (x - y).pow(2).sum()
                norm[kind, layer] += x.pow(2).sum()
    relative = (diff / norm.clamp(min=1e-30)).sqrt()
    return Drift(a=agents.sender.name, b=agents.receiver.name, task=task.name, items=len(items), tokens=tokens,
                 keys=relative[0].tolist(), values=relative[1].tolist(), hidden=relative[2].tolist(),
                 weights=[agents.sender.weights_digest, agents.receiver.weights_digest],
                 task_options=task.item_options or None)
