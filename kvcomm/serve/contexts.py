"""Contexts the service stores as KV messages: which layers, which id, and one prefill per content.

A context shares the layers a request names, or the top ``ratio`` of a layer ranking: the
request's own (``profile``), the service's (loaded with ``--profile``), or one the service
calibrates once on generated text the first time a ratio is asked without either. The service keeps
one ranking per layout: contexts (read before a chat, as the paper's two chats) and passages (read
inside a chat's last user turn, behind its opening) are ranked on items read the same way. Ids are
content addresses: the same token ids, model, layers, mask mode and codec give the same id, so a
second request for the same context spends no prefill.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from kvcomm.agents import Agents, encode_ids
from kvcomm.errors import ConfigError, MessageTooLarge, WireError
from kvcomm.models.loading import LoadedModel
from kvcomm.protocol import MaskMode, effective_layers
from kvcomm.selection import Profile, calibrate, top_layers
from kvcomm.selection.calibrate import calibration_items, check_pair
from kvcomm.serve.budget import Hold
from kvcomm.serve.chat import check_readable, check_usable
from kvcomm.serve.config import ServeConfig
from kvcomm.serve.errors import ServiceRefusal
from kvcomm.serve.schemas import ContextRequest
from kvcomm.serve.stores import MessageStore, check_given_id
from kvcomm.tasks import Item, Task, load_task
from kvcomm.tasks.base import Pieces
from kvcomm.wire import Codec, KVMessage, MessageReader, make_codec
from kvcomm.wire.bootstrap import model_codebook
from kvcomm.wire.codecs import preset_of
from kvcomm.wire.codecs.auto import AutoCodec
from kvcomm.wire.header import Header, decoded_bytes
from kvcomm.wire.streaming import receive

logger = logging.getLogger(__name__)
SLICE = 1 << 20  # a stored message is decoded this many bytes at a time, the request's deadline checked between


def _slices(data: bytes, check: Callable[[], None] | None) -> Iterator[bytes]:
    """``data`` in ``SLICE``-byte pieces, ``check`` called before each."""
    for start in range(0, len(data), SLICE):
        if check is not None:
            check()
        yield data[start:start + SLICE]


def _codec_key(codec: Codec) -> tuple[str, str]:
    """A codec's preset name (else its own) and its parameters, comparable across a JSON round trip."""
    params = codec.params()
    return preset_of(codec.name, params) or codec.name, json.dumps(params, sort_keys=True)


def own_header(data: bytes) -> Header:
    """The header of a message this service made (encoded, or stored by it): read with no limit of
    the wire module's own (2 GiB on the wire, 8 GiB decoded), which a service configured above them
    would otherwise meet here first; the service checks its own limits where they apply."""
    return MessageReader(io.BytesIO(data), max_bytes=len(data), max_decoded_bytes=1 << 62).header


def raw_payload_bytes(agent: LoadedModel, codec: Codec, layers: list[int] | None, tokens: int,
                      mode: MaskMode = "causal") -> int | None:
    """The payload of a message of ``tokens`` tokens at ``layers`` (every layer if None; the sink
    elsewhere): exact for the uncompressed codecs, None for the compressing ones."""
    if codec.name != "raw":
        return None
    fp, width = agent.fingerprint, {"float32": 4}.get(str(codec.params().get("dtype")), 2)
    return 2 * width * fp["num_kv_heads"] * fp["head_dim"] * kv_columns(agent, layers, tokens, mode)


def kv_columns(agent: LoadedModel, layers: list[int] | None, tokens: int, mode: MaskMode = "causal") -> int:
    """Token columns a message of ``tokens`` tokens holds over all layers: every token at
    ``layers`` (every layer if None), the sink elsewhere."""
    num_layers = agent.fingerprint["num_layers"]
    full = set(effective_layers(range(num_layers) if layers is None else layers, mode))
    return sum(tokens if layer in full else 1 for layer in range(num_layers))


@dataclass(frozen=True)
class Plan:
    """What a context request resolves to before any prefill."""

    ids: list[int]
    layers: list[int] | None  # None: every layer
    codec: Codec
    mode: MaskMode
    message_id: str
    content_addressed: bool
    bandwidth: tuple[float, str] | None = None  # codec auto: Mbit/s, and declared / measured / default
    passage: int | None = None  # a passage: how many of ``ids`` are its own (the rest is the opening)


def by_layout(profiles: Sequence[Profile]) -> dict[Pieces, Profile]:
    """``profiles`` by the layout each was calibrated on.

    Raises:
        ConfigError: two profiles of one layout.
    """
    held: dict[Pieces, Profile] = {}
    for profile in profiles:
        if profile.pieces in held:
            raise ConfigError(f"two profiles calibrated on items read as {profile.pieces}: give one per layout")
        held[profile.pieces] = profile
    return held


def check_ranking(ranking: list[int], num_layers: int) -> list[int]:
    if sorted(ranking) != list(range(num_layers)):
        raise ConfigError(f"a layer ranking must order each of the model's {num_layers} layers once")
    return ranking


class ContextMaker:
    """Turns context requests into stored KV messages for one agent."""

    def __init__(self, agent: LoadedModel, config: ServeConfig, profiles: Sequence[Profile] = ()) -> None:
        """``profiles``: at most one per layout (each says its own in ``details.pieces``).

        Raises:
            ConfigError: a profile for another depth, a ranking that is not one, or two profiles
                of one layout.
        """
        self.agent, self.config = agent, config
        self.profiles = by_layout(profiles)
        for profile in self.profiles.values():
            if profile.num_layers != agent.num_layers:
                raise ConfigError(f"profile is for {profile.num_layers} layers, the model has {agent.num_layers}")
            check_ranking(profile.ranking, agent.num_layers)
            # by weights, or (a profile written before they were recorded) by name: before, only by weights
            check_pair(profile, (agent.weights_digest, agent.weights_digest), (agent.name, agent.name))
        self._calibrating = threading.Lock()

    def tokens(self, body: ContextRequest) -> list[int]:
        """The sender prompt's token ids (thread: tokenising a long context takes time); for a
        passage, the chat opening it is prefilled behind and then its own tokens."""
        if body.passage and body.context is not None:
            opening, own = self.agent.passage_parts(body.context)
            return opening + own
        if body.context is not None:
            item = Item("0", body.context, "", ())
            return self.agent.encode_message(Task("context", [item], 1).sender_message(item))
        return self.agent.chat_ids([m.turn() for m in body.messages or []], generation_prompt=False)

    def ranking(self, body: ContextRequest) -> list[int]:
        """The request's ranking, else the service's for the request's layout (calibrated now,
        once, if it has none).

        Raises:
            ConfigError: the request's profile says it was calibrated on the other layout.
        """
        pieces: Pieces = "passages" if body.passage else "chats"
        if body.profile is not None:
            given = body.profile.details
            if given is not None and given.pieces != pieces:
                raise ConfigError(f"the profile was calibrated on items read as {given.pieces}, this request stores "
                                  f"{'a passage' if body.passage else 'a context'}: use a profile made by `kvcomm "
                                  f"calibrate --pieces {pieces}`, or send its bare 'ranking'")
            return check_ranking(body.profile.ranking, self.agent.num_layers)
        return self.prepare(pieces).ranking

    def prepare(self, pieces: Pieces = "chats") -> Profile:
        """The service's ranking for ``pieces``, calibrated now if it has none (once: concurrent
        requests wait for the first)."""
        with self._calibrating:
            if pieces not in self.profiles:
                self.profiles[pieces] = self.calibrate(pieces)
        return self.profiles[pieces]

    def calibrate(self, pieces: Pieces = "chats") -> Profile:
        """A ranking calibrated by the service's rule on generated facts read as ``pieces`` (no
        generation; about three minutes with the ``prune`` or ``answer`` rule on SmolLM2-135M, seconds with
        ``paper``)."""
        task = load_task("facts", items=calibration_items(self.config.selection))
        return calibrate(Agents(self.agent, self.agent), task, task.items, progress=False,
                         rule=self.config.selection, pieces=pieces)

    def plan(self, body: ContextRequest, ids: list[int]) -> Plan:
        """Codec, layers and id of a request (model thread: may build a codebook or calibrate)."""
        name = body.codec or self.config.codec
        auto = make_codec(name).name == "auto"
        for field in ("bandwidth_mbit", "receiver_compute_s"):
            if getattr(body, field) is not None and not auto:
                raise ConfigError(f"{field!r} chooses a codec: it goes with codec 'auto', not {name!r}")
        given = body.bandwidth_mbit
        source = "default" if given is None else "measured" if body.bandwidth_measured else "declared"
        told = {"bandwidth_mbit": given, "receiver_compute_s": body.receiver_compute_s}
        codec = make_codec(name, **({k: v for k, v in told.items() if v is not None} if auto else {}))
        bandwidth = (float(codec.params()["bandwidth_mbit"]), source) if auto else None
        codec = codec.bind(lambda: model_codebook(self.agent))
        if body.passage and body.mode not in (None, "causal"):
            raise ConfigError(f"a passage is read in causal masks (spliced into the chat), not {body.mode!r}")
        mode = "causal" if body.passage else body.mode or self.config.mode
        layers: list[int] | None = None
        if body.layers is not None:
            bad = [layer for layer in body.layers if not 0 <= layer < self.agent.num_layers]
            if bad:
                raise ConfigError(f"layers {bad} are out of range 0..{self.agent.num_layers - 1}")
            layers = sorted(set(body.layers))
        elif (ratio := body.ratio or self.config.ratio) is not None:
            layers = top_layers(self.ranking(body), ratio)
        elif body.profile is not None:
            raise ConfigError("a profile ranks layers for a ratio: give 'ratio' with it (this agent has no default "
                              "ratio), or 'layers' instead")
        passage = len(ids) - len(self.agent.turn_opening()) if body.passage else None
        if body.id is not None:
            return Plan(ids, layers, codec, mode, check_given_id(body.id), False, bandwidth, passage)
        return Plan(ids, layers, codec, mode, self.content_id(ids, layers, codec, mode, passage), True, bandwidth,
                    passage)

    def content_id(self, ids: list[int], layers: list[int] | None, codec: Codec, mode: MaskMode,
                   passage: int | None = None) -> str:
        full = effective_layers(range(self.agent.num_layers) if layers is None else layers, mode)
        key = json.dumps({"fingerprint": self.agent.fingerprint, "weights": self.agent.weights_digest, "ids": ids,
                          "layers": full, "mode": mode,
                          "codec": [codec.name, codec.params()]} | ({"passage": passage} if passage else {}),
                         sort_keys=True)
        return "kv-" + hashlib.sha256(key.encode()).hexdigest()[:40]

    def existing(self, plan: Plan, store: MessageStore, hold: Hold | None = None,
                 check: Callable[[], None] | None = None) -> bytes | None:
        """The stored message of a content-addressed plan, if there is one that holds what the plan
        asks and a chat of this service can read (no prefill needed). It is checked in full, as an
        upload is: decoded within the service's limits, its decoded size taken into ``hold`` (the
        service's decoded-bytes budget) and ``check`` (the request's deadline) called as it goes. A
        store shared with another writer may hold, under this address, bytes that are corrupt, made
        for another model, or of other content: such an entry is removed (logged), and the
        prefill replaces it. One over this service's own size limits is refused (413) and kept.

        Raises:
            MessageTooLarge: the stored message is over this service's limits.
        """
        if not plan.content_addressed or (data := store.get(plan.message_id)) is None:
            return None

        def admit(header: Header) -> None:
            check_readable(header, self.agent)
            if hold is not None:
                hold.take(header.decoded_bytes)

        try:
            message = receive(_slices(data, check), receiver=self.agent.fingerprint,
                              max_bytes=self.config.max_message_bytes,
                              max_decoded_bytes=self.config.max_decoded_bytes, admit=admit)
            check_usable(message, self.agent)
        except ServiceRefusal as error:  # the service's own refusals (its decoded budget is busy) are the answer
            if error.status_code != 422:
                raise
            problem = error.detail
        except MessageTooLarge:  # over this service's limits, not bad: another service sharing the store may read it
            raise
        except WireError as error:
            problem = str(error)
        else:
            if (differs := self._differs(plan, message)) is None:
                return data
            problem = differs
        logger.warning("stored context %s cannot serve (%s); it is removed and prefilled again", plan.message_id,
                       problem)
        store.delete(plan.message_id)  # a kv- address is the service's own: gone even if the prefill is refused
        return None

    def _differs(self, plan: Plan, message: KVMessage) -> str | None:
        """What in ``message`` is not what ``plan`` makes (its content address promises both are
        one): the token ids, the layers shared in full, the mask mode, being a passage, the codec
        (for ``auto``, one of its candidates), no hidden states; None when nothing differs."""
        ids = plan.ids[-plan.passage:] if plan.passage else plan.ids
        held = None if message.token_ids is None else message.token_ids.tolist()
        if held != ids:
            return "it holds other token ids than the context's"
        layers = effective_layers(range(self.agent.num_layers) if plan.layers is None else plan.layers, plan.mode)
        if message.shared_layers != layers:
            return f"it shares layers {message.shared_layers}, not {layers}"
        if message.mode != plan.mode:
            return f"it is in mode {message.mode!r}, not {plan.mode!r}"
        if bool(message.meta.get("passage")) != bool(plan.passage):
            return "it is a passage and the context is not" if plan.passage is None else "it is no passage"
        if message.hidden:
            return "it carries hidden states"
        held_codec = _codec_key(message.codec)
        if isinstance(plan.codec, AutoCodec):
            if held_codec[0] not in plan.codec.candidates:
                return f"its codec {held_codec[0]!r} is none of auto's candidates"
        elif held_codec != (asked := _codec_key(plan.codec)):
            return f"its codec is {held_codec[0]!r}, not {asked[0]!r}"
        return None

    def check_size(self, plan: Plan) -> None:
        """Refuses, before any prefill, a context whose message will be over the size limit for sure
        (exact for the uncompressed codecs; compressing codecs are checked after encoding), or
        whose KV decodes to more than a chat of this service may read (``max_decoded_bytes``)."""
        tokens = plan.passage or len(plan.ids)
        size = raw_payload_bytes(self.agent, plan.codec, plan.layers, tokens, plan.mode)
        if size is not None and size > self.config.max_message_bytes:
            raise MessageTooLarge(f"the context's message would be {size:,} bytes; the service stores at most "
                                  f"{self.config.max_message_bytes:,} (share fewer layers or a smaller codec)")
        self.check_decoded(self.decoded_size(plan.layers, tokens, plan.mode))

    def decoded_size(self, layers: list[int] | None, tokens: int, mode: MaskMode = "causal") -> int:
        """What a message of ``tokens`` tokens sharing ``layers`` decodes to (its KV; token ids aside)."""
        fp = self.agent.fingerprint
        return decoded_bytes(fp["num_kv_heads"], fp["head_dim"], kv_columns(self.agent, layers, tokens, mode))

    def check_decoded(self, size: int) -> None:
        """Refuses a context whose message decodes to ``size`` bytes, more than a chat of this
        service may read: stored, it would be refused by every chat that names it."""
        if size > self.config.max_decoded_bytes:
            raise MessageTooLarge(f"the message decodes to {size:,} bytes; a chat of this service reads at "
                                  f"most {self.config.max_decoded_bytes:,} (share fewer layers or a shorter context)")

    def encode(self, plan: Plan, check: Callable[[], None] | None = None) -> tuple[bytes, KVMessage]:
        """Prefills and encodes (model thread), ``prefill_chunk`` tokens at a time with ``check``
        (the request's deadline) between them; refuses a message over the service's size limit."""
        self.check_size(plan)
        message = encode_ids(self.agent, plan.ids, plan.layers, plan.codec, plan.mode, plan.passage,
                             chunk=self.config.prefill_chunk, check=check)
        data = message.to_bytes()
        if len(data) > self.config.max_message_bytes:
            raise MessageTooLarge(f"the context's message is {len(data):,} bytes; the service stores at most "
                                  f"{self.config.max_message_bytes:,} (share fewer layers or a smaller codec)")
        self.check_decoded(own_header(data).decoded_bytes)  # its token ids counted too
        return data, message
