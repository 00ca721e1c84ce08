"""A batch of items that every method of a run works on, and what each method is charged for it.

A :class:`Batch` tokenises each agent's messages once and computes each sender prefill once, on
first use, so every configuration of a sweep reuses it (the opening its prompts share is computed
once for the batch: :func:`~kvcomm.protocol.prefill_shared`). Time is attributed honestly: a method is
charged the full cost of every shared sender computation it used (whether it triggered it or found
it cached), plus the sender-side work it does itself (:meth:`Batch.sender_work`); a method that
uses no sender computation is charged none. So the times a method gets do not depend on the order
of methods in a run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from kvcomm.agents import Agents
from kvcomm.errors import ConfigError
from kvcomm.models.loading import LoadedModel
from kvcomm.protocol import (
    ReceiverInput,
    SenderKV,
    common_prefix,
    continuing,
    merge_senders,
    pad_left,
    prefill,
    prefill_shared,
)
from kvcomm.protocol.prefix import MIN_PREFIX, shared_opening
from kvcomm.protocol.reply import rebase
from kvcomm.tasks.base import Item, Pieces, Task

clock: Callable[[], float] = time.perf_counter  # module-level so tests can make time deterministic


@dataclass
class Prompt:
    """Token ids of one message per item, and the left-padded batch tensors."""

    ids: list[list[int]]
    input_ids: torch.Tensor
    valid: torch.Tensor

    def rows(self, rows: list[int]) -> Prompt:
        return Prompt([self.ids[r] for r in rows], self.input_ids[rows], self.valid[rows])


@dataclass(frozen=True)
class Reading:
    """What a receiver reads: the senders' KV, the width of the opening it keeps at layers not
    shared (0: the sink alone; passages keep the opening of the chat they were cut from), its own
    prompt, and each item's sender tokens (as recorded in results)."""

    kv: SenderKV
    opening: int
    prompt: Prompt
    sender_ids: list[list[int]]


class Batch:
    """Items processed together by every method of a run."""

    def __init__(self, agents: Agents, task: Task, items: list[Item]) -> None:
        if not items:
            raise ConfigError("a batch needs at least one item")
        self.agents, self.task, self.items = agents, task, items
        self._sender_kv: dict[tuple[int, Pieces], SenderKV] = {}
        self._pieces: dict[tuple[int, Pieces], list[SenderKV]] = {}
        self._with_hidden: dict[tuple[int, ...], SenderKV] = {}
        self._prompts: dict[tuple[str, str], Prompt] = {}
        self._cost: dict[str, float] = {}  # seconds each shared sender computation took, once
        self._used: set[str] = set()  # shared computations the current run used
        self._own = 0.0  # sender-side seconds the current run spent itself
        self._fresh = 0.0  # sender-side seconds actually spent during the current run

    def begin_run(self) -> None:
        """Starts accounting for one method's run."""
        self._used, self._own, self._fresh = set(), 0.0, 0.0

    @property
    def charged_sender_seconds(self) -> float:
        """Sender time of the current run: shared computations it used (full cost) plus its own."""
        return self._own + sum(self._cost[key] for key in self._used)

    @property
    def spent_sender_seconds(self) -> float:
        """Sender time actually spent during the current run (to keep out of receiver time)."""
        return self._fresh

    @contextlib.contextmanager
    def sender_work(self) -> Iterator[None]:
        """Times sender-side work a method does itself (e.g. NLD's summaries)."""
        began = clock()
        try:
            yield
        finally:
            spent = clock() - began
            self._own += spent
            self._fresh += spent

    def prompt(self, agent: str, message: Callable[[Item], str]) -> Prompt:
        """Tokenised messages for ``agent`` (``sender`` or ``receiver``), cached per template."""
        key = (agent, message.__name__)
        if key not in self._prompts:
            model: LoadedModel = getattr(self.agents, agent)
            ids = [model.encode_message(message(item)) for item in self.items]
            input_ids, valid = pad_left(ids, model.pad_id)
            self._prompts[key] = Prompt(ids, input_ids, valid)
        return self._prompts[key]

    def sender_kv(self, senders: int = 1, pieces: Pieces = "chats") -> SenderKV:
        """The senders' KV over their messages, computed on first call.

        With ``senders`` > 1 each item's context is split in that many parts, each part is read by
        its own sender, and their KV is merged with consistent positions. With ``pieces="passages"``
        the parts are the receiver's own prompt cut up instead (:meth:`passage_question` is the rest).
        """
        self._compute(senders, pieces)
        return self._sender_kv[senders, pieces]

    def after_sender(self, prompt: Prompt) -> tuple[ReceiverInput, torch.Tensor, torch.Tensor] | None:
        """For a receiver prompt that opens with the sender's own message (the skyline's opens with
        the sender's chat up to the end of the context): a start holding the sender's KV of that
        opening (:meth:`sender_kv`, computed once for every method and charged as sender time) and
        each row's rest, left-padded, to prefill on top of it (:func:`~kvcomm.protocol.continuing`).

        None where the sender's KV is not the receiver's own computation (two models), or where it
        covers no more of the prompts than their common opening (which the prompt's own prefill
        computes once per batch anyway).
        """
        sender, receiver = self.agents.sender, self.agents.receiver
        if sender.model is not receiver.model:
            return None
        ids = self.prompt("sender", self.task.sender_message).ids
        opening = [common_prefix([theirs, ours]) for theirs, ours in zip(ids, prompt.ids)]
        if min(opening) < MIN_PREFIX or sum(opening) <= len(prompt.ids) * shared_opening(prompt.ids):
            return None
        return continuing(self.sender_kv(), prompt.ids, opening, receiver.pad_id)

    def sender_kv_with_hidden(self, layers: Sequence[int]) -> SenderKV:
        """The sender's KV, with its hidden states entering ``layers`` recorded (DroidSpeak's
        E-cache): a prefill of its own, computed on first call and charged like any other."""
        wanted = tuple(sorted(set(layers)))
        key = f"sender_kv/1/hidden{list(wanted)}"
        if wanted not in self._with_hidden:
            began = clock()
            prompt = self.prompt("sender", self.task.sender_message)
            self._with_hidden[wanted] = prefill(self.agents.sender.model, prompt.input_ids, prompt.valid, wanted)
            self._cost[key] = clock() - began
            self._fresh += self._cost[key]
        self._used.add(key)
        return self._with_hidden[wanted]

    def sender_pieces(self, senders: int, pieces: Pieces = "chats") -> list[SenderKV]:
        """Each sender's own KV (piece ``i``: the ``i``-th part of every item's context), before
        merging; with ``pieces="passages"``, the opening of the receiver's prompt and then each passage."""
        self._compute(senders, pieces)
        return self._pieces[senders, pieces]

    def reading(self, senders: int = 1, pieces: Pieces = "chats") -> Reading:
        """What a receiver of ``senders`` pieces laid out as ``pieces`` reads (computed on first call)."""
        kv = self.sender_kv(senders, pieces)
        if pieces == "passages" or senders > 1:  # what the senders read, joined
            assert kv.ids is not None
            read = [row[ok].tolist() for row, ok in zip(kv.ids, kv.valid)]
        else:
            read = self.prompt("sender", self.task.sender_message).ids
        if pieces == "passages":
            return Reading(kv, self.sender_pieces(senders, pieces)[0].valid.shape[1], self.passage_question(senders),
                           read)
        return Reading(kv, 0, self.prompt("receiver", self.task.receiver_message), read)

    def passage_question(self, senders: int) -> Prompt:
        """The receiver's prompt after its ``senders`` passages: the question and the chat's closing."""
        key = ("receiver", f"passages/{senders}")
        if key not in self._prompts:
            model = self.agents.receiver
            ids = [model.encode_message_parts(*self.task.passage_message(item, senders))[-1] for item in self.items]
            self._prompts[key] = Prompt(ids, *pad_left(ids, model.pad_id))
        return self._prompts[key]

    def _compute(self, senders: int, pieces: Pieces = "chats") -> None:
        key = f"sender_kv/{senders}" + ("/passages" if pieces == "passages" else "")
        if (senders, pieces) not in self._sender_kv:
            began = clock()
            parts = self._passages(senders) if pieces == "passages" else self._prefill(senders)
            self._pieces[senders, pieces] = parts
            self._sender_kv[senders, pieces] = parts[0] if len(parts) == 1 else merge_senders(
                self.agents.sender.model, parts)
            self._cost[key] = clock() - began
            self._fresh += self._cost[key]
        self._used.add(key)

    def _passages(self, count: int) -> list[SenderKV]:
        """The opening of each item's receiver prompt, then its ``count`` passages, each prefilled
        alone behind that opening (never behind another passage), the opening's KV dropped and the
        passage moved to start at position 0: a stored passage, reusable in any order and place.

        The opening holds position 0 (the attention sink) as it does in the whole prompt; a
        passage prefilled from position 0 itself would carry a second sink into the joined
        context. CacheBlend's code does the same with BOS.
        """
        model = self.agents.sender
        cut = [model.encode_message_parts(*self.task.passage_message(item, count)) for item in self.items]
        parts = [prefill_shared(model.model, [row[0] for row in cut], model.pad_id)]
        for part in range(1, count + 1):
            behind = prefill_shared(model.model, [row[0] + row[part] for row in cut], model.pad_id)
            parts.append(rebase(model.model, behind.last([len(row[part]) for row in cut])))
        return parts

    def _prefill(self, senders: int) -> list[SenderKV]:
        model = self.agents.sender
        if senders == 1:
            prompt = self.prompt("sender", self.task.sender_message)
            return [prefill_shared(model.model, prompt.ids, model.pad_id)]
        pieces = [item.parts(senders) for item in self.items]
        parts = []
        for part in range(senders):
            ids = [model.encode_message(self.task.sender_message(replace(item, context=p[part])))
                   for item, p in zip(self.items, pieces)]
            parts.append(prefill_shared(model.model, ids, model.pad_id))
        return parts
