"""KVComm and its layer-selection baselines.

The paper's KVComm rows differ from its Random rows only in *which* layers are shared, so the
difference between ``kvcomm`` (attention importance with a Gaussian prior, or an explicit list),
``random`` and ``contiguous`` is one method, :meth:`KVCommMethod.choose`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, ClassVar, Self, cast

from pydantic import Field, model_validator

from kvcomm.errors import ConfigError
from kvcomm.methods.base import METHODS, Method, MethodOptions, Output, Setup, through_wire
from kvcomm.protocol import (
    MaskMode,
    effective_layers,
    fork_configurations,
    greedy_generate,
    receiver_input,
    share,
    share_many,
)
from kvcomm.selection.calibrate import Rule
from kvcomm.selection.rules import check_layer_choice, contiguous_layers, format_layers, random_layers, top_layers
from kvcomm.tasks.base import Pieces
from kvcomm.wire.codecs import CodecName

if TYPE_CHECKING:
    from kvcomm.eval.batch import Batch


DEFAULT_RATIO = 0.5  # what the command line shares when given neither a ratio nor layers
DEFAULT_RATIOS = (0.3, 0.5, 0.7, 1.0)  # what a sweep shares by default (the paper's fractions)


class SharingOptions(MethodOptions):
    """What every method that shares KV at chosen layers takes.

    Attributes:
        ratio: fraction of layers to share (``ceil(ratio * L)`` layers).
        mode: mask mode: ``causal`` (correct), ``legacy`` (reference parity), ``shift-back`` (KVComm-S),
            ``padded-sink`` or ``padded-zero`` (what a paged engine would see, :mod:`kvcomm.protocol.padded`).
        codec: when set (``fp16``, ``int8``, ``klt`` …), every item's KV goes through an encoded
            :class:`~kvcomm.wire.KVMessage` and back, and the bytes counted are its real size.
        senders: split each context among this many senders; their KV is concatenated with
            consistent positions (the sink is the first sender's first token).
        pieces: ``chats`` (the paper's: the sender reads its own chat with the context, the
            receiver its own with the question) or ``passages`` (one chat cut in two: the sender
            reads the skyline prompt's opening and the context as ``senders`` passages, the
            receiver the question and the chat's closing; at layers not shared the receiver keeps
            the opening instead of the sink alone; causal mode only). With one passage and every
            layer shared, ``passages`` computes what the skyline computes.
    """

    ratio: float | None = Field(default=None, gt=0, le=1)
    mode: MaskMode = "causal"
    codec: CodecName | None = None
    senders: int = Field(default=1, ge=1, le=64)
    pieces: Pieces = "chats"

    @model_validator(mode="after")
    def _needs_ratio(self) -> Self:
        if self.ratio is None and getattr(self, "layers", None) is None:
            raise ValueError("needs a ratio (the fraction of layers to share)")
        if self.pieces == "passages" and self.mode != "causal":
            raise ValueError(f"passages keep an opening at layers not shared, in causal mode only; mask mode "
                             f"{self.mode!r} moves, pads or leaks around one sink token")
        return self


class KVCommOptions(SharingOptions):
    """KVComm's options: a ratio of the calibrated ranking (by the run's rule, or ``selection``'s),
    or an explicit layer list."""

    layers: tuple[int, ...] | None = None
    selection: Rule | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        check_layer_choice(self.ratio, self.layers)
        if self.layers is not None and self.selection is not None:
            raise ValueError("a layer list is not selected by a rule: give 'selection' with a ratio")
        return self


class RandomOptions(SharingOptions):
    seed: int = 42


class KVCommMethod(Method):
    """Shares the sender's KV at chosen layers (sink token elsewhere) and decodes greedily."""

    name = "kvcomm"
    options_model: ClassVar[type[SharingOptions]] = KVCommOptions
    options: SharingOptions

    def __init__(self, options: SharingOptions | None = None, **given: object) -> None:
        super().__init__(options, **given)
        layers = getattr(self.options, "layers", None)
        self._layers = sorted(set(layers)) if layers else None

    @property
    def ratio(self) -> float | None:
        return self.options.ratio

    @property
    def mode(self) -> MaskMode:
        return self.options.mode

    @property
    def label(self) -> str:
        o = self.options
        what = f"{o.ratio:g}" if o.ratio is not None else format_layers(self._layers or [])
        suffix = "" if o.mode == "causal" else f"[{o.mode}]"
        codec = f"+{o.codec}" if o.codec else ""
        senders = f"x{o.senders}" if o.senders > 1 else ""
        rule = getattr(o, "selection", None)
        pieces = "/passages" if o.pieces == "passages" else ""
        return f"{self.name}@{what}{senders}{pieces}{codec}{suffix}" + (f"~{rule}" if rule else "")

    @property
    def layers(self) -> list[int] | None:
        """The layers the receiver gets in full (in ``legacy`` mode that includes layer 0)."""
        return None if self._layers is None else effective_layers(self._layers, self.mode)

    @property
    def ranks_layers(self) -> bool:
        return self.ratio is not None and self.ratio < 1 and type(self).choose is KVCommMethod.choose

    def choose(self, setup: Setup) -> list[int]:
        """The top ``ratio`` of the run's ranking; every layer at ratio 1 (no ranking asked for, so
        nothing is calibrated for it)."""
        assert self.ratio is not None
        if self.ratio >= 1.0:
            return list(range(setup.num_layers))
        return top_layers(setup.ranking(getattr(self.options, "selection", None), self.options.pieces), self.ratio)

    def check_depth(self, num_layers: int) -> None:
        if self.ratio is None and self._layers and self._layers[-1] >= num_layers:
            raise ConfigError(f"{self.label}: layer {self._layers[-1]} is out of range for a "
                              f"{num_layers}-layer model (0..{num_layers - 1})")

    def setup(self, setup: Setup) -> None:
        self._bind_codec(setup)
        if self.ratio is not None:
            self._layers = self.choose(setup)

    def run(self, batch: Batch) -> Output:
        receiver = batch.agents.receiver
        read = batch.reading(self.options.senders, self.options.pieces)
        shared = share(receiver.model, read.kv, self._chosen(), self.mode, read.opening)
        message_bytes = None
        if self._codec is not None:
            shared, message_bytes = through_wire(shared, batch, self._codec)
        start = receiver_input(shared)
        answers = greedy_generate(
            receiver.model, start, read.prompt.input_ids, read.prompt.valid,
            batch.task.max_new_tokens, receiver.stop_ids, receiver.pad_id,
        )
        return self._output(batch, answers, message_bytes if message_bytes is not None else start.kv_bytes.tolist())

    def fuse_key(self) -> Hashable | None:
        """In-process causal configurations of the same senders and pieces decode together (a codec
        changes each configuration's KV, other mask modes place it differently: those run alone)."""
        if self._codec is not None or self.mode != "causal":
            return None
        return ("kvcomm", self.options.senders, self.options.pieces)

    @classmethod
    def run_together(cls, methods: Sequence[Method], batch: Batch) -> list[Output]:
        """Every configuration's receiver in one batch over one copy of the sender's KV
        (:func:`~kvcomm.protocol.share_many`): configuration ``i`` takes rows ``i·B …``. The
        configurations whose first shared layer is deepest prefill the layers below it once
        (:func:`~kvcomm.protocol.fork.fork_configurations`): there they see the sink alone."""
        chosen = [cast(KVCommMethod, m) for m in methods]
        read = batch.reading(chosen[0].options.senders, chosen[0].options.pieces)
        receiver = batch.agents.receiver
        copies, rows = len(chosen), len(batch.items)
        layer_sets = [m._chosen() for m in chosen]
        answers = greedy_generate(
            receiver.model, receiver_input(share_many(read.kv, layer_sets, read.opening)),
            read.prompt.input_ids.repeat(copies, 1), read.prompt.valid.repeat(copies, 1),
            batch.task.max_new_tokens, receiver.stop_ids, receiver.pad_id,
            fork=fork_configurations(layer_sets, rows, read.kv.num_layers),  # causal (fuse_key): the layers as chosen
        )
        return [m._output(batch, answers[i * rows:(i + 1) * rows],
                          share(None, read.kv, m._chosen(), opening=read.opening).kv_bytes.tolist())
                for i, m in enumerate(chosen)]

    def _chosen(self) -> list[int]:
        if self._layers is None:
            raise ConfigError(f"{self.label}: setup() must run before run()")
        return self._layers

    def _output(self, batch: Batch, answers: list[list[int]], kv_bytes: list[int]) -> Output:
        receiver = batch.agents.receiver
        read = batch.reading(self.options.senders, self.options.pieces)
        return Output(answers=[receiver.decode(ids) for ids in answers], receiver_ids=read.prompt.ids,
                      sender_ids=read.sender_ids, kv_bytes=kv_bytes)


METHODS.add("kvcomm", KVCommMethod)


@METHODS.register("random")
class RandomLayers(KVCommMethod):
    """KVComm with ``ceil(ratio * L)`` layers drawn at random (seeded): the paper's Random rows."""

    name = "random"
    options_model: ClassVar[type[SharingOptions]] = RandomOptions
    options: RandomOptions

    @property
    def label(self) -> str:
        return super().label + ("" if self._default_seed else f"~seed{self.options.seed}")

    @property
    def former_labels(self) -> tuple[str, ...]:
        return () if self._default_seed else (super().label,)  # before labels named the seed

    @property
    def _default_seed(self) -> bool:
        return self.options.seed == RandomOptions.model_fields["seed"].default

    def choose(self, setup: Setup) -> list[int]:
        assert self.ratio is not None
        return random_layers(setup.num_layers, self.ratio, self.options.seed)


@METHODS.register("contiguous")
class ContiguousLayers(KVCommMethod):
    """KVComm with one block of consecutive layers centred in the middle of the stack."""

    name = "contiguous"
    options_model: ClassVar[type[SharingOptions]] = SharingOptions

    def choose(self, setup: Setup) -> list[int]:
        assert self.ratio is not None
        return contiguous_layers(setup.num_layers, self.ratio)
