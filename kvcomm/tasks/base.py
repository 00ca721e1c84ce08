"""Tasks: items (context, question, gold answers) plus the prompts and budgets to run them."""

from __future__ import annotations

from dataclasses import dataclass, field

QA_INSTRUCTION = "Directly answer the question based on the context passage, no explanation is needed."


@dataclass(frozen=True)
class Item:
    """One question: the sender reads ``context``, the receiver is asked ``question``."""

    id: str
    context: str
    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    """A named list of items with the paper's prompt templates and an answer budget.

    Attributes:
        name: task name as recorded in results.
        items: the items, in a fixed order.
        max_new_tokens: greedy decoding budget per answer.
        instruction: the instruction both agents see.
        metric: the primary metric (a key of ``METRICS``); every metric is recorded anyway.
    """

    name: str
    items: list[Item] = field(repr=False)
    max_new_tokens: int
    instruction: str = QA_INSTRUCTION
    metric: str = "paper_f1"

    def sender_message(self, item: Item) -> str:
        return f"Instruction: {self.instruction} Context: {item.context}"

    def receiver_message(self, item: Item) -> str:
        """The receiver's message in KVComm; also the Baseline prompt (no context)."""
        return f"Instruction: {self.instruction} Question: {item.question}"

    def skyline_message(self, item: Item) -> str:
        return f"Instruction: {self.instruction} Context: {item.context} Question: {item.question}"
