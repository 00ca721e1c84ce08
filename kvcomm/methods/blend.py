"""Composing KV pieces computed apart: blending by selective token recompute, and prefix reuse.

Each item's context is split among ``senders`` senders (or its own pieces), each piece prefilled
alone; the receiver joins them with consistent positions and then:

- ``blend`` recomputes the top ``ratio`` fraction of context tokens by KV deviation at the check
  layer (CacheBlend; :mod:`kvcomm.protocol.blend`), optionally on pieces that share only
  KVComm-selected layers (``share``: a fraction of the run's ranking);
- ``prefix`` reuses the first piece as is and recomputes every token of the others (what prefix
  caching gives when only the first piece is cached).

Pieces are laid out one of two ways (``pieces``): ``chats``, each piece its own sender chat
("Instruction … Context: piece", as several agents would send), or ``passages``, the receiver's
own prompt cut into its opening and bare passages, each prefilled alone from position 0, as a
retrieval pipeline stores them; the question and the chat's closing follow. With passages, full
recompute is the skyline's prompt itself, so blending is measured against reading everything.

Full reuse is ``blend@0xN`` at check layer 1, the default, where the pieces share layers 0 and 1
in full (or ``kvcomm@1xN`` with chats; at a later check layer, or where the pieces do not share
every layer up to it, which moves the check to the next layer they share, every token's layers
below the check are fresh: read as text) and full recompute ``blend@1xN``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import Field, model_validator

from kvcomm.errors import ConfigError, ProtocolError
from kvcomm.methods.base import METHODS, Method, MethodOptions, Output, Setup, through_wire
from kvcomm.protocol import SenderKV, SharedKV, greedy_generate, receiver_input, share
from kvcomm.protocol.blend import BlendStats, Deviation, blend, recompute_tokens, unblendable
from kvcomm.selection.calibrate import Rule
from kvcomm.selection.rules import format_layers, top_layers
from kvcomm.tasks.base import Pieces

if TYPE_CHECKING:
    from kvcomm.eval.batch import Batch


class BlendOptions(MethodOptions):
    """``ratio``: fraction of context tokens recomputed; ``check_layer``, ``deviation``: where and on
    what deviations are measured; ``senders``: pieces per context; ``share``: fraction of layers the
    pieces share (by the run's ranking, or ``selection``'s; 1 = all); ``codec``: pieces through
    messages; ``pieces``: sender chats or passages of the receiver's prompt (module docstring)."""

    ratio: float = Field(default=0.15, ge=0, le=1)
    check_layer: int = Field(default=1, ge=1)
    deviation: Deviation = "values"
    senders: int = Field(default=2, ge=1, le=64)
    share: float = Field(default=1.0, gt=0, le=1)
    selection: Rule | None = None
    codec: str | None = None
    pieces: Pieces = "chats"

    @model_validator(mode="after")
    def _rule_needs_a_share(self) -> BlendOptions:
        if self.selection is not None and self.share == 1:
            raise ValueError(f"a selection rule ({self.selection}) ranks the layers the pieces share: with share 1 "
                             "they share every layer; give share below 1, or leave out the rule")
        return self


class PrefixOptions(MethodOptions):
    senders: int = Field(default=2, ge=2, le=64)
    codec: str | None = None
    pieces: Pieces = "chats"


class _Composing(Method):
    """What both methods share: pieces joined (through the wire if a codec is set), answered."""

    _layers: list[int] | None = None

    def __init__(self, options: MethodOptions | None = None, **given: object) -> None:
        super().__init__(options, **given)
        self._seen: dict[str, list[float]] = {"context": [], "recomputed": [], "flops_fraction": []}
        self._reported = 0  # items whose counts an earlier state() handed out

    def _start(self) -> None:
        """A run's counts start empty (a method object used for a second run counts that run's only)."""
        self._seen = {name: [] for name in self._seen}
        self._reported = 0

    def _record(self, stats: BlendStats) -> None:
        for name in self._seen:
            self._seen[name].extend(float(v) for v in getattr(stats, name))

    def state(self) -> dict[str, Any]:
        """The token counts of the batch just run (only its items: :meth:`restore` appends)."""
        start, self._reported = self._reported, len(self._seen["context"])
        return {name: values[start:] for name, values in self._seen.items()}

    def restore(self, state: dict[str, Any]) -> None:
        for name, values in state.items():
            self._seen[name].extend(float(v) for v in values)
        self._reported = len(self._seen["context"])

    def details(self) -> dict[str, Any]:
        mean = {name: sum(v) / len(v) if v else 0.0 for name, v in self._seen.items()}
        return {"mean_context_tokens": mean["context"], "mean_recomputed_tokens": mean["recomputed"],
                "mean_flops_fraction": mean["flops_fraction"], "layers": self._layers}

    def _joined(self, batch: Batch, senders: int, pieces: Pieces) -> tuple[SharedKV, list[int]]:
        """The pieces joined (through messages with a codec), and each row's bytes: its KV and
        4-byte token ids, or its message."""
        return self._sent(batch, batch.sender_kv(senders, pieces), batch.reading(senders, pieces).opening)

    def _sent(self, batch: Batch, sender: SenderKV, opening: int = 0) -> tuple[SharedKV, list[int]]:
        """``sender`` at the method's layers (the opening's columns kept at the others: passages),
        through the wire with a codec, and each row's bytes."""
        receiver = batch.agents.receiver
        layers = self._layers if self._layers is not None else range(receiver.num_layers)
        shared = share(receiver.model, sender, layers, opening=opening)
        if self._codec is None:
            assert shared.token_ids is not None
            return shared, (shared.kv_bytes + 4 * shared.context_len).tolist()  # KV and 4-byte token ids
        return through_wire(shared, batch, self._codec)

    def _answer(self, batch: Batch, start_shared: SharedKV, kv_bytes: list[int], senders: int,
                pieces: Pieces) -> Output:
        receiver = batch.agents.receiver
        read = batch.reading(senders, pieces)
        answers = greedy_generate(receiver.model, receiver_input(start_shared), read.prompt.input_ids,
                                  read.prompt.valid, batch.task.max_new_tokens, receiver.stop_ids, receiver.pad_id)
        return Output(answers=[receiver.decode(a) for a in answers], receiver_ids=read.prompt.ids,
                      sender_ids=read.sender_ids, kv_bytes=kv_bytes)


@METHODS.register("blend")
class BlendMethod(_Composing):
    """Pieces joined, then the most deviating tokens recomputed (CacheBlend)."""

    name = "blend"
    options_model: ClassVar[type[BlendOptions]] = BlendOptions
    options: BlendOptions
    ratio_of_layers = False  # its ratio is the fraction of context tokens recomputed (default 0.15)

    @property
    def label(self) -> str:
        o = self.options
        layers = (f"/L{o.share:g}" if o.share < 1 else "") + ("/passages" if o.pieces == "passages" else "")
        codec = f"+{o.codec}" if o.codec else ""
        rule = f"~{o.selection}" if o.selection else ""
        check = f"c{o.check_layer}" if o.check_layer != 1 else ""
        deviation = {"values": "", "keys": "k", "both": "kv"}[o.deviation]
        return f"blend@{o.ratio:g}x{o.senders}{layers}{codec}{rule}" + (f"[{check}{deviation}]" if check or
                                                                            deviation else "")

    @property
    def layers(self) -> list[int] | None:
        return self._layers

    @property
    def ranks_layers(self) -> bool:
        return self.options.share < 1

    def check_depth(self, num_layers: int) -> None:
        if (refusal := unblendable(True, ["causal"], [True] * num_layers, self.options.check_layer)) is not None:
            raise ConfigError(f"{self.label}: {refusal[1]}: the model has {num_layers} layers (--check-layer)")

    def setup(self, setup: Setup) -> None:
        self._bind_codec(setup)
        self._start()
        share = self.options.share
        # pieces sharing some layers keep the sink alone elsewhere, as chats do (passages keep the opening):
        # ranked on chats, so a run's --profile (of chats) serves it
        ranked = setup.ranking(self.options.selection, "chats") if share < 1 else list(range(setup.num_layers))
        self._layers = top_layers(ranked, share)
        full = [layer in self._layers for layer in range(setup.num_layers)]  # before any prefill, not per batch
        if (refusal := unblendable(True, ["causal"], full, self.options.check_layer)) is not None:
            raise ConfigError(f"{self.label}: {refusal[1]} (layers shared: {format_layers(self._layers)})")

    def run(self, batch: Batch) -> Output:
        o = self.options
        joined, sent = self._joined(batch, o.senders, o.pieces)
        # passages: the opening was prefilled first, alone, as in a full prefill: exact, as the service counts it
        exact = batch.sender_pieces(o.senders, o.pieces)[0].context_len if o.pieces == "passages" else 0
        blended, stats = blend(batch.agents.receiver.model, joined, o.ratio, o.check_layer, o.deviation, exact=exact)
        self._record(stats)
        return self._answer(batch, blended, sent, o.senders, o.pieces)


@METHODS.register("prefix")
class PrefixReuse(_Composing):
    """The first piece reused as is, every token of the others recomputed on top of it."""

    name = "prefix"
    options_model: ClassVar[type[PrefixOptions]] = PrefixOptions
    options: PrefixOptions

    @property
    def label(self) -> str:
        o = self.options
        return f"prefix@x{o.senders}" + ("/passages" if o.pieces == "passages" else "") + (f"+{o.codec}" if o.codec
                                                                                           else "")

    def setup(self, setup: Setup) -> None:
        self._bind_codec(setup)
        self._start()

    def run(self, batch: Batch) -> Output:
        o = self.options
        receiver = batch.agents.receiver
        # what travels: the first piece (its KV and ids, or its message) and the others' token ids alone
        joined = share(receiver.model, batch.sender_kv(o.senders, o.pieces), range(receiver.num_layers))
        reused = batch.sender_pieces(o.senders, o.pieces)[0]  # the first piece (or opening)
        first, sent = self._sent(batch, reused)
        if self._codec is not None:  # the first piece as its own message arrives; the rest is recomputed
            joined = _arrived_first(joined, first)
        columns = torch.arange(joined.valid[0].shape[1])[None]
        blended, stats = recompute_tokens(receiver.model, joined, joined.valid[0] & (columns >= reused.valid.shape[1]))
        self._record(stats)
        rest = (joined.context_len - reused.context_len).tolist()
        return self._answer(batch, blended, [b + 4 * int(r) for b, r in zip(sent, rest)], o.senders, o.pieces)


def _arrived_first(joined: SharedKV, first: SharedKV) -> SharedKV:
    """``joined`` (the pieces in process, the first in its first columns, left-padded alike) with
    the first piece's keys and values replaced by ``first``'s: that piece as its own message
    decoded it (before, the whole join went through the wire, re-padded row by row, and the
    columns taken for the first piece were not its own in rows of other lengths)."""
    width = first.valid[0].shape[1]
    if any(f.shape != j[:, :width].shape or not torch.equal(f, j[:, :width])
           for f, j in zip(first.valid, joined.valid)):
        raise ProtocolError("the first piece's message does not line up with the pieces joined")
    return replace(joined, keys=[torch.cat([f.to(j.dtype), j[:, :, width:]], dim=2) for f, j in zip(first.keys,
                                                                                                     joined.keys)],
                   values=[torch.cat([f.to(j.dtype), j[:, :, width:]], dim=2) for f, j in zip(first.values,
                                                                                             joined.values)])
