"""Two agents and a batch of items they work on together.

A :class:`Batch` tokenises each agent's messages once and computes the sender's KV once, on first
use, so every method and layer selection in a sweep (and calibration) reuses the same prefill.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from kvcomm.models.loading import LoadedModel, load_pair
from kvcomm.protocol import SenderKV, greedy_generate, merge_senders, pad_left, prefill, receiver_input, share
from kvcomm.tasks.base import QA_INSTRUCTION, Item, Task, split_context
from kvcomm.tasks.loaders import load_task
from kvcomm.wire import (
    Codebook,
    Codec,
    KVMessage,
    build_codebook,
    check_fingerprint,
    default_codebook_id,
    load_codebook,
    make_codec,
    save_codebook,
)


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
        """One exchange in process: the sender reads ``context``, the receiver answers ``question``
        using the sender's KV at ``layers`` (all layers if None) and the sink token elsewhere."""
        message = encode_context(self.sender, context, layers, codec="fp32", mode=mode, instruction=instruction)
        return answer(self.receiver, message, question, max_new_tokens, instruction)


def encode_context(
    sender: LoadedModel, context: str, layers: Sequence[int] | None = None, codec: str = "fp16",
    mode: str = "causal", instruction: str = QA_INSTRUCTION,
) -> KVMessage:
    """The sender's side of an exchange: prefill ``context`` and pack the chosen layers' KV.

    Args:
        layers: layers shared in full (all if None); the others carry the sink token.
        codec: payload codec (``fp32``, ``fp16``, ``int8``, ``int4``, ``cachegen``, ``zstd`` …).
        mode: ``causal``, ``legacy`` or ``shift-back``; recorded so the receiver masks alike.
    """
    item = Item("0", context, "", ())
    ids = sender.encode_message(Task("encode", [item], 1, instruction).sender_message(item))
    return encode_ids(sender, ids, layers, codec, mode)


def encode_ids(
    sender: LoadedModel, ids: Sequence[int], layers: Sequence[int] | None = None, codec: str | Codec = "fp16",
    mode: str = "causal",
) -> KVMessage:
    """:func:`encode_context` for an already tokenised sender prompt (e.g. a chat transcript)."""
    codec = (make_codec(codec) if isinstance(codec, str) else codec).bind(lambda: model_codebook(sender))
    input_ids, valid = pad_left([list(ids)], sender.pad_id)
    chosen = range(sender.num_layers) if layers is None else layers
    shared = share(sender.model, prefill(sender.model, input_ids, valid), chosen, mode)
    return KVMessage.from_shared(shared, sender.fingerprint, codec, {"sender": sender.name, "mode": mode})


def codebook_from_items(sender: LoadedModel, task: Task, items: Sequence[Item], batch_size: int = 8,
                        default: bool = False) -> Codebook:
    """A codebook from the sender's KV over ``items``' contexts, saved (as the model's default if
    ``default``) so that receivers on this machine can decode with it."""
    agents = Agents(sender, sender)
    kvs = (Batch(agents, task, list(items[i:i + batch_size])).sender_kv() for i in range(0, len(items), batch_size))
    book = build_codebook(kvs, sender.fingerprint)
    save_codebook(book, default=default)
    return book


def model_codebook(sender: LoadedModel) -> Codebook:
    """The model's default codebook: the one last saved as its default, or else one built now from
    32 generated facts contexts (about 7,000 tokens) and saved as its default."""
    if (book_id := default_codebook_id(sender.fingerprint)) is not None:
        return load_codebook(book_id)
    task = load_task("facts", items=32, facts_per_item=20)
    return codebook_from_items(sender, task, task.items, default=True)


def answer(
    receiver: LoadedModel, message: KVMessage, question: str, max_new_tokens: int = 32,
    instruction: str = QA_INSTRUCTION,
) -> str:
    """The receiver's side: check the message's fingerprint, prefill the question on it, decode.

    Raises:
        FingerprintMismatch: the message was made by an incompatible model.
    """
    check_fingerprint(message.fingerprint, receiver.fingerprint)
    item = Item("0", "", question, ())
    ids = receiver.encode_message(Task("answer", [item], 1, instruction).receiver_message(item))
    input_ids, valid = pad_left([ids], receiver.pad_id)
    dtype = next(receiver.model.parameters()).dtype
    start = receiver_input(message.to_shared(dtype), message.meta.get("mode", "causal"))
    out = greedy_generate(receiver.model, start, input_ids, valid, max_new_tokens, receiver.stop_ids, receiver.pad_id)
    return receiver.decode(out[0])


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
    _sender_kv: dict[int, SenderKV] = field(default_factory=dict, repr=False)
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

    def sender_kv(self, senders: int = 1) -> SenderKV:
        """The senders' KV over their messages, computed on first call (timed in ``sender_seconds``).

        With ``senders`` > 1 each item's context is split in that many parts, each part is read by
        its own sender, and their KV is merged with consistent positions.
        """
        if senders not in self._sender_kv:
            model = self.agents.sender
            start = time.perf_counter()
            if senders == 1:
                prompt = self.prompt("sender", self.task.sender_message)
                kv = prefill(model.model, prompt.input_ids, prompt.valid)
            else:
                pieces = [split_context(item.context, senders) for item in self.items]
                parts = []
                for part in range(senders):
                    ids = [model.encode_message(self.task.sender_message(replace(item, context=p[part])))
                           for item, p in zip(self.items, pieces)]
                    parts.append(prefill(model.model, *pad_left(ids, model.pad_id)))
                kv = merge_senders(model.model, parts)
            self._sender_kv[senders] = kv
            self.sender_seconds += time.perf_counter() - start
        return self._sender_kv[senders]
