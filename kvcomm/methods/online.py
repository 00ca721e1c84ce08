"""Online calibration: the layer ranking is recomputed from the stream of items seen so far.

Items are answered in order. Every ``interval`` items the ranking is rebuilt from the attention
importance of all items answered so far; before the first rebuild only the depth prior ranks
layers. Each item's importance is measured once (an all-layer receiver prefill, no generation)
and each item is answered and scored once, with the ranking from the items *before* it (the
reference re-runs and double-scores its calibration item). :meth:`details` reports the rankings
and how much they drift between rebuilds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvcomm.agents import Batch, Prompt
from kvcomm.errors import ConfigError
from kvcomm.methods.base import METHODS, Output, Setup
from kvcomm.methods.kvcomm import KVCommMethod
from kvcomm.protocol import SenderKV, attention_importance, greedy_generate, receiver_input, share
from kvcomm.selection.rules import DEFAULT_MU, DEFAULT_SIGMA, combined_scores, default_alpha, rank_layers, top_layers


@METHODS.register("online")
class OnlineKVComm(KVCommMethod):
    """KVComm whose ranking is rebuilt every ``interval`` items from the items seen so far."""

    name = "online"

    def __init__(self, ratio: float | None = None, interval: int = 8, mode: str = "causal", seed: int = 42,
                 alpha: float | None = None, mu: float = DEFAULT_MU, sigma: float = DEFAULT_SIGMA) -> None:
        super().__init__(ratio=ratio, mode=mode, seed=seed)
        if interval < 1:
            raise ConfigError("interval must be at least 1")
        self.interval, self.alpha, self.mu, self.sigma = interval, alpha, mu, sigma
        self._importance: list[np.ndarray] = []
        self._history: list[dict[str, Any]] = []

    @property
    def label(self) -> str:
        return f"online@{self.ratio:g}/{self.interval}"

    def setup(self, setup: Setup) -> None:
        self.alpha = default_alpha(setup.model_type) if self.alpha is None else self.alpha
        self._rebuild(setup.num_layers)

    def _rebuild(self, num_layers: int) -> None:
        importance = np.mean(self._importance, axis=0) if self._importance else np.zeros(num_layers)
        alpha = self.alpha if self._importance else 0.0  # nothing seen yet: the prior alone
        ranking = rank_layers(combined_scores(importance, alpha, self.mu, self.sigma).tolist())
        assert self.ratio is not None
        self._layers = top_layers(ranking, self.ratio)
        self._history.append({"after_items": len(self._importance), "ranking": ranking, "layers": self._layers})

    def run(self, batch: Batch) -> Output:
        receiver = batch.agents.receiver
        sender = batch.sender_kv()
        prompt = batch.prompt("receiver", batch.task.receiver_message)
        scores = attention_importance(receiver.model, sender, prompt.input_ids, prompt.valid).double().numpy()
        answers: list[list[int]] = []
        kv_bytes: list[int] = []
        start = 0
        while start < len(batch.items):
            # Rows up to the next rebuild share one ranking.
            stop = min(len(batch.items), start + self.interval - len(self._importance) % self.interval)
            rows = list(range(start, stop))
            shared = share(receiver.model, _rows(sender, rows), self._layers, self.mode)
            begin = receiver_input(shared, self.mode)
            sub = _prompt_rows(prompt, rows)
            answers += greedy_generate(receiver.model, begin, sub.input_ids, sub.valid, batch.task.max_new_tokens,
                                       receiver.stop_ids, receiver.pad_id)
            kv_bytes += begin.kv_bytes.tolist()
            self._importance.extend(scores[rows])
            if len(self._importance) % self.interval == 0:
                self._rebuild(scores.shape[1])
            start = stop
        return Output(answers=[receiver.decode(a) for a in answers], receiver_ids=prompt.ids,
                      sender_ids=batch.prompt("sender", batch.task.sender_message).ids, kv_bytes=kv_bytes)

    def details(self) -> dict[str, Any]:
        """Each rebuild's layers, and the drift between consecutive rebuilds."""
        drift = []
        for before, after in zip(self._history, self._history[1:]):
            a, b = set(before["layers"]), set(after["layers"])
            drift.append({"after_items": after["after_items"], "jaccard": len(a & b) / len(a | b),
                          "kendall_tau": _kendall_tau(before["ranking"], after["ranking"])})
        return {"interval": self.interval, "rebuilds": self._history, "drift": drift}


def _rows(sender: SenderKV, rows: list[int]) -> SenderKV:
    return SenderKV([k[rows] for k in sender.keys], [v[rows] for v in sender.values],
                    sender.positions[rows], sender.valid[rows])


def _prompt_rows(prompt: Prompt, rows: list[int]) -> Prompt:
    return Prompt([prompt.ids[r] for r in rows], prompt.input_ids[rows], prompt.valid[rows])


def _kendall_tau(first: list[int], second: list[int]) -> float:
    """Kendall's tau between two rankings of the same layers."""
    rank_a = torch.tensor([first.index(x) for x in range(len(first))])
    rank_b = torch.tensor([second.index(x) for x in range(len(second))])
    da = torch.sign(rank_a[:, None] - rank_a[None, :])
    db = torch.sign(rank_b[:, None] - rank_b[None, :])
    n = len(first)
    return float((da * db).sum() / (n * (n - 1))) if n > 1 else 1.0
