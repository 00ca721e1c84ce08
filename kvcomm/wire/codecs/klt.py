"""Transform coding: rotate each head into its principal axes, quantise uniformly, entropy-code.

After the rotation (a :class:`~kvcomm.wire.codebook.Codebook` basis, around the codebook's mean) a
few components carry nearly all of a head's energy. One uniform step per head, ``step`` times the
RMS of its coefficients, then gives large components many levels and small ones a single zero
code, the reverse water-filling that minimises squared error at a given rate; the codes are
ANS-coded with a Laplace model whose scale per component travels as one byte, so no histogram is
sent (format version 5 on: kvcomm's table-driven rANS, one table per scale byte; before:
``constriction``'s per-symbol Laplace model, still decoded). The first token (the attention sink,
an outlier) travels apart, as int8 with a float16 scale per head.

Contexts of a few dozen tokens are common between agents, so the fixed cost per layer is kept
small: four tensors per shared layer and two per sink-only layer.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from kvcomm.errors import ConfigError, WireError
from kvcomm.wire.codebook import Codebook, arrived, carried, load_codebook
from kvcomm.wire.codecs.base import CODECS, FLOAT16_MAX, Codec, Tensors, prefixed, preset, side_by_side
from kvcomm.wire.codecs.entropy import Coder, check_coder, laplace_decode, laplace_encode, stream_words
from kvcomm.wire.codecs.quant import dequantize_hidden, quantize_hidden
from kvcomm.wire.codecs.rans import LaplaceTables, laplace_tables

MIN_SCALE = 0.05  # Laplace scale floor (in steps): components that are all zero still cost ~0 bits
HIDDEN_GROUP = 128  # tokens per range of a hidden state's 8-bit codes (per channel)
SCALE_LEVELS = 16  # a scale byte q means MIN_SCALE * 2 ** (q / 16): 4.4% apart, up to ~3,000 steps


def _scales(levels: torch.Tensor) -> np.ndarray:
    return MIN_SCALE * np.exp2(levels.numpy().astype(np.float64) / SCALE_LEVELS)


LEVEL_SCALES = tuple(_scales(torch.arange(256, dtype=torch.uint8)).tolist())  # one table each (rANS)


def _tables() -> LaplaceTables:
    return laplace_tables(LEVEL_SCALES)


def transform_codes(rest: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor,
                    step: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What is entropy-coded for tokens ``[H, T, D]`` (all but the sink): each head's step (float16
    ``[H]``), the integer codes (``[H, T, D]``) and one Laplace scale level per component (uint8
    ``[H, D]``)."""
    coefficients = (rest.float() - mean[:, None]) @ basis
    steps = (step * coefficients.pow(2).mean(dim=(1, 2)).sqrt()).clamp(1e-6, FLOAT16_MAX).half()  # finite
    codes = (coefficients / steps.float()[:, None, None]).round().to(torch.int64)
    spread = codes.abs().float().mean(dim=1).clamp(min=MIN_SCALE)
    levels = (torch.log2(spread / MIN_SCALE) * SCALE_LEVELS).round().clamp(0, 255).to(torch.uint8)
    return steps, codes, levels


def transform_encode(x: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor, step: float,
                     coder: Coder = "rans") -> Tensors:
    """One layer's keys or values ``[H, T, D]`` -> ``first`` (int8 ``[H, D]``) and ``side`` (float16
    ``[H, 1]``: its scale; ``[H, 2]``: its scale and the step) and, if ``T > 1``, ``scale`` (uint8
    ``[H, D]``, one Laplace scale level per component) and ``codes`` (rANS: int16, the stream's
    words; ``constriction``: int32, the lowest and highest code, then the stream)."""
    if basis.shape != (x.shape[0], x.shape[2], x.shape[2]) or mean.shape != (x.shape[0], x.shape[2]):
        raise WireError(f"codebook basis {tuple(basis.shape)} does not fit KV of shape {tuple(x.shape)}")
    first_scale = (x[:, 0].abs().amax(dim=-1) / 127).half().clamp(min=2 ** -24)  # > 0 once in float16
    first = (x[:, 0] / first_scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    if x.shape[1] == 1:
        return {"first": first, "side": first_scale[:, None]}
    steps, codes, levels = transform_codes(x[:, 1:], basis, mean, step)
    side = {"first": first, "side": torch.stack([first_scale, steps], dim=1), "scale": levels}
    if coder != "constriction":
        words = _tables().encode(codes.numpy(), np.broadcast_to(levels.numpy()[:, None], codes.shape))
        return {**side, "codes": torch.from_numpy(words.view(np.int16))}
    low, high, stream = laplace_encode(codes.numpy(), np.broadcast_to(_scales(levels)[:, None], codes.shape))
    return {**side, "codes": torch.from_numpy(np.concatenate([np.array([low, high], dtype=np.int32),
                                                              stream.view(np.int32)]))}


def transform_decode(t: Tensors, basis: torch.Tensor, mean: torch.Tensor, shape: tuple[int, int, int],
                     coder: Coder = "rans") -> torch.Tensor:
    """Inverse of :func:`transform_encode` for KV of ``shape``."""
    heads, tokens, dim = shape
    if basis.shape != (heads, dim, dim) or mean.shape != (heads, dim):
        raise ValueError(f"codebook basis {tuple(basis.shape)} does not fit KV of shape {shape}")
    side = t["side"].float()
    if t["first"].dtype != torch.int8 or t["first"].shape != (heads, dim) or side.shape != (heads, 1 + (tokens > 1)):
        raise ValueError("transform-coded first token or side tensor has the wrong type or shape")
    first = (t["first"].float() * side[:, :1])[:, None]
    if tokens == 1:
        return first
    if t["scale"].dtype != torch.uint8 or t["scale"].shape != (heads, dim) or t["codes"].numel() < 2:
        raise ValueError("transform-coded scales or codes have the wrong type or shape")
    if coder != "constriction":
        levels = np.broadcast_to(t["scale"].numpy()[:, None], (heads, tokens - 1, dim))
        codes = _tables().decode(stream_words(t["codes"], coder), levels)
    else:
        words = stream_words(t["codes"], "constriction")
        codes = laplace_decode(int(t["codes"][0]), int(t["codes"][1]),
                               np.broadcast_to(_scales(t["scale"])[:, None], (heads, tokens - 1, dim)), words[2:])
    rest = torch.baddbmm(mean[:, None], torch.from_numpy(codes).float(), basis.transpose(1, 2) * side[:, 1, None, None])
    return torch.cat([first, rest], dim=1)


@CODECS.register("klt")
class KLTCodec(Codec):
    """Principal-axis transform (from a codebook), one uniform step per head, Laplace ANS coding.

    Args:
        step: quantisation step as a fraction of each head's coefficient RMS (smaller = finer).
        codebook: id of the :class:`~kvcomm.wire.codebook.Codebook` to rotate with; a sender
            leaves it unset and kvcomm binds its model's codebook (:meth:`Codec.bind`).
        coder: the entropy coder: ``rans`` (format version 8; ``rans-v7``, ``rans-v6`` and
            ``rans-v5``, versions 7, 6 and 5, code klt's Laplace streams alike) or ``constriction``
            (before).
    """

    name = "klt"
    entropy_coded = True

    def __init__(self, step: float = 0.5, codebook: str | None = None, coder: str = "rans") -> None:
        if not 0 < step <= 16:
            raise ConfigError("klt step must be in (0, 16]")
        if codebook is not None and not (isinstance(codebook, str) and len(codebook) == 16
                                         and all(c in "0123456789abcdef" for c in codebook)):
            raise ConfigError("klt codebook must be a 16-hex-digit codebook id")
        self.step, self.codebook, self.coder = float(step), codebook, check_coder(coder)

    def params(self) -> dict[str, Any]:
        return {"step": self.step, "codebook": self.codebook, "coder": self.coder}

    def bind(self, codebook: Callable[[], Codebook]) -> KLTCodec:
        return self if self.codebook is not None else KLTCodec(self.step, codebook().id, self.coder)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (to a cluster's workers), the codec carries its codebook, which a worker on another
        machine does not have."""
        book = carried(self.codebook) if self.codebook is not None else None
        return _klt_arriving, (self.step, self.codebook, self.coder, book)

    def _book(self, num_layers: int) -> Codebook:
        if self.codebook is None:
            raise ConfigError("the klt codec needs a codebook: encode through kvcomm (which binds the sender "
                              "model's codebook) or pass codebook=<id>")
        book = load_codebook(self.codebook)
        if len(book.keys) != num_layers:
            raise WireError(f"codebook {self.codebook} has {len(book.keys)} layers, the message {num_layers}")
        return book

    def encode(self, keys: torch.Tensor, values: torch.Tensor, layer: int, num_layers: int) -> Tensors:
        book = self._book(num_layers)
        k = transform_encode(keys, book.keys[layer], book.key_means[layer], self.step, self.coder)
        v = transform_encode(values, book.values[layer], book.value_means[layer], self.step, self.coder)
        return {**{f"k.{n}": t for n, t in k.items()}, **{f"v.{n}": t for n, t in v.items()}}

    def decode(self, tensors: Tensors, shape: tuple[int, int, int], layer: int,
               num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        return side_by_side(*self.decoders(tensors, shape, layer, num_layers), shape)

    def decoders(self, tensors: Tensors, shape: tuple[int, int, int], layer: int,
                 num_layers: int) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
        book = self._book(num_layers)  # the checks run in the calls, beside the transform's torch work
        return (partial(transform_decode, prefixed(tensors, "k"), book.keys[layer], book.key_means[layer], shape,
                        self.coder),
                partial(transform_decode, prefixed(tensors, "v"), book.values[layer], book.value_means[layer], shape,
                        self.coder))

    def encode_hidden(self, hidden: torch.Tensor, layer: int, num_layers: int) -> Tensors:
        """Codebooks hold KV bases only: a hidden state travels as 8-bit codes per channel, ANS-coded."""
        return quantize_hidden(hidden, 8, HIDDEN_GROUP, True, self.coder)

    def decode_hidden(self, tensors: Tensors, shape: tuple[int, int], layer: int, num_layers: int) -> torch.Tensor:
        return dequantize_hidden(tensors, 8, HIDDEN_GROUP, shape, self.coder)


preset("klt", "klt", step=0.5)
preset("klt-coarse", "klt", step=0.8)


def _klt_arriving(step: float, codebook: str | None, coder: str, book: bytes | None) -> KLTCodec:
    """An unpickled :class:`KLTCodec`, its carried codebook saved here first."""
    if book is not None and codebook is not None:
        arrived(book, codebook)
    return KLTCodec(step, codebook, coder)
