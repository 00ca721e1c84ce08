"""Online calibration: the layer ranking is recomputed from the stream of items seen so far.

Items are answered in order. Every ``interval`` items the ranking is rebuilt from the attention
importance of all items answered so far; before the first rebuild only the depth prior ranks
layers. Each item's importance is measured once (an all-layer receiver prefill, no generation)
and each item is answered and scored once, with the ranking from the items *before* it (the
reference re-runs and double-scores its calibration item). :meth:`details` reports the rankings
and how much they drift between rebuilds. The prior's parameters are the run's calibration
settings (``--alpha``, ``--mu``, ``--sigma``).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np
import torch
from pydantic import Field, model_validator

from kvcomm.methods.base import METHODS, Calibration, Output, Setup, through_wire
from kvcomm.methods.kvcomm import KVCommMethod, SharingOptions
from kvcomm.protocol import SenderKV, attention_importance, greedy_generate, receiver_input, share
from kvcomm.selection.rules import combined_scores, default_alpha, rank_layers, top_layers

if TYPE_CHECKING:
    from kvcomm.eval.batch import Batch


class OnlineOptions(SharingOptions):
    interval: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _chats_only(self) -> Self:
        if self.pieces != "chats":
            raise ValueError("online ranks layers on the paper's chats; it does not read passages")
        return self


@METHODS.register("online")
class OnlineKVComm(KVCommMethod):
    """KVComm whose ranking is rebuilt every ``interval`` items from the items seen so far."""

    name = "online"
    options_model: ClassVar[type[SharingOptions]] = OnlineOptions
    sequential = True
    options: OnlineOptions

    def __init__(self, options: OnlineOptions | None = None, **given: object) -> None:
        super().__init__(options, **given)
        self._calibration = Calibration(None, 0.5, 10.0)
        self._alpha = 1.0
        self._importance: list[np.ndarray] = []
        self._history: list[dict[str, Any]] = []

    uses_prior: ClassVar[bool] = True

    @property
    def ranks_layers(self) -> bool:
        return False  # it ranks from the prior and the stream: no calibrated ranking, no items held out for one

    @property
    def label(self) -> str:
        return super().label.replace(f"online@{self.ratio:g}", f"online@{self.ratio:g}/{self.options.interval}", 1)

    def setup(self, setup: Setup) -> None:
        self._bind_codec(setup)
        self._calibration = setup.calibration
        alpha = setup.calibration.alpha
        self._alpha = default_alpha(setup.model_type) if alpha is None else alpha
        self._importance, self._history = [], []  # a run starts from the prior (restore() then adds a resumed run's)
        self._rebuild(setup.num_layers)

    def _rebuild(self, num_layers: int) -> None:
        importance = np.mean(self._importance, axis=0) if self._importance else np.zeros(num_layers)
        alpha = self._alpha if self._importance else 0.0  # nothing seen yet: the prior alone
        scores = combined_scores(importance, alpha, self._calibration.mu, self._calibration.sigma)
        ranking = rank_layers(scores.tolist())
        assert self.ratio is not None
        self._layers = top_layers(ranking, self.ratio)
        self._history.append({"after_items": len(self._importance), "ranking": ranking, "layers": self._layers})

    def fuse_key(self) -> Hashable | None:
        return None  # its layers change inside a batch: it runs alone

    def run(self, batch: Batch) -> Output:
        receiver = batch.agents.receiver
        sender = batch.sender_kv(self.options.senders)
        prompt = batch.prompt("receiver", batch.task.receiver_message)
        scores = attention_importance(receiver.model, sender, prompt.input_ids, prompt.valid).double().numpy()
        answers: list[list[int]] = []
        kv_bytes: list[int] = []
        start = 0
        while start < len(batch.items):
            # Rows up to the next rebuild share one ranking.
            stop = min(len(batch.items), start + self.options.interval - len(self._importance) % self.options.interval)
            rows = list(range(start, stop))
            shared = share(receiver.model, _rows(sender, rows), self._layers or [], self.mode)
            sizes = shared.kv_bytes.tolist()
            if self._codec is not None:
                shared, sizes = through_wire(shared, batch, self._codec)
            begin = receiver_input(shared)
            sub = prompt.rows(rows)
            answers += greedy_generate(receiver.model, begin, sub.input_ids, sub.valid, batch.task.max_new_tokens,
                                       receiver.stop_ids, receiver.pad_id)
            kv_bytes += sizes
            self._importance.extend(scores[rows])
            if len(self._importance) % self.options.interval == 0:
                self._rebuild(scores.shape[1])
            start = stop
        return Output(answers=[receiver.decode(a) for a in answers], receiver_ids=prompt.ids,
                      sender_ids=batch.reading(self.options.senders).sender_ids, kv_bytes=kv_bytes)

    def state(self) -> dict[str, Any]:
        """The importance of every item seen so far and each rebuild's ranking (JSON floats are
        exact): the whole stream, so :meth:`restore` replaces."""
        return {"importance": [row.tolist() for row in self._importance], "history": self._history,
                "layers": self._layers}

    def restore(self, state: dict[str, Any]) -> None:
        self._importance = [np.asarray(row, dtype=np.float64) for row in state["importance"]]
        self._history = list(state["history"])
        self._layers = list(state["layers"])

    def details(self) -> dict[str, Any]:
        """Each rebuild's layers, and the drift between consecutive rebuilds."""
        drift = []
        for before, after in zip(self._history, self._history[1:]):
            a, b = set(before["layers"]), set(after["layers"])
            drift.append({"after_items": after["after_items"], "jaccard": len(a & b) / len(a | b),
                          "kendall_tau": _kendall_tau(before["ranking"], after["ranking"])})
        return {"interval": self.options.interval, "rebuilds": self._history, "drift": drift}


def _rows(sender: SenderKV, rows: list[int]) -> SenderKV:
    return SenderKV([k[rows] for k in sender.keys], [v[rows] for v in sender.values],
                    sender.positions[rows], sender.valid[rows])


def _kendall_tau(first: list[int], second: list[int]) -> float:
    """Kendall's tau between two rankings of the same layers."""
    rank_a = torch.tensor([first.index(x) for x in range(len(first))])
    rank_b = torch.tensor([second.index(x) for x in range(len(second))])
    da = torch.sign(rank_a[:, None] - rank_a[None, :])
    db = torch.sign(rank_b[:, None] - rank_b[None, :])
    n = len(first)
    return float((da * db).sum() / (n * (n - 1))) if n > 1 else 1.0
