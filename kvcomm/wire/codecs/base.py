"""The codec interface and registry: a codec turns one layer's keys and values into named tensors.

The message format stores those tensors with safetensors (no pickle, zero-copy readable), so a
codec only decides *what* to store; framing, checksums and size limits live in ``message.py``.
"""

from __future__ import annotations

import json
import math
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, TypeVar

import torch
from pydantic import AfterValidator

from kvcomm.errors import ConfigError, WireError
from kvcomm.registry import Registry, unknown_name

if TYPE_CHECKING:
    from kvcomm.wire.codebook import Codebook
    from kvcomm.wire.message import LayerKV

Tensors = dict[str, torch.Tensor]
PARALLEL_FROM = 1 << 16  # values per tensor from which keys and values decode on two threads (when torch has two)


def prefixed(tensors: Tensors, prefix: str) -> Tensors:
    """The tensors named ``prefix.*``, without the prefix (codecs store keys as ``k.*``, values ``v.*``)."""
    return {name[len(prefix) + 1:]: t for name, t in tensors.items() if name.startswith(f"{prefix}.")}


FLOAT16_MAX = 65504.0


class Codec(ABC):
    """Encodes one layer's keys and values, each ``[H, T, D]`` float32, into named tensors (and
    hidden states ``[T, W]``, which some protocols send too)."""

    name: ClassVar[str]
    entropy_coded: ClassVar[bool] = False  # takes ``coder``: ``rans`` (v8) or an older one (entropy.CODERS)
    # ``decode`` refuses parameters (ranges, steps) that are not finite, and from finite ones only
    # finite keys and values come: the reader then does not check every decoded value again
    finite_by_construction: ClassVar[bool] = False

    def params(self) -> dict[str, Any]:
        """Parameters recorded in the message header (enough to rebuild this codec)."""
        return {}

    def bind(self, codebook: Callable[[], Codebook]) -> Codec:
        """This codec ready to encode for one sender model. ``codebook`` returns that model's saved
        codebook and is called only by codecs that rotate with one (``klt``)."""
        return self

    def for_message(self, layers: Sequence[LayerKV], extent: float, hidden: Mapping[int, torch.Tensor] | None = None,
                    fixed_bytes: int = 0) -> tuple[Codec, dict[str, Any]]:
        """The codec that encodes a message of these layers (and ``hidden`` states, and frames of
        ``fixed_bytes`` no codec changes), whose largest magnitude is ``extent`` (measured once, by
        the writer's checks), and notes for its header's ``meta`` (this codec and none, except for
        codecs that choose one per message: ``auto``)."""
        return self, {}

    @abstractmethod
    def encode(self, keys: torch.Tensor, values: torch.Tensor, layer: int, num_layers: int) -> Tensors:
        """Named tensors that :meth:`decode` turns back into ``(keys, values)``."""

    def largest_value(self) -> float | None:
        """The largest magnitude this codec carries: float16's, where it stores values, ranges or
        steps as float16 (every codec but raw float32 and bfloat16); None: any finite value."""
        return FLOAT16_MAX

    def finite(self, *decoded: torch.Tensor) -> bool:
        """Whether keys or values this codec decoded are finite, as a reader checks them: at no
        cost where the codec's ``decode`` already refused non-finite parameters, else every value."""
        return self.finite_by_construction or all(all_finite(tensor) for tensor in decoded)

    @abstractmethod
    def decode(self, tensors: Tensors, shape: tuple[int, int, int], layer: int,
               num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[H, T, D]`` (float32) from :meth:`encode`'s output.

        Raises:
            KeyError, ValueError, RuntimeError: malformed tensors (the reader turns these into
                :class:`~kvcomm.wire.errors.CorruptMessage`).
        """

    def decoders(self, tensors: Tensors, shape: tuple[int, int, int], layer: int,
                 num_layers: int) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
        """:meth:`decode` in two steps: the tensors are checked now, and two calls return the keys
        and the values. A reader of a whole message checks every layer's tensors on its own thread
        first, then runs all the calls two at a time (:func:`in_two_lanes`), so that codecs whose
        calls run compiled code without the GIL (the entropy coders') decode on both cores with no
        Python between. This default decodes now; such codecs override it, and their
        :meth:`decode` is ``side_by_side(*self.decoders(...), shape)``.

        Raises:
            KeyError, ValueError, RuntimeError: as :meth:`decode` (now, or from a call: a corrupt stream).
        """
        keys, values = self.decode(tensors, shape, layer, num_layers)
        return (lambda: keys), (lambda: values)

    def encode_hidden(self, hidden: torch.Tensor, layer: int, num_layers: int) -> Tensors:
        """Named tensors for a hidden state ``[T, W]`` entering ``layer`` (default: float16)."""
        return {"h": half_or_refuse(hidden, f"the hidden state entering layer {layer}")}

    def decode_hidden(self, tensors: Tensors, shape: tuple[int, int], layer: int, num_layers: int) -> torch.Tensor:
        """The hidden state ``[T, W]`` (float32) from :meth:`encode_hidden`'s output."""
        return tensors["h"].float().reshape(shape)


CODECS: Registry[type[Codec]] = Registry("codec")
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {}


def preset(name: str, codec: str, **params: Any) -> None:
    """Registers a short name users type (``int4``) for a codec with parameters."""
    PRESETS[name] = (codec, params)


def codec_names() -> list[str]:
    """The names users type: every preset (``fp16``, ``int8``, ``klt`` …)."""
    return sorted(PRESETS)


def preset_of(codec: str, params: dict[str, Any]) -> str | None:
    """The name users type for the codec ``codec`` with ``params`` (a header's): ``int8`` for
    ``quant`` with 8 bits in groups of 32; None where no preset is that codec (a message's own
    codebook, ``klt``'s, is not part of the comparison)."""
    def told(given: dict[str, Any]) -> str:
        return json.dumps({k: v for k, v in given.items() if k != "codebook"}, sort_keys=True, default=list)

    wanted = told(params)
    for name in sorted(PRESETS):
        made = make_codec(name)
        if made.name == codec and told(made.params()) == wanted:
            return name
    return None


def known_codec(name: str) -> str:
    """``name`` if it names a codec; else the :func:`make_codec` error (with the nearest name)."""
    make_codec(name)
    return name


CodecName = Annotated[str, AfterValidator(known_codec)]  # an option field that takes a codec name


def make_codec(name: str, **params: Any) -> Codec:
    """A codec from a preset name (``fp16``, ``int8``, ``int4``, ``cachegen``, ``zstd`` …) or a codec
    class name with explicit parameters.

    Raises:
        ConfigError: an unknown name (with the nearest valid one) or parameters the codec does not take.
    """
    if isinstance(name, str) and name in PRESETS:
        codec, defaults = PRESETS[name]
        cls, params = CODECS.get(codec), {**defaults, **params}
    elif isinstance(name, str) and name in CODECS:
        cls = CODECS.get(name)
    else:  # presets and codec classes: two registries, one error
        raise unknown_name("codec", name, codec_names())
    try:
        return cls(**params)
    except TypeError as err:
        raise ConfigError(f"codec {name!r} does not take these parameters: {err}") from None


RANS_SINCE = 5  # the message format version from which entropy-coded codecs use kvcomm's rANS
# what a header's 'rans' was, by version, before today's (version 8: pairs where codes span up to 32 values)
_RANS_UNTIL = {5: "rans-v5", 6: "rans-v6", 7: "rans-v7"}


def header_codec(name: str, params: dict[str, Any], version: int) -> Codec:
    """The codec a message header of format ``version`` names. Entropy-coded codecs of messages
    before version 5 were coded with ``constriction`` (their headers name no coder); a version 5
    header's ``rans`` is two-state rANS, today's ``rans-v5``, a version 6 header's is ``rans-v6``
    (one code to a symbol), and a version 7 header's ``rans-v7`` (pairs where the codes
    span at most 16 values).

    Raises:
        ConfigError: an unknown codec or parameters it does not take (a ``coder`` before v5, or
            a name for a coder that its version did not yet write).
    """
    if name in CODECS and CODECS.get(name).entropy_coded:
        if version < RANS_SINCE:
            if "coder" in params:
                raise ConfigError(f"a version {version} header names no entropy coder")
            params = {**params, "coder": "constriction"}
        elif version in _RANS_UNTIL:
            later = [coder for was_rans_in, coder in _RANS_UNTIL.items() if was_rans_in >= version]
            if params.get("coder") in later:
                raise ConfigError(f"a version {version} header names no coder {params['coder']!r} "
                                  f"(its 'rans' is {_RANS_UNTIL[version]!r})")
            if params.get("coder") == "rans":
                params = {**params, "coder": _RANS_UNTIL[version]}
    return make_codec(name, **params)


def half_or_refuse(hidden: torch.Tensor, what: str) -> torch.Tensor:
    """``hidden`` as float16, refused (not sent as inf) where a value is beyond float16's range."""
    half = hidden.half()
    if not torch.isfinite(half).all():
        raise WireError(f"{what} exceeds float16's range (|x| up to {hidden.abs().max().item():.3g}); "
                        "send it with fp32 or bf16")
    return half


def value_range(tensor: torch.Tensor) -> tuple[float, float]:
    """``tensor``'s minimum and maximum (NaN propagates through both; ``(0, 0)`` when empty). Two
    reductions in numpy, on the caller's thread: ~13x faster here than ``isfinite(t).all()``, which
    materialises a mask, and unlike a torch reduction it leaves no OpenMP worker spinning on the
    other core while a decoding thread needs it."""
    if tensor.numel() == 0:
        return 0.0, 0.0
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.float()
    values = tensor.detach().numpy()
    return float(values.min()), float(values.max())


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN and no infinity in ``tensor``: its minimum and maximum are finite."""
    low, high = value_range(tensor)
    return math.isfinite(low) and math.isfinite(high)

@cache
def _helper() -> ThreadPoolExecutor:
    """One helper thread per process: decodes a layer's keys while the caller decodes its values."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcomm-decode")


_lane = threading.local()  # set while a thread runs one lane of :func:`in_two_lanes`
T = TypeVar("T")


def _second_thread(values: int) -> bool:
    """Whether work writing ``values`` per tensor goes to two threads: torch has two, the work is
    at least :data:`PARALLEL_FROM` values, and this thread is not already a lane."""
    return not getattr(_lane, "active", False) and torch.get_num_threads() >= 2 and values >= PARALLEL_FROM


def side_by_side(keys: Callable[[], torch.Tensor], values: Callable[[], torch.Tensor],
                 shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys(), values())``, the two on two threads when torch has two and the layer is large
    (``shape`` ``[H, T, D]`` of at least :data:`PARALLEL_FROM` values). For calls that run compiled
    code without the GIL (the entropy coders' and dequantisers' kernels): whatever Python they
    would run is done before, on the caller's thread, so that neither thread waits for the GIL.
    Inside a lane of :func:`in_two_lanes` both run on the lane's thread. Where both fail, the keys'
    error is raised, as on one thread."""
    if not _second_thread(math.prod(shape)):
        return keys(), values()
    pending = _helper().submit(keys)
    try:
        decoded = values()
    except Exception:
        keys() if pending.cancel() else pending.result()  # the keys' own error first
        raise
    if pending.cancel():  # the helper was busy with other work: decode the keys here
        return keys(), decoded
    return pending.result(), decoded


def in_two_lanes(jobs: list[Callable[[], T]], values: int) -> list[T]:
    """Every job's result, in order, the jobs run by two lanes (the caller and the helper thread)
    that take the next job from one queue, when torch has two threads and the largest job writes
    at least :data:`PARALLEL_FROM` values per tensor (``values``; below it, both lanes would
    mostly run Python and take the GIL from each other); otherwise one after the other on the
    caller's thread. ``jobs`` is emptied: what a job holds is freed once it has run.

    For whole messages, whose layers are all at hand: the jobs are the codec's calls for every
    layer's keys and values (:meth:`Codec.decoders`), their Python (payloads' tensors, checks)
    already run on the caller's thread, so that for the entropy coders both lanes run compiled
    code without the GIL. Inside a lane, :func:`side_by_side` runs on the lane's thread.
    If the helper is busy with other work, the caller runs every job itself. The first failing
    job in order raises its own error, once the jobs before it have run; later ones are skipped.
    """
    queue = deque(enumerate(jobs))
    count = len(jobs)
    jobs.clear()
    if count < 2 or not _second_thread(values):
        return [queue.popleft()[1]() for _ in range(count)]
    results: list[T | None] = [None] * count
    errors: dict[int, Exception] = {}
    guard = threading.Lock()

    def lane() -> None:
        _lane.active = True
        try:
            while True:
                try:
                    index, job = queue.popleft()
                except IndexError:
                    return
                with guard:
                    if errors and index > min(errors):
                        continue  # an earlier job failed: this one's result would not be used
                try:
                    results[index] = job()
                except Exception as err:  # raised below, once every job before it has run
                    with guard:
                        errors[index] = err
                del job
        finally:
            _lane.active = False

    theirs = _helper().submit(lane)
    lane()
    if not theirs.cancel():  # it started: wait for its last job
        theirs.result()
    if errors:
        raise errors[min(errors)]
    return results  # type: ignore[return-value]
