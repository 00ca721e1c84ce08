"""The one interface every communication method implements, and the options each one declares.

A method is a class registered in :data:`METHODS` with a frozen, typed options model
(:class:`MethodOptions`, unknown keys refused). ``KVCommMethod(ratio=0.5, codec="int8")`` validates
its options where it is made; an option the method does not take is refused naming the ones it
does take.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from kvcomm.config import Options
from kvcomm.errors import ConfigError
from kvcomm.protocol import SharedKV, prefill
from kvcomm.protocol.sender import pad_left
from kvcomm.registry import Registry
from kvcomm.wire import Codebook, Codec, KVMessage, make_codec

if TYPE_CHECKING:
    from kvcomm.eval.batch import Batch
    from kvcomm.models.loading import LoadedModel
    from kvcomm.selection.blocks import BlockProfile


class MethodOptions(Options):
    """Options of a method that takes none; subclasses add fields."""


@dataclass
class Output:
    """What a method produced for a batch, one entry per item."""

    answers: list[str]
    receiver_ids: list[list[int]]
    sender_ids: list[list[int]] | None
    kv_bytes: list[int]  # bytes sent to the receiver: KV, text or vectors, whatever the method sends
    messages: list[str] | None = None  # a readable form of what was sent (e.g. NLD's summary)


@dataclass(frozen=True)
class Calibration:
    """How attention importance and the depth prior are mixed (paper §3.2); ``alpha`` None = per family."""

    alpha: float | None
    mu: float
    sigma: float


@dataclass
class Setup:
    """What methods may need before running: the depth, the calibration settings, and on demand a
    calibrated layer ranking, the sender's codebook (for codecs that rotate with one) and a
    profile of DroidSpeak blocks (for a cap on the recomputed fraction)."""

    num_layers: int
    model_type: str
    # a rule's ranking (None: the run's rule), calibrated on items read as the run's layout or the
    # one given (``pieces``: ``chats`` or ``passages``)
    ranking: Callable[..., list[int]]
    codebook: Callable[[], Codebook]
    calibration: Calibration = Calibration(None, 0.5, 10.0)
    blocks: Callable[[float], BlockProfile] | None = None

    def block_profile(self, max_recompute: float) -> BlockProfile:
        if self.blocks is None:
            raise ConfigError("droidspeak needs a block: give one (--block a:b) or calibration items to profile on")
        return self.blocks(max_recompute)


class Method(ABC):
    """A way for the receiver to answer, given the batch (and through it, the sender's context)."""

    name: ClassVar[str]
    options_model: ClassVar[type[MethodOptions]] = MethodOptions
    # Whether its answers on a batch depend on the batches before (it learns from the stream): a
    # cluster cannot run such a method's batches apart.
    sequential: ClassVar[bool] = False
    # Whether its ``ratio`` (where it takes one) is a fraction of layers, which commands default
    # (``--ratio``, ``--ratios``); False: its own default stands (``blend``: context tokens recomputed).
    ratio_of_layers: ClassVar[bool] = True

    def __init__(self, options: MethodOptions | None = None, **given: Any) -> None:
        if options is not None and given:
            raise ConfigError(f"{self.name}: give either an options object or keyword options, not both")
        if options is not None and not isinstance(options, self.options_model):
            options = self.options_model.build(self.name, **options.model_dump())
        self.options = options if options is not None else self.options_model.build(self.name, **given)
        codec = self.codec_name  # the methods that send messages take one
        self._codec: Codec | None = make_codec(codec) if codec else None

    @classmethod
    def option_names(cls) -> list[str]:
        return list(cls.options_model.model_fields)

    @classmethod
    def takes_layer_ratio(cls) -> bool:
        """Whether it takes a ``ratio`` that is a fraction of layers (what commands default)."""
        return cls.ratio_of_layers and "ratio" in cls.option_names()

    @property
    def label(self) -> str:
        """Unique, human-readable name of this configuration in tables and plots: the method's
        name, and the options given other values than their defaults (``nld[round_one_tokens=64]``)."""
        changed = {name: value for name, value in self.options.model_dump().items()
                   if name in self.options_model.model_fields
                   and value != self.options_model.model_fields[name].get_default(call_default_factory=True)}
        shown = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changed.items()]
        return self.name + (f"[{', '.join(shown)}]" if shown else "")

    @property
    def former_labels(self) -> tuple[str, ...]:
        """Labels this configuration had in earlier kvcomm versions, under which a checkpoint of
        theirs recorded its work (resumed, it is found): the method's bare name, before labels
        named the options given other values than their defaults."""
        return (self.name,) if type(self).label is Method.label and self.label != self.name else ()

    @property
    def layers(self) -> list[int] | None:
        """Layers whose KV the receiver is given in full (None for methods without KV)."""
        return None

    uses_prior: ClassVar[bool] = False  # builds on the paper's prior itself (--alpha, --mu, --sigma): ``online``

    @property
    def ranks_layers(self) -> bool:
        """Whether :meth:`setup` asks the run for its layer ranking (what calibration makes)."""
        return False

    @property
    def codec_name(self) -> str | None:
        """The codec its messages go through (None: in process, or a method that sends none)."""
        return getattr(self.options, "codec", None)

    def check_depth(self, num_layers: int) -> None:
        """Refuses options that cannot fit a model of ``num_layers`` layers (a block, a check layer,
        a layer index past its depth): called before any model loads where the depth is known
        from the model's name, and before :meth:`setup` (nothing to refuse by default)."""

    def setup(self, setup: Setup) -> None:
        """Resolves anything that depends on the model (e.g. which layers to share)."""

    def warm_up(self, sender: LoadedModel, receiver: LoadedModel) -> None:
        """Sends one message through its codec (if any), untimed: a codec's one-off costs (compiled
        kernels, tables, a codebook made on first use) are no batch's. Called by the harness once
        set up, before its clock starts, and a cluster's worker before its batches (once a process)."""
        if self._codec is not None:
            warm_codec(self._codec, sender, receiver)

    def _bind_codec(self, setup: Setup) -> None:
        """Hands the codec (if any) the sender's codebook: the codecs that rotate with one need it."""
        if self._codec is not None:
            self._codec = self._codec.bind(setup.codebook)

    def details(self) -> dict[str, Any] | None:
        """Method-specific facts for the results (e.g. online calibration's ranking drift)."""
        return None

    def state(self) -> dict[str, Any] | None:
        """What the batch just run leaves for later batches, as JSON (None: nothing). It is recorded
        with the batch; a resumed evaluation, or one whose batches a cluster ran elsewhere, gives
        every batch's state back to :meth:`restore`, in order."""
        return None

    def restore(self, state: dict[str, Any]) -> None:
        """Takes back one batch's :meth:`state` (after :meth:`setup` and the batches before), as if
        that batch had just run here."""
        raise ConfigError(f"{self.label}: keeps no state between batches, so there is none to restore")

    @abstractmethod
    def run(self, batch: Batch) -> Output:
        """Answers every item of ``batch``."""

    def fuse_key(self) -> Hashable | None:
        """Configurations with the same key (not None) may answer a batch together, through
        :meth:`run_together` (one forward pass for all of them per decoding step)."""
        return None

    @classmethod
    def run_together(cls, methods: Sequence[Method], batch: Batch) -> list[Output]:
        """Every one of ``methods`` (the same :meth:`fuse_key`) on ``batch``, each output what its
        :meth:`run` gives; by default one after the other."""
        return [method.run(batch) for method in methods]


METHODS: Registry[type[Method]] = Registry("method")


def check_depths(methods: Sequence[Method], depth: int | None) -> None:
    """Each method's options against the model's depth (:meth:`Method.check_depth`); None: not known
    yet (checked once the model loads)."""
    if depth is not None:
        for method in methods:
            method.check_depth(depth)


WARM_TEXT = " ".join(["Mira lives in Oslo."] * 8)  # long enough for entropy coders' compiled path


_WARMED: set[tuple[int, int, str]] = set()  # (sender, receiver, codec) warmed in this process


def warm_codec(codec: Codec, sender: LoadedModel, receiver: LoadedModel) -> None:
    """``WARM_TEXT``'s KV from ``sender`` through ``codec`` to ``receiver``, every layer, untimed;
    once per process for a pair and a codec (a cluster's worker warms on its first batch)."""
    key = (id(sender), id(receiver), json.dumps([codec.name, codec.params()], sort_keys=True, default=str))
    if key in _WARMED:
        return
    _WARMED.add(key)
    ids = sender.encode_message(WARM_TEXT)
    kv = prefill(sender.model, *pad_left([ids], sender.pad_id))
    KVMessage.round_trip(SharedKV.whole(kv), sender.fingerprint, receiver.fingerprint, codec, receiver.dtype)


def through_wire(shared: SharedKV, batch: Batch, codec: Codec) -> tuple[SharedKV, list[int]]:
    """Encodes each row of ``shared`` as a KV message from the batch's sender (sender time) and
    decodes it as the receiver does (its fingerprint checked; receiver time); returns the rows
    stacked and each message's size."""
    sender, receiver = batch.agents.sender, batch.agents.receiver
    return KVMessage.round_trip(shared, sender.fingerprint, receiver.fingerprint, codec, receiver.dtype,
                                encoding=batch.sender_work)
