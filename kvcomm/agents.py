"""Two agents and a batch of items they work on together.

A :class:`Batch` tokenises each agent's messages once and computes the sender's KV once, on first
use, so every method and layer selection in a sweep (and calibration) reuses the same prefill.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kvcomm.models.loading import LoadedModel, load_pair
from kvcomm.protocol import SenderKV, build_receiver_input, greedy_generate, pad_left, prefill
from kvcomm.tasks.base import QA_INSTRUCTION, Item, Task


@dataclass
class Agents:
    """A sender and a receiver that share one KV layout (possibly the same model object)."""

    sender: LoadedModel
    receiver: LoadedModel

    @classmethod
    def load(cls, sender: str, receiver: str | None = None, dtype: str = "float32") -> Agents:
        a, b = load_pair(sender, receiver, dtype)
        return cls(a, b)

    @property
    def num_layers(self) -> int:
        return self.receiver.num_layers

    def ask(
        self, context: str, question: str, layers: Sequence[int] | None = None,
        mode: str = "causal", max_new_tokens: int = 32, instruction: str = QA_INSTRUCTION,
    ) -> str:
        """One exchange: the sender reads ``context``, the receiver answers ``question`` using the
        sender's KV at ``layers`` (all layers if None) and the sink token elsewhere."""
        task = Task("ask", [Item("0", context, question, ())], max_new_tokens, instruction)
        batch = Batch(self, task, task.items)
        prompt = batch.prompt("receiver", task.receiver_message)
        chosen = range(self.num_layers) if layers is None else layers
        start = build_receiver_input(self.receiver.model, batch.sender_kv(), chosen, mode)
        ids = greedy_generate(self.receiver.model, start, prompt.input_ids, prompt.valid, max_new_tokens,
                              self.receiver.stop_ids, self.receiver.pad_id)
        return self.receiver.decode(ids[0])


@dataclass
class Prompt:
    """Token ids of one message per item, and the left-padded batch tensors."""

    ids: list[list[int]]
    input_ids: torch.Tensor
    valid: torch.Tensor


@dataclass
class Batch:
    """Items processed together by every method of a run."""

    agents: Agents
    task: Task
    items: list[Item]
    sender_seconds: float = 0.0
    _sender_kv: SenderKV | None = field(default=None, repr=False)
    _prompts: dict[tuple[str, str], Prompt] = field(default_factory=dict, repr=False)

    def prompt(self, agent: str, message: Callable[[Item], str]) -> Prompt:
        """Tokenised messages for ``agent`` (``sender`` or ``receiver``), cached per template."""
        key = (agent, message.__name__)
        if key not in self._prompts:
            model: LoadedModel = getattr(self.agents, agent)
            ids = [model.encode_message(message(item)) for item in self.items]
            input_ids, valid = pad_left(ids, model.pad_id)
            self._prompts[key] = Prompt(ids, input_ids, valid)
        return self._prompts[key]

    def sender_kv(self) -> SenderKV:
        """The sender's KV over its messages, computed on first call (timed in ``sender_seconds``)."""
        if self._sender_kv is None:
            prompt = self.prompt("sender", self.task.sender_message)
            start = time.perf_counter()
            self._sender_kv = prefill(self.agents.sender.model, prompt.input_ids, prompt.valid)
            self.sender_seconds = time.perf_counter() - start
        return self._sender_kv
