"""The one interface every communication method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from kvcomm.agents import Batch
from kvcomm.registry import Registry
from kvcomm.wire import Codebook


@dataclass
class Output:
    """What a method produced for a batch, one entry per item."""

    answers: list[str]
    receiver_ids: list[list[int]]
    sender_ids: list[list[int]] | None
    kv_bytes: list[int]  # bytes sent to the receiver: KV, text or vectors, whatever the method sends
    messages: list[str] | None = None  # a readable form of what was sent (e.g. NLD's summary)


@dataclass
class Setup:
    """What methods may need before running: the depth, and on demand a calibrated layer ranking
    and the sender's codebook (for codecs that rotate with one)."""

    num_layers: int
    model_type: str
    ranking: Callable[[], list[int]]
    codebook: Callable[[], Codebook]


class Method(ABC):
    """A way for the receiver to answer, given the batch (and through it, the sender's context)."""

    name: ClassVar[str]

    @property
    def label(self) -> str:
        """Unique, human-readable name of this configuration in tables and plots."""
        return self.name

    @property
    def layers(self) -> list[int] | None:
        """Layers whose KV the receiver is given in full (None for methods without KV)."""
        return None

    def setup(self, setup: Setup) -> None:
        """Resolves anything that depends on the model (e.g. which layers to share)."""

    def details(self) -> dict[str, Any] | None:
        """Method-specific facts for the results (e.g. online calibration's ranking drift)."""
        return None

    @abstractmethod
    def run(self, batch: Batch) -> Output:
        """Answers every item of ``batch``."""


METHODS: Registry[type[Method]] = Registry("method")
