"""Calibration: measure per-layer attention importance on held-out items and save a profile."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from tqdm.auto import tqdm

from kvcomm.agents import Agents
from kvcomm.errors import DataError
from kvcomm.eval.batch import Batch
from kvcomm.files import atomic_write
from kvcomm.protocol import attention_importance
from kvcomm.selection.rules import DEFAULT_MU, DEFAULT_SIGMA, combined_scores, default_alpha, rank_layers
from kvcomm.tasks.base import Item, Task

PROFILE_VERSION = 1


class Profile(BaseModel):
    """A layer ranking and the measurements behind it (written as JSON, reusable by ``eval``)."""

    model_config = ConfigDict(extra="forbid")

    version: int = PROFILE_VERSION
    sender: str
    receiver: str
    task: str
    num_layers: int
    alpha: float
    mu: float
    sigma: float
    calibration_items: list[str]
    importance: list[float]
    scores: list[float]
    ranking: list[int]

    def save(self, path: str | Path) -> None:
        atomic_write(path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        try:
            return cls.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read profile {path}: {err}") from err


def calibrate(
    agents: Agents, task: Task, items: Sequence[Item], alpha: float | None = None,
    mu: float = DEFAULT_MU, sigma: float = DEFAULT_SIGMA, batch_size: int = 8, progress: bool = True,
) -> Profile:
    """Ranks layers by the receiver's prefill attention on the sender's context.

    The receiver's prompt is prefilled on top of all layers' sender KV; per item and layer the
    mass on context keys 1..|C|-1 (mean over heads and query tokens) is taken, then averaged over
    items, min-max normalised and mixed with the Gaussian prior. Nothing is generated.

    Args:
        alpha: weight of attention against the prior; default per model family (paper App. B.2).
    """
    if not items:
        raise DataError("calibration needs at least one item")
    alpha = default_alpha(agents.receiver.config.model_type) if alpha is None else alpha
    total = torch.zeros(agents.num_layers, dtype=torch.float64)
    for start in tqdm(range(0, len(items), batch_size), desc="calibrate", disable=not progress):
        batch = Batch(agents, task, list(items[start:start + batch_size]))
        prompt = batch.prompt("receiver", task.receiver_message)
        scores = attention_importance(agents.receiver.model, batch.sender_kv(), prompt.input_ids, prompt.valid)
        total += scores.double().sum(dim=0)
    importance = (total / len(items)).tolist()
    combined = combined_scores(importance, alpha, mu, sigma)
    return Profile(
        sender=agents.sender.name, receiver=agents.receiver.name, task=task.name,
        num_layers=agents.num_layers, alpha=alpha, mu=mu, sigma=sigma,
        calibration_items=[item.id for item in items], importance=importance,
        scores=combined.tolist(), ranking=rank_layers(combined.tolist()),
    )
