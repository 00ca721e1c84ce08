"""Two agents and one exchange between them: the sender encodes a context, the receiver answers.

:func:`encode_context` and :func:`answer` are the two ends of the KV message API (they work across
processes through :class:`~kvcomm.wire.KVMessage` bytes); :meth:`Agents.ask` runs both in process.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import torch

from kvcomm.errors import ConfigError
from kvcomm.models.loading import LoadedModel, check_compatible, load_pair
from kvcomm.protocol import MaskMode, greedy_generate, pad_left, prefill, receiver_input, share
from kvcomm.protocol.decoding import check_budget
from kvcomm.protocol.reply import rebase
from kvcomm.protocol.shallow import shallow_share
from kvcomm.protocol.shared import layer_indices
from kvcomm.tasks.base import QA_INSTRUCTION, Item, Task
from kvcomm.wire import Codec, KVMessage, check_fingerprint, make_codec
from kvcomm.wire.streaming import Arrival


@dataclass
class Agents:
    """A sender and a receiver that share one KV layout (possibly the same model object)."""

    sender: LoadedModel
    receiver: LoadedModel

    def __post_init__(self) -> None:
        """Refuses what is not two loaded models, or two whose KV layouts differ (before, a pair of
        other depths ran until the first layer the receiver lacked, a bare ``KeyError``).

        Raises:
            ConfigError: a name, a pair or another object where a loaded model goes, or two
                models of different dtypes.
            FingerprintMismatch: the receiver cannot read the sender's KV.
        """
        _check_model(self.sender, "sender")
        _check_model(self.receiver, "receiver")
        check_compatible(self.sender, self.receiver)
        if self.sender.dtype != self.receiver.dtype:  # in process the sender's KV goes in as it is
            raise ConfigError(f"the sender computes in {self.sender.dtype} and the receiver in "
                              f"{self.receiver.dtype}; load both in one dtype (Agents.load(..., dtype=...)), or send "
                              "the KV as a message (encode_context, then answer), which the receiver reads in its own")

    @classmethod
    def load(cls, sender: str, receiver: str | None = None, dtype: str = "float32",
             linear: str | None = None) -> Agents:
        """Loads both models (one copy when they are the same); ``linear`` as in :func:`load_model`."""
        a, b = load_pair(sender, receiver, dtype, linear)
        return cls(a, b)

    @property
    def num_layers(self) -> int:
        return self.receiver.num_layers

    @property
    def weights(self) -> tuple[str, str]:
        """The sender's and the receiver's weights digests: what a profile and a resumed run are
        tied to (names can be spelled otherwise, or name another model after a re-derive)."""
        return self.sender.weights_digest, self.receiver.weights_digest

    def ask(
        self, context: str, question: str, layers: Sequence[int] | None = None,
        mode: MaskMode = "causal", max_new_tokens: int = 32, instruction: str = QA_INSTRUCTION,
    ) -> str:
        """One exchange in process: the sender reads ``context``, the receiver answers ``question``
        using the sender's KV at ``layers`` (all layers if None) and the sink token elsewhere."""
        message = encode_context(self.sender, context, layers, codec="fp32", mode=mode, instruction=instruction)
        return answer(self.receiver, message, question, max_new_tokens, instruction)


def encode_context(
    sender: LoadedModel, context: str, layers: Sequence[int] | None = None, codec: str | Codec = "fp16",
    mode: MaskMode = "causal", instruction: str = QA_INSTRUCTION,
) -> KVMessage:
    """The sender's side of an exchange: prefill ``context`` and pack the chosen layers' KV.

    Args:
        layers: layers shared in full (all if None); the others carry the sink token.
        codec: payload codec (``fp32``, ``fp16``, ``int8``, ``int4``, ``klt``, ``cachegen``, ``zstd`` …).
        mode: a mask mode (``causal``, ``legacy``, ``shift-back``, ``padded-sink`` or
            ``padded-zero``: ``kvcomm.protocol.MASK_MODES``); carried by the message so the
            receiver masks alike.

    Raises:
        ConfigError: an unknown codec or mode, or a layer out of range.
    """
    _check_model(sender, "sender")
    _check_text(context, "context")
    item = Item("0", context, "", ())
    ids = sender.encode_message(Task("encode", [item], 1, instruction).sender_message(item))
    return encode_ids(sender, ids, layers, codec, mode)


def encode_ids(
    sender: LoadedModel, ids: Sequence[int], layers: Sequence[int] | None = None, codec: str | Codec = "fp16",
    mode: MaskMode = "causal", passage: int | None = None, chunk: int | None = None,
    check: Callable[[], None] | None = None,
) -> KVMessage:
    """:func:`encode_context` for an already tokenised sender prompt (e.g. a chat transcript).

    With ``passage`` (a count of tokens), only the last ``passage`` tokens are kept, moved to
    start at position 0: a passage prefilled behind an opening (:func:`encode_passage`).
    ``chunk`` and ``check``: the prefill goes ``chunk`` tokens at a time, calling ``check``
    before each (a service's deadline and disconnect checks).
    """
    from kvcomm.wire.bootstrap import model_codebook

    _check_model(sender, "sender")
    bound = (make_codec(codec) if isinstance(codec, str) else codec).bind(lambda: model_codebook(sender))
    tokens = _token_ids(sender, ids)
    if sender.max_positions is not None and len(tokens) > sender.max_positions:  # as the service refuses it
        raise ConfigError(f"the context is {len(tokens)} tokens with its prompt; {sender.name} takes "
                          f"{sender.max_positions}")
    if passage is not None and (isinstance(passage, bool) or not isinstance(passage, int)
                                or not 1 <= passage <= len(tokens) or mode != "causal"):
        raise ConfigError(f"passage is a count of the last tokens, 1 to {len(tokens)}, read in causal masks; not "
                          f"{passage!r} in {mode}")
    input_ids, valid = pad_left([tokens], sender.pad_id)
    chosen = range(sender.num_layers) if layers is None else layer_indices(layers)  # once: a generator is read once
    if not chosen:  # as a method's and an edge's layer lists
        raise ConfigError("a layer list names one or more layers (None: every layer)")
    if passage is None:  # the context only through the deepest layer shared in full
        shared = shallow_share(sender.model, input_ids, valid, chosen, mode, chunk=chunk, check=check)
    else:
        kv = prefill(sender.model, input_ids, valid, chunk=chunk, check=check)
        shared = share(sender.model, rebase(sender.model, kv.last([passage])), chosen, mode)
    return KVMessage.from_shared(shared, sender.fingerprint, bound,
                                 {"sender": sender.name} | ({"passage": True} if passage is not None else {}))


def encode_passage(
    sender: LoadedModel, text: str, layers: Sequence[int] | None = None, codec: str | Codec = "fp16",
) -> KVMessage:
    """A passage as a KV message that a chat reads at the start of its last user turn, joined with
    other passages in any order (the service's ``kv_messages`` of passages; ``kv_blend`` restores
    their attention to each other). It is prefilled behind the chat's opening, which is dropped,
    and stored from position 0, so it carries no attention sink of its own; its token ids travel
    with it. Its text is read as one line (:meth:`LoadedModel.passage_parts`), in causal masks
    (the only ones passages are read in)."""
    _check_model(sender, "sender")
    _check_text(text, "passage")
    opening, own = sender.passage_parts(text)
    return encode_ids(sender, opening + own, layers, codec, "causal", passage=len(own))


def answer(
    receiver: LoadedModel, message: KVMessage | Arrival, question: str, max_new_tokens: int = 32,
    instruction: str = QA_INSTRUCTION,
) -> str:
    """The receiver's side: check the message's fingerprint, prefill the question on it, decode.

    ``message`` may still be arriving (:meth:`Client.arriving`): the question's prefill then runs
    layer by layer behind it, and the same answer comes sooner.

    Raises:
        FingerprintMismatch: the message was made by an incompatible model.
        WireError: an arriving message turned out corrupt; the forward is abandoned before any token.
    """
    _check_model(receiver, "receiver")
    _check_text(question, "question")
    if not isinstance(message, KVMessage | Arrival):
        raise ConfigError(f"answer reads a KVMessage or an Arrival, not {type(message).__name__} (bytes: "
                          "KVMessage.from_bytes first)")
    check_budget(max_new_tokens)  # before it is added to the positions
    item = Item("0", "", question, ())
    ids = receiver.encode_message(Task("answer", [item], 1, instruction).receiver_message(item))
    context = message.header.context_len if isinstance(message, Arrival) else message.context_len
    total = context + len(ids) + max_new_tokens  # checked before a message still arriving is taken
    if receiver.max_positions is not None and total > receiver.max_positions:  # past it the answer is noise
        raise ConfigError(f"the message's context, the question and {max_new_tokens} answer tokens are {total} "
                          f"positions; {receiver.name} takes {receiver.max_positions}")
    if isinstance(message, Arrival):
        start = message.receiver_input(receiver.dtype, receiver.fingerprint)
    else:
        check_fingerprint(message.fingerprint, receiver.fingerprint)
        start = receiver_input(message.to_shared(receiver.dtype))
    input_ids, valid = pad_left([ids], receiver.pad_id)
    out = greedy_generate(receiver.model, start, input_ids, valid, max_new_tokens, receiver.stop_ids, receiver.pad_id)
    return receiver.decode(out[0])


def _check_text(text: object, what: str) -> None:
    """A context, passage or question is a string (``None`` was sent as the word "None")."""
    if not isinstance(text, str):
        raise ConfigError(f"the {what} is a string, not {type(text).__name__}")


def _check_model(model: object, role: str) -> None:
    """The ``role`` (sender, receiver) is one loaded model, not a pair or a name."""
    if not isinstance(model, LoadedModel):
        hint = " (an Agents pair: its .sender or .receiver)" if isinstance(model, Agents) else \
            " (a name: kvcomm.load_model(name) first)" if isinstance(model, str) else ""
        raise ConfigError(f"the {role} is a LoadedModel, not {type(model).__name__}{hint}")


def _token_ids(model: LoadedModel, ids: Sequence[int]) -> list[int]:
    """``ids`` as a list of token ids of ``model``'s vocabulary, at least one.

    Raises:
        ConfigError: a string, an empty list, a value that is not an integer, or an id outside the
            vocabulary (ids made by another tokenizer).
    """
    if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
        raise ConfigError(f"token ids are a list of integers, not {type(ids).__name__} (text: encode_context)")
    try:
        given = [operator.index(i) for i in ids]
    except TypeError:
        raise ConfigError("token ids are integers") from None
    vocabulary = int(cast(torch.Tensor, model.model.get_input_embeddings().weight).shape[0])
    if not given:
        raise ConfigError("no token ids to prefill: a message holds at least one token")
    if bad := [i for i in given if not 0 <= i < vocabulary]:
        raise ConfigError(f"token id {bad[0]} is outside the model's vocabulary of {vocabulary} (ids of another "
                          "tokenizer?)")
    return given
