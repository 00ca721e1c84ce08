"""DroidSpeak across variants: the sender's KV at every layer but one block, which the receiver
recomputes from the sender's hidden state entering it (:mod:`kvcomm.protocol.droidspeak`).

The block is given (``block=(a, b)``) or profiled on the calibration items
(:mod:`kvcomm.selection.blocks`): the fewest layers, at most ``max_recompute`` of them, whose
answer likelihood is within ``tolerance`` of the receiver's own prefill. Bytes are what is sent:
the KV of the layers outside the block and one hidden state (the message's size with a codec).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, field_validator, model_validator

from kvcomm.errors import ConfigError
from kvcomm.methods.base import METHODS, Method, MethodOptions, Output, Setup, through_wire
from kvcomm.protocol import greedy_generate, receiver_input
from kvcomm.protocol.droidspeak import check_block, check_hidden_widths, recompute_block, send_block
from kvcomm.selection.blocks import DEFAULT_BLOCK_TOLERANCE, DEFAULT_MAX_RECOMPUTE, Pick, max_block

if TYPE_CHECKING:
    from kvcomm.eval.batch import Batch


class DroidSpeakOptions(MethodOptions):
    """``block``: the layers ``[a, b)`` the receiver recomputes (None: profiled); ``max_recompute``:
    the longest block profiling may choose, as a fraction of the layers; ``tolerance``: nats per
    answer token below the receiver's own prefill a chosen block may score; ``codec``: through messages."""

    block: tuple[int, int] | None = None
    max_recompute: float = Field(default=DEFAULT_MAX_RECOMPUTE, gt=0, le=1)
    tolerance: float = Field(default=DEFAULT_BLOCK_TOLERANCE, ge=0)
    codec: str | None = None

    @field_validator("block")
    @classmethod
    def _ordered(cls, block: tuple[int, int] | None) -> tuple[int, int] | None:
        if block is not None and not 0 <= block[0] < block[1]:
            raise ValueError(f"a block a:b needs 0 <= a < b, got {block[0]}:{block[1]}")
        return block

    @model_validator(mode="after")
    def _profiling_options_need_profiling(self) -> DroidSpeakOptions:
        if self.block is not None and (given := sorted({"max_recompute", "tolerance"} & self.model_fields_set)):
            raise ValueError(f"{' and '.join(given)} guide the profiling that chooses a block: not with a block "
                             "given")
        return self


@METHODS.register("droidspeak")
class DroidSpeak(Method):
    """The receiver recomputes one block of layers from the sender's hidden state (DroidSpeak)."""

    name = "droidspeak"
    options_model: ClassVar[type[DroidSpeakOptions]] = DroidSpeakOptions
    options: DroidSpeakOptions

    def __init__(self, options: DroidSpeakOptions | None = None, **given: object) -> None:
        super().__init__(options, **given)
        self._block: tuple[int, int] | None = self.options.block
        self._pick: Pick | None = None
        self._num_layers = 0

    @property
    def label(self) -> str:
        block = f"[{self._block[0]}:{self._block[1]}]" if self._block else ""
        return f"droidspeak{block}" + (f"+{self.options.codec}" if self.options.codec else "")

    @property
    def layers(self) -> list[int] | None:
        if self._block is None:
            return None
        return [layer for layer in range(self._num_layers) if not self._block[0] <= layer < self._block[1]]

    def check_depth(self, num_layers: int) -> None:
        if self.options.block is not None:
            _check_fits(*self.options.block, num_layers)

    def setup(self, setup: Setup) -> None:
        self._num_layers = setup.num_layers
        self._bind_codec(setup)
        if self.options.block is None:
            profile = setup.block_profile(self.options.max_recompute)
            self._pick = profile.pick(self.options.tolerance, max_block(setup.num_layers, self.options.max_recompute))
            self._block = (self._pick.start, self._pick.stop)
        assert self._block is not None
        _check_fits(*self._block, setup.num_layers)

    def details(self) -> dict[str, Any]:
        assert self._block is not None
        return {"block": list(self._block), "recomputed_fraction": (self._block[1] - self._block[0]) / self._num_layers,
                "profiled": None if self._pick is None else self._pick.model_dump()}

    def run(self, batch: Batch) -> Output:
        assert self._block is not None
        start, stop = self._block
        receiver = batch.agents.receiver
        check_hidden_widths(batch.agents.sender.model, receiver.model)  # before the sender's prefill
        sender = batch.sender_kv_with_hidden([start])
        sent = send_block(sender, start, stop)
        shared, sizes = (sent, sent.sent_bytes.tolist()) if self._codec is None else \
            through_wire(sent, batch, self._codec)
        cache = recompute_block(receiver.model, shared, start, stop)  # the receiver's work: timed as its own
        prompt = batch.prompt("receiver", batch.task.receiver_message)
        answers = greedy_generate(receiver.model, receiver_input(cache), prompt.input_ids, prompt.valid,
                                  batch.task.max_new_tokens, receiver.stop_ids, receiver.pad_id)
        return Output(answers=[receiver.decode(a) for a in answers], receiver_ids=prompt.ids,
                      sender_ids=batch.prompt("sender", batch.task.sender_message).ids, kv_bytes=sizes)


def _check_fits(start: int, stop: int, num_layers: int) -> None:
    """Refuses a block ``[start, stop)`` past a model of ``num_layers`` layers, or covering every
    layer (it would send no KV): the given block before the model loads, and the profiled one."""
    if stop > num_layers:
        raise ConfigError(f"block {start}:{stop}: the model has {num_layers} layers (a block a:b needs "
                          f"b <= {num_layers})")
    check_block(start, stop, num_layers)
    if stop - start >= num_layers:
        raise ConfigError(f"block {start}:{stop} is every layer and sends no KV; recompute fewer layers (the "
                          "receiver reading the text is the skyline)")
