"""The codec interface and registry: a codec turns one layer's keys and values into named tensors.

The message format stores those tensors with safetensors (no pickle, zero-copy readable), so a
codec only decides *what* to store; framing, checksums and size limits live in ``message.py``.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import torch
from pydantic import AfterValidator

from kvcomm.errors import ConfigError, WireError
from kvcomm.registry import Registry

if TYPE_CHECKING:
    from kvcomm.wire.codebook import Codebook
    from kvcomm.wire.message import LayerKV

Tensors = dict[str, torch.Tensor]


def prefixed(tensors: Tensors, prefix: str) -> Tensors:
    """The tensors named ``prefix.*``, without the prefix (codecs store keys as ``k.*``, values ``v.*``)."""
    return {name[len(prefix) + 1:]: t for name, t in tensors.items() if name.startswith(f"{prefix}.")}


class Codec(ABC):
    """Encodes one layer's keys and values, each ``[H, T, D]`` float32, into named tensors (and
    hidden states ``[T, W]``, which some protocols send too)."""

    name: ClassVar[str]
    entropy_coded: ClassVar[bool] = False  # takes ``coder`` (``rans``, or ``constriction`` before format v5)

    def params(self) -> dict[str, Any]:
        """Parameters recorded in the message header (enough to rebuild this codec)."""
        return {}

    def bind(self, codebook: Callable[[], Codebook]) -> Codec:
        """This codec ready to encode for one sender model. ``codebook`` returns that model's saved
        codebook and is called only by codecs that rotate with one (``klt``)."""
        return self

    def for_message(self, layers: Sequence[LayerKV]) -> tuple[Codec, dict[str, Any]]:
        """The codec that encodes a message of these layers, and notes for its header's ``meta``
        (this codec and none, except for codecs that choose one per message: ``auto``)."""
        return self, {}

    @abstractmethod
    def encode(self, keys: torch.Tensor, values: torch.Tensor, layer: int, num_layers: int) -> Tensors:
        """Named tensors that :meth:`decode` turns back into ``(keys, values)``."""

    @abstractmethod
    def decode(self, tensors: Tensors, shape: tuple[int, int, int], layer: int,
               num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[H, T, D]`` (float32) from :meth:`encode`'s output.

        Raises:
            KeyError, ValueError, RuntimeError: malformed tensors (the reader turns these into
                :class:`~kvcomm.wire.errors.CorruptMessage`).
        """

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
    if name in PRESETS:
        codec, defaults = PRESETS[name]
        cls, params = CODECS.get(codec), {**defaults, **params}
    elif name in CODECS:
        cls = CODECS.get(name)
    else:
        close = difflib.get_close_matches(name, codec_names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown codec {name!r}.{hint} Valid: {', '.join(codec_names())}")
    try:
        return cls(**params)
    except TypeError as err:
        raise ConfigError(f"codec {name!r} does not take these parameters: {err}") from None


RANS_SINCE = 5  # the message format version from which entropy-coded codecs use kvcomm's rANS


def header_codec(name: str, params: dict[str, Any], version: int) -> Codec:
    """The codec a message header of format ``version`` names. Entropy-coded codecs of messages
    before version 5 were coded with ``constriction`` (their headers name no coder).

    Raises:
        ConfigError: an unknown codec or parameters it does not take (a ``coder`` before v5).
    """
    if version < RANS_SINCE and name in CODECS and CODECS.get(name).entropy_coded:
        if "coder" in params:
            raise ConfigError(f"a version {version} header names no entropy coder")
        params = {**params, "coder": "constriction"}
    return make_codec(name, **params)


def half_or_refuse(hidden: torch.Tensor, what: str) -> torch.Tensor:
    """``hidden`` as float16, refused (not sent as inf) where a value is beyond float16's range."""
    half = hidden.half()
    if not torch.isfinite(half).all():
        raise WireError(f"{what} exceeds float16's range (|x| up to {hidden.abs().max().item():.3g}); "
                        "send it with fp32 or bf16")
    return half


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN and no infinity in ``tensor``: its minimum and maximum are finite (NaN propagates
    through both). One fused reduction, ~13x faster here than ``isfinite(t).all()``, which
    materialises a mask."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))
