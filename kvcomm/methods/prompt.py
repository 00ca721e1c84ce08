"""Baseline and Skyline: the receiver alone, with the question only or with context and question."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from kvcomm.methods.base import METHODS, Method, Output
from kvcomm.protocol import ReceiverInput, greedy_generate, prefix_start

if TYPE_CHECKING:
    from kvcomm.eval.batch import Batch, Prompt


class PromptOnly(Method):
    """The receiver reads one message of its own; ``template`` names the task's message builder."""

    template: ClassVar[str]

    def run(self, batch: Batch) -> Output:
        receiver = batch.agents.receiver
        prompt = batch.prompt("receiver", getattr(batch.task, self.template))
        start, rest, valid = self.start(batch, prompt)
        answers = greedy_generate(receiver.model, start, rest, valid, batch.task.max_new_tokens, receiver.stop_ids,
                                  receiver.pad_id)
        return Output(
            answers=[receiver.decode(ids) for ids in answers],
            receiver_ids=prompt.ids, sender_ids=None, kv_bytes=[0] * len(batch.items),
        )

    def start(self, batch: Batch, prompt: Prompt) -> tuple[ReceiverInput, torch.Tensor, torch.Tensor]:
        """Where the prompt's prefill starts: the rows' common opening computed once."""
        return prefix_start(batch.agents.receiver.model, prompt.ids, batch.agents.receiver.pad_id)


@METHODS.register("baseline")
class Baseline(PromptOnly):
    """No communication: "Instruction … Question …" (the paper's lower bound)."""

    name = "baseline"
    template = "receiver_message"


@METHODS.register("skyline")
class Skyline(PromptOnly):
    """Context given as text in the receiver's own prompt (the paper's upper bound)."""

    name = "skyline"
    template = "skyline_message"

    def start(self, batch: Batch, prompt: Prompt) -> tuple[ReceiverInput, torch.Tensor, torch.Tensor]:
        """On top of the sender's KV of the context where the sender is this model: the prompt opens
        with the sender's message, so the question alone is left to prefill (the same values up to
        float rounding; the sender's prefill is charged to this method like to every other that
        uses it). Otherwise the prompt whole, as the baseline's."""
        return batch.after_sender(prompt) or super().start(batch, prompt)
