"""Baseline and Skyline: the receiver alone, with the question only or with context and question."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from kvcomm.methods.base import METHODS, Method, Output
from kvcomm.protocol import greedy_generate, prefix_start

if TYPE_CHECKING:
    from kvcomm.eval.batch import Batch


class PromptOnly(Method):
    """The receiver reads one message of its own; ``template`` names the task's message builder."""

    template: ClassVar[str]

    def run(self, batch: Batch) -> Output:
        receiver = batch.agents.receiver
        prompt = batch.prompt("receiver", getattr(batch.task, self.template))
        start, rest, valid = prefix_start(receiver.model, prompt.ids, receiver.pad_id)  # the common opening once
        answers = greedy_generate(receiver.model, start, rest, valid, batch.task.max_new_tokens, receiver.stop_ids,
                                  receiver.pad_id)
        return Output(
            answers=[receiver.decode(ids) for ids in answers],
            receiver_ids=prompt.ids, sender_ids=None, kv_bytes=[0] * len(batch.items),
        )


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
