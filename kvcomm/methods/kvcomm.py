"""KVComm: the receiver answers on top of the sender's KV at a subset of layers.

How the subset is chosen is the only difference between ``kvcomm`` (attention importance with a
Gaussian prior, or an explicit list), ``random`` and ``contiguous``: one class, one parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvcomm.agents import Batch
from kvcomm.errors import ConfigError
from kvcomm.methods.base import METHODS, Method, Output, Setup
from kvcomm.protocol import MASK_MODES, SharedKV, greedy_generate, receiver_input, share
from kvcomm.selection.rules import contiguous_layers, format_layers, random_layers, top_layers
from kvcomm.wire import KVMessage, check_fingerprint, make_codec


class KVCommMethod(Method):
    """Shares the sender's KV at chosen layers (sink token elsewhere) and decodes greedily.

    Args:
        ratio: fraction of layers to share (``ceil(ratio * L)`` layers).
        layers: explicit layer indices (only for ``kvcomm``; excludes ``ratio``).
        mode: mask mode, one of ``causal`` (default), ``legacy``, ``shift-back``.
        seed: random seed (``random`` only).
        codec: when set (``fp16``, ``int8``, ``int4``, ``cachegen`` …), every item's KV goes through
            an encoded :class:`~kvcomm.wire.KVMessage` and back, and the bytes counted are the
            message's real size.
        senders: split each context among this many senders; their KV is concatenated at the
            shared layers with consistent positions (the sink is the first sender's first token).
    """

    name = "kvcomm"

    def __init__(self, ratio: float | None = None, layers: Sequence[int] | None = None,
                 mode: str = "causal", seed: int = 42, codec: str | None = None, senders: int = 1) -> None:
        if (ratio is None) == (layers is None):
            raise ConfigError(f"{self.name}: give exactly one of a ratio or a layer list")
        if layers is not None and self.name != "kvcomm":
            raise ConfigError(f"{self.name} chooses its own layers; it takes a ratio, not a layer list")
        if mode not in MASK_MODES:
            raise ConfigError(f"unknown mode {mode!r}; valid: {', '.join(MASK_MODES)}")
        self.ratio, self.mode, self.seed = ratio, mode, seed
        self.codec = make_codec(codec) if codec else None
        self.codec_name = codec
        if senders < 1:
            raise ConfigError("senders must be at least 1")
        self.senders = senders
        self._layers = sorted(set(layers)) if layers is not None else None

    @property
    def label(self) -> str:
        what = f"{self.ratio:g}" if self.ratio is not None else format_layers(self._layers or [])
        suffix = "" if self.mode == "causal" else f"[{self.mode}]"
        codec = f"+{self.codec_name}" if self.codec_name else ""
        senders = f"x{self.senders}" if self.senders > 1 else ""
        return f"{self.name}@{what}{senders}{codec}{suffix}"

    @property
    def layers(self) -> list[int] | None:
        return self._layers

    def choose(self, setup: Setup) -> list[int]:
        assert self.ratio is not None
        return top_layers(setup.ranking(), self.ratio)

    def setup(self, setup: Setup) -> None:
        if self.codec is not None:
            self.codec = self.codec.bind(setup.codebook)
        if self.ratio is not None:
            self._layers = self.choose(setup)
        elif self._layers and self._layers[-1] >= setup.num_layers:
            raise ConfigError(f"layer {self._layers[-1]} out of range for {setup.num_layers} layers")

    def run(self, batch: Batch) -> Output:
        if self._layers is None:
            raise ConfigError(f"{self.label}: setup() must run before run()")
        receiver = batch.agents.receiver
        shared = share(receiver.model, batch.sender_kv(self.senders), self._layers, self.mode)
        message_bytes = None
        if self.codec is not None:
            shared, message_bytes = self._through_wire(shared, batch)
        start = receiver_input(shared, self.mode)
        prompt = batch.prompt("receiver", batch.task.receiver_message)
        answers = greedy_generate(
            receiver.model, start, prompt.input_ids, prompt.valid,
            batch.task.max_new_tokens, receiver.stop_ids, receiver.pad_id,
        )
        return Output(
            answers=[receiver.decode(ids) for ids in answers],
            receiver_ids=prompt.ids,
            sender_ids=batch.prompt("sender", batch.task.sender_message).ids,
            kv_bytes=message_bytes if message_bytes is not None else start.kv_bytes.tolist(),
        )

    def _through_wire(self, shared: SharedKV, batch: Batch) -> tuple[SharedKV, list[int]]:
        """Encodes each row as a KV message, decodes it back; returns the rows and message sizes."""
        sender, receiver = batch.agents.sender, batch.agents.receiver
        dtype = next(receiver.model.parameters()).dtype
        rows, sizes = [], []
        for i in range(len(batch.items)):
            data = KVMessage.from_shared(shared.row(i), sender.fingerprint, self.codec).to_bytes()
            message = KVMessage.from_bytes(data)
            check_fingerprint(message.fingerprint, receiver.fingerprint)
            rows.append(message.to_shared(dtype))
            sizes.append(len(data))
        return SharedKV.stack(rows), sizes


METHODS.add("kvcomm", KVCommMethod)


@METHODS.register("random")
class RandomLayers(KVCommMethod):
    """KVComm with ``ceil(ratio * L)`` layers drawn at random (seeded): the paper's Random rows."""

    name = "random"

    def choose(self, setup: Setup) -> list[int]:
        assert self.ratio is not None
        return random_layers(setup.num_layers, self.ratio, self.seed)


@METHODS.register("contiguous")
class ContiguousLayers(KVCommMethod):
    """KVComm with one block of consecutive layers centred in the middle of the stack."""

    name = "contiguous"

    def choose(self, setup: Setup) -> list[int]:
        assert self.ratio is not None
        return contiguous_layers(setup.num_layers, self.ratio)
