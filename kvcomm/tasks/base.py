"""Tasks: items (context, question, gold answers) plus the prompts and budgets to run them."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from kvcomm.errors import ConfigError, DataError
from kvcomm.tasks.metrics import METRICS

Pieces = Literal["chats", "passages"]
"""How a context read in pieces is laid out: each piece its own sender chat (``chats``), or the
receiver's own prompt cut into an opening and bare passages (``passages``: retrieval's layout;
:meth:`Task.passage_message`)."""

QA_INSTRUCTION = "Directly answer the question based on the context passage, no explanation is needed."


@dataclass(frozen=True)
class Item:
    """One question: the sender reads ``context``, the receiver is asked ``question``.

    ``pieces``, when given, is how the context divides among several senders (each reads one);
    otherwise a context is split at sentence ends (:func:`split_context`). ``asks``, when given,
    is what each agent of a graph holding one piece is asked (agent ``i`` reads piece ``i``; the
    last ask is the item's question), and ``ask_answers`` what each should say: a relay's hops.
    ``choices``, when given, are the options the question offers (the first answer among them):
    answer-aware calibration then scores how surely the receiver picks the gold one.
    """

    id: str
    context: str
    question: str
    answers: tuple[str, ...]
    pieces: tuple[str, ...] = ()
    asks: tuple[str, ...] = ()
    ask_answers: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.choices and (not self.answers or self.answers[0] not in self.choices):
            raise DataError(f"item {self.id}: its answer {self.answers[:1]} is not among its choices {self.choices}")

    def parts(self, count: int) -> list[str]:
        """The context in ``count`` pieces: the item's own when it has that many, else split evenly."""
        return list(self.pieces) if len(self.pieces) == count else split_context(self.context, count)


@dataclass(frozen=True)
class Task:
    """A named list of items with the paper's prompt templates and an answer budget.

    Attributes:
        name: task name as recorded in results.
        items: the items, in a fixed order.
        max_new_tokens: greedy decoding budget per answer.
        instruction: the instruction both agents see.
        metric: the primary metric (a key of ``METRICS``); every metric is recorded anyway.
        data: the file the items were read from (None for generated tasks), recorded with its
            sha256 in results.
        seed: the seed a generated task was made with (None for tasks read from a file).
        options: every option its loader was given by :func:`~kvcomm.tasks.load_task`, defaults
            filled in (a generated task's item count, seed, pieces ...; empty for the paper's
            files), recorded in results as ``task_options``.
    """

    name: str
    items: list[Item] = field(repr=False)
    max_new_tokens: int
    instruction: str = QA_INSTRUCTION
    metric: str = "paper_f1"
    data: str | None = None
    seed: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"task {self.name!r}: unknown metric {self.metric!r}; valid: {', '.join(METRICS)}")
        ids = [item.id for item in self.items]
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise DataError(f"task {self.name!r}: item ids must be unique; {len(twice)} repeat, e.g. {twice[:3]}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"task {self.name!r}: the answer budget must be at least 1 token, "
                              f"got {self.max_new_tokens}")

    @property
    def item_options(self) -> dict[str, Any]:
        """The options that make each item what it is: :attr:`options` but the item count (a
        generated task's first items are the same at any count; its ids number items and do not
        name the other options, so a seed's ``facts_0_0003`` is another item with other options)."""
        return {key: value for key, value in self.options.items() if key != "items"}

    def sender_message(self, item: Item) -> str:
        """What the sender reads: the instruction and the item's context (the paper's sender prompt)."""
        return f"Instruction: {self.instruction} Context: {item.context}"

    def receiver_message(self, item: Item) -> str:
        """The receiver's message in KVComm; also the Baseline prompt (no context)."""
        return f"Instruction: {self.instruction} Question: {item.question}"

    def skyline_message(self, item: Item) -> str:
        """The skyline's one prompt: the instruction, the context and the question together."""
        return f"Instruction: {self.instruction} Context: {item.context} Question: {item.question}"

    def passage_message(self, item: Item, count: int) -> tuple[str, list[str]]:
        """The skyline message with its context as ``count`` passages, and the markers that cut it
        into an opening, the passages and a closing (the question), for the receiver's own prompt
        read in pieces (blend's passage layout; :meth:`LoadedModel.encode_message_parts`).

        Each passage carries the space before it, so the pieces tokenise like the whole message
        (a BPE tokeniser glues a word's leading space to it); without the markers the text is the
        skyline's with the passages joined by spaces.
        """
        here = "\x00kvcomm-context\x00"
        before, found, after = self.skyline_message(replace(item, context=here)).partition(here)
        if not found:
            raise ConfigError(f"task {self.name!r}: its skyline message does not contain the context")
        markers = [f"\x00kvcomm-passage-{i}\x00" for i in range(count + 1)]
        lead = " " if before.endswith(" ") else ""
        text = before.removesuffix(lead)
        for marker, passage in zip(markers, item.parts(count)):
            text += f"{marker}{lead}{passage}"
            lead = " "
        return text + markers[-1] + after, markers


def split_context(text: str, parts: int) -> list[str]:
    """Splits a context into ``parts`` consecutive pieces at sentence ends, balanced by length; a
    context of fewer sentences than parts is split between words instead. Each piece is the text
    as written, from its first sentence's start to its last one's end (newlines and tabs inside
    kept); one part is the whole context, untouched.

    Used to give each of several senders (or agents) its own share of one item's context.

    Raises:
        DataError: fewer words than ``parts``.
    """
    if parts == 1:
        return [text]
    body = text.strip()
    spans, start = [], 0
    for gap in re.finditer(r"(?<=[.!?])\s+", body):
        spans.append((start, gap.start()))
        start = gap.end()
    spans = [(a, b) for a, b in [*spans, (start, len(body))] if b > a]
    if len(spans) < parts:
        spans = [word.span() for word in re.finditer(r"\S+", body)]
    if parts < 1 or len(spans) < parts:
        raise DataError(f"cannot split a context of {len(spans)} word(s) into {parts} parts")
    ends = list(itertools.accumulate(b - a for a, b in spans))
    cuts = [0]
    for k in range(1, parts):
        target = ends[-1] * k / parts
        # the cut closest to the target that leaves at least one sentence for each later part
        options = range(cuts[-1] + 1, len(spans) - (parts - k) + 1)
        cuts.append(min(options, key=lambda i: abs(ends[i - 1] - target)))
    cuts.append(len(spans))
    return [body[spans[a][0]:spans[b - 1][1]] for a, b in zip(cuts, cuts[1:])]
