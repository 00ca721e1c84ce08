"""``auto``: per message, the codec with the lowest expected time to first token at a bandwidth.

What a receiver waits for, codec by codec, is the transfer and its own decoding, and the sender's
encoding where the receiver is waiting on it. Compression only pays where the link is slow: at 10
Mbit/s every byte saved counts, at 1 Gbit/s a codec that decodes at 50 MB/s costs more than the
bytes it saves. ``auto`` measures instead of guessing: with every candidate it encodes and decodes
one frame of each shape the message holds (a shared layer, a sink or opening layer, each hidden
state), as a writer and a reader would (safetensors, frame lengths and checksums, the finiteness
check included), sums bytes and seconds frame by frame (the token ids' frame too: no frame's fixed
cost is scaled away), adds the transfer at the declared bandwidth, drops candidates whose
reconstruction error on the layer with the most tokens is over the quality budget, and encodes the
message with the fastest of the rest.
The header then names the chosen codec (a receiver needs nothing new) and
``meta["codec_choice"]`` says why: every candidate's estimated bytes, seconds and error.

The expected wait follows how messages travel here:
- a streaming receiver (``Client.receive_message``, the service) decodes layer i while layer i+1
  arrives, so over L frames with transfer T and decode D in all it waits
  ``max(T, D) + min(T, D) / L``; with ``streamed=False`` (whole body, then decode) it waits T + D;
- a receiver that computes behind the message (``Client.arriving``: its question's prefill runs
  layer l once layer l is decoded) spends ``receiver_compute_s`` = R of its own on the same CPU
  as the decoding, R / L per layer. The two take turns on the cores while the link runs beside
  them, so with equal frames it waits ``max(T + (D + R) / L, D + R + T / L)`` (the first frame's
  arrival and then all the computing, or the whole transfer and then the last frame's share): a
  codec's decoding is no longer hidden behind the link once the receiver's own computing outlasts
  the transfer. R = 0 gives the line above. Frames are not equal where only some layers are
  shared (the others travel as one-token sink frames), so the wait is computed frame by frame:
  frame k arrives when its share of the bytes has, and the CPU decodes it (its share of D) and
  prefills its layer (R / L) once both the frame and the previous layer's work are done. A
  receiver that prefills only once the message is whole waits T + D + R (``streamed=False``), or
  ``max(T, D) + min(T, D) / L + R`` streamed, the same order of codecs as R = 0: R is for
  receivers that prefill while the layers arrive. It is the receiver's to declare
  (``Client.create_context(..., receiver_compute_s=...)``; rounded to two significant figures, as
  a measured bandwidth is, so that receivers declaring about the same time share one content
  address): the sender cannot know how fast its receiver prefills;
- the sender's encoding counts only with ``count_encode=True`` (a receiver waiting on a message
  encoded on demand). By default it does not: a message is encoded once when it is created
  (``/v1/contexts``, stored, sent ahead) and fetched later, perhaps many times, which is also what
  ``benchmarks/network.py`` times.

The quality budget is a relative L2 reconstruction error (default 0.15): ``klt``'s ~0.10 and
``int4-ans``' ~0.08 showed no measurable score loss in the codec sweeps (``docs/results.md``),
``cachegen``'s ~0.20 and ``int2-ans``' ~0.4 did.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from math import floor, log10
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save as st_save

from kvcomm.errors import ConfigError, MissingCodebook, WireError
from kvcomm.wire.checksum import crc32
from kvcomm.wire.codecs.base import CODECS, PRESETS, Codec, Tensors, make_codec, preset
from kvcomm.wire.header import EXPANSION_SLACK, FRAME_OVERHEAD, MAX_EXPANSION, decoded_bytes
from kvcomm.wire.payload import payload_tensors

if TYPE_CHECKING:
    from kvcomm.wire.codebook import Codebook
    from kvcomm.wire.message import LayerKV

DEFAULT_CANDIDATES = ("fp16", "int8", "int4-ans", "klt")
MIN_BANDWIDTH_MBIT, MAX_BANDWIDTH_MBIT = 1e-6, 1e6  # 1 bit/s to 1 Tbit/s: the transfer's estimate stays finite
WARM_TOKENS = 8  # a first, untimed pass on this many tokens compiles what compiles (numba) and fills caches


def two_figures(value: float) -> float:
    """``value`` rounded to two significant figures (94.37 → 94, 1234 → 1200): what ``auto`` is
    told, so that about the same link or receiver keeps one content address."""
    return round(value, 1 - floor(log10(abs(value)))) if value else 0.0


def rotates_with_codebook(codec: Codec) -> bool:
    """Whether ``codec`` encodes with the sender's codebook: ``klt``, or ``auto`` with it among its candidates."""
    if isinstance(codec, AutoCodec):
        return any(rotates_with_codebook(make_codec(name)) for name in codec.candidates)
    return codec.name == "klt"


@CODECS.register("auto")
class AutoCodec(Codec):
    """Chooses, per message, among ``candidates`` (preset names) the one with the shortest expected
    receiver's wait at ``bandwidth_mbit`` (transfer and decode, overlapped when ``streamed``, plus
    the receiver's own ``receiver_compute_s`` and the encoding if ``count_encode``) whose relative
    error is at most ``max_error``.

    Args:
        bandwidth_mbit: the link's bandwidth in Mbit/s (declared).
        candidates: codec presets to choose from.
        max_error: the quality budget: the largest relative L2 reconstruction error allowed.
        streamed: the receiver decodes each layer as it arrives (True) or after the whole body.
        count_encode: the sender's encoding is part of the receiver's wait (a message encoded on
            demand) rather than done before the message is fetched.
        receiver_compute_s: seconds of the receiver's own computing on the CPU that decodes, run
            layer by layer behind the arriving layers (its question's prefill with
            ``Client.arriving``); 0: the receiver only decodes. Rounded to two significant figures.
    """

    name = "auto"

    def __init__(self, bandwidth_mbit: float = 100.0, candidates: Sequence[str] = DEFAULT_CANDIDATES,
                 max_error: float = 0.15, streamed: bool = True, count_encode: bool = False,
                 receiver_compute_s: float = 0.0) -> None:
        if not MIN_BANDWIDTH_MBIT <= float(bandwidth_mbit) <= MAX_BANDWIDTH_MBIT:
            raise ConfigError(f"auto codec bandwidth_mbit must be in [{MIN_BANDWIDTH_MBIT:g}, {MAX_BANDWIDTH_MBIT:g}] "
                              "Mbit/s")
        if not candidates or any(c not in PRESETS or PRESETS[c][0] == "auto" for c in candidates):
            raise ConfigError(f"auto codec candidates must be codec presets other than auto; got {list(candidates)}")
        if not 0 < float(max_error):
            raise ConfigError("auto codec max_error must be positive")
        self.bandwidth_mbit, self.candidates, self.max_error = float(bandwidth_mbit), list(candidates), float(max_error)
        if not isinstance(streamed, bool) or not isinstance(count_encode, bool):
            raise ConfigError("auto codec streamed and count_encode must be true or false")
        self.streamed, self.count_encode = streamed, count_encode
        if isinstance(receiver_compute_s, bool) or not 0 <= float(receiver_compute_s) <= 3600:
            raise ConfigError("auto codec receiver_compute_s must be in [0, 3600] seconds")
        self.receiver_compute_s = two_figures(float(receiver_compute_s))
        self._codebook: Callable[[], Codebook] | None = None

    def params(self) -> dict[str, Any]:
        # receiver_compute_s only where given: contexts stored before it existed keep their content address
        return {"bandwidth_mbit": self.bandwidth_mbit, "candidates": self.candidates, "max_error": self.max_error,
                "streamed": self.streamed, "count_encode": self.count_encode} | (
                    {"receiver_compute_s": self.receiver_compute_s} if self.receiver_compute_s else {})

    def bind(self, codebook: Callable[[], Codebook]) -> AutoCodec:
        bound = AutoCodec(**self.params())
        bound._codebook = codebook
        return bound

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (to a cluster's workers), the codec carries the codebook it was bound to, made now,
        not the call that makes it (which may hold the run's models); only where a candidate
        rotates with one, and none where this machine cannot make it (as it could not encode)."""
        book = None
        if self._codebook is not None and rotates_with_codebook(self):
            with contextlib.suppress(MissingCodebook):
                book = self._codebook()
        return _auto_arriving, (self.params(), None if book is None else (book.id, book.to_bytes()))

    def largest_value(self) -> float | None:
        """The largest any candidate carries (None where one carries any finite value): ``for_message``
        leaves out the candidates this message's values exceed."""
        carried = [make_codec(name).largest_value() for name in self.candidates]
        return None if None in carried else max(value for value in carried if value is not None)

    def for_message(self, layers: Sequence[LayerKV], extent: float, hidden: Mapping[int, torch.Tensor] | None = None,
                    fixed_bytes: int = 0) -> tuple[Codec, dict[str, Any]]:
        frames = _frame_shapes(layers)
        if not frames:
            raise WireError("auto codec: the message has no layer with tokens to measure")
        sample = frames[max(frames)]
        heads, _, head_dim = sample.keys.shape
        decoded = sum(decoded_bytes(heads, head_dim, int(layer.keys.shape[1])) for layer in layers) + sum(
            4 * state.numel() for state in (hidden or {}).values())  # what readers will hold, in float32
        began = time.perf_counter()
        estimates: dict[str, dict[str, float]] = {}
        codecs: dict[str, Codec] = {}
        for name in self.candidates:
            codec = make_codec(name)
            if (largest := codec.largest_value()) is not None and extent > largest:
                continue  # these values exceed what it stores (float16): not a candidate here
            if self._codebook is not None:
                codec = codec.bind(self._codebook)
            elif name in ("klt", "klt-coarse"):
                continue  # no codebook to rotate with: not a candidate here
            codecs[name] = codec
            by_shape = {tokens: _measure(codec, layer, len(layers)) for tokens, layer in frames.items()}
            travel = [by_shape[int(layer.keys.shape[1])] for layer in layers if layer.keys.shape[1]]
            travel += [_measure_hidden(codec, state, at, len(layers)) for at, state in sorted((hidden or {}).items())]
            if fixed_bytes:
                travel.append({"bytes": fixed_bytes, "encode_seconds": 0.0, "decode_seconds": 0.0, "layer": 0.0})
            if decoded > MAX_EXPANSION * (sum(f["bytes"] - FRAME_OVERHEAD for f in travel)) + EXPANSION_SLACK:
                del codecs[name]  # so few bytes for so much KV that readers would refuse it as a decompression bomb
                continue
            estimates[name] = self._estimate(travel, by_shape[max(frames)]["error"])
        if not estimates:
            raise WireError("auto codec: no candidate can encode this message (klt needs a codebook; float16 "
                            "codecs carry |x| up to 65504; KV so nearly constant that it would encode to "
                            f"under 1/{MAX_EXPANSION} of its size is sent with fp16)")
        within = {n: e for n, e in estimates.items() if e["error"] <= self.max_error}
        if within:
            chosen = min(within, key=lambda n: within[n]["seconds"])
            reason = (f"shortest expected wait ({'encode + ' if self.count_encode else ''}{self._wait_rule()}) at "
                      f"{self.bandwidth_mbit:g} Mbit/s among codecs within relative error {self.max_error:g}")
        else:
            chosen = min(estimates, key=lambda n: estimates[n]["error"])
            reason = f"no candidate within relative error {self.max_error:g}: the most accurate"
        choice = {"chosen": chosen, "reason": reason, "bandwidth_mbit": self.bandwidth_mbit,
                  "max_error": self.max_error, "receiver_compute_s": self.receiver_compute_s,
                  "sample_layer": sample.index,
                  "choice_seconds": round(time.perf_counter() - began, 4), "candidates": estimates}
        return codecs[chosen], {"codec_choice": choice}

    def _wait_rule(self) -> str:
        """The expected wait's formula, as the choice's reason names it."""
        if not self.streamed:
            return "transfer + decode" + (" + receiver compute" if self.receiver_compute_s else "")
        if not self.receiver_compute_s:
            return "each frame arriving, then its decode, in turn"
        return "each frame arriving, then its decode and its layer's share of the receiver compute, in turn"

    def _estimate(self, travel: Sequence[dict[str, float]], error: float) -> dict[str, float]:
        """The message's bytes and seconds, summed over ``travel`` (each frame's measured ``bytes``,
        ``encode_seconds`` and ``decode_seconds``, in the order frames travel; ``layer`` 0 for a
        frame that is no layer's, which the receiver's per-layer computing does not follow), its
        ``error``, and ``seconds``, the receiver's expected wait (see the module's docstring)."""
        size = sum(frame["bytes"] for frame in travel) or 1.0
        transfer = size * 8 / (self.bandwidth_mbit * 1e6)
        decode = sum(frame["decode_seconds"] for frame in travel)
        encode = sum(frame["encode_seconds"] for frame in travel)
        if not self.streamed:
            wait = transfer + decode + self.receiver_compute_s
        else:
            layers = sum(frame.get("layer", 1.0) for frame in travel)  # the receiver computes per layer frame
            per_layer = self.receiver_compute_s / max(layers, 1.0)
            arrived = free = 0.0  # bytes' share in so far; when the receiver's CPU is next free
            for frame in travel:
                arrived += frame["bytes"] / size
                free = max(free, transfer * arrived) + frame["decode_seconds"] + per_layer * frame.get("layer", 1.0)
            wait = free
        return {"bytes": round(size), "encode_seconds": round(encode, 5), "decode_seconds": round(decode, 5),
                "transfer_seconds": round(transfer, 5), "error": round(error, 5),
                "seconds": round(wait + (encode if self.count_encode else 0.0), 5)}

    def encode(self, keys: torch.Tensor, values: torch.Tensor, layer: int, num_layers: int) -> Tensors:
        raise WireError("the auto codec chooses a codec per message: encode through KVMessage")

    def decode(self, tensors: Tensors, shape: tuple[int, int, int], layer: int,
               num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise ValueError("no message is encoded as 'auto': its header names the codec chosen")


def encoded_on_demand(name: str) -> Codec:
    """The codec preset ``name`` for a message its receiver waits on while it is encoded (a reply
    passed on at once: a graph's edge, the service's ``kv_return``): ``auto`` then counts the
    encoding in the wait; any other codec is returned as it is."""
    codec = make_codec(name)
    return AutoCodec(**{**codec.params(), "count_encode": True}) if isinstance(codec, AutoCodec) else codec


def _frame_shapes(layers: Sequence[LayerKV]) -> dict[int, LayerKV]:
    """One layer of each token count the message's frames hold (the first of each; layers left
    out, of no tokens, travel empty): a message has a few (its shared layers, its sinks or opening)."""
    shapes: dict[int, LayerKV] = {}
    for layer in layers:
        if layer.keys.shape[1]:
            shapes.setdefault(int(layer.keys.shape[1]), layer)
    return shapes


def _measure(codec: Codec, layer: LayerKV, num_layers: int) -> dict[str, float]:
    """One layer's frame through ``codec``, as a writer and a reader handle it: its bytes, encode
    and decode seconds, and relative error (after an untimed pass on a few tokens)."""
    keys, values = layer.keys.float(), layer.values.float()
    heads, tokens, dim = keys.shape
    warm = keys[:, :WARM_TOKENS], values[:, :WARM_TOKENS]
    codec.decode(codec.encode(*warm, layer.index, num_layers), (heads, min(tokens, WARM_TOKENS), dim), layer.index,
                 num_layers)
    began = time.perf_counter()
    payload = st_save({name: t.contiguous() for name, t in codec.encode(keys, values, layer.index,
                                                                         num_layers).items()})
    encoded = time.perf_counter()
    # what a reader does per frame: its CRC (the digest, from format v6, covers lengths and CRCs, not the
    # bytes again), the safetensors load, the codec, the finiteness check
    crc32(payload)
    back_keys, back_values = codec.decode(payload_tensors(payload), (heads, tokens, dim), layer.index, num_layers)
    codec.finite(back_keys, back_values)
    decoded = time.perf_counter()
    error = max(((a - b).norm() / a.norm().clamp(min=1e-12)).item()
                for a, b in ((keys, back_keys), (values, back_values)))
    return {"bytes": len(payload) + FRAME_OVERHEAD, "encode_seconds": encoded - began,
            "decode_seconds": decoded - encoded, "error": error}


def _measure_hidden(codec: Codec, hidden: torch.Tensor, layer: int, num_layers: int) -> dict[str, float]:
    """A hidden-state frame through ``codec``: its bytes, encode and decode seconds."""
    began = time.perf_counter()
    payload = st_save({name: t.contiguous() for name, t in codec.encode_hidden(hidden.float(), layer,
                                                                                num_layers).items()})
    encoded = time.perf_counter()
    codec.decode_hidden(payload_tensors(payload), tuple(hidden.shape), layer, num_layers)  # type: ignore[arg-type]
    return {"bytes": len(payload) + FRAME_OVERHEAD, "encode_seconds": encoded - began,
            "decode_seconds": time.perf_counter() - encoded, "layer": 0.0}


preset("auto", "auto", bandwidth_mbit=100.0)


def _auto_arriving(params: dict[str, Any], book: tuple[str, bytes] | None) -> AutoCodec:
    """An unpickled :class:`AutoCodec`, bound to its carried codebook (saved here first)."""
    codec = AutoCodec(**params)
    if book is not None:
        from kvcomm.wire.codebook import arrived, load_codebook

        arrived(book[1], book[0])
        codec._codebook = partial(load_codebook, book[0])
    return codec
