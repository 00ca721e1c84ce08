"""A CacheGen-style codec: delta coding within token groups, depth-dependent bits, entropy coding.

Following CacheGen (SIGCOMM '24): neighbouring tokens' KV are similar, so within each group of
``group`` tokens the first token (the anchor) is stored with 8-bit codes and the others as
deltas from the *reconstructed* anchor; shallow layers matter more, so deltas get ``bits[0]``,
``bits[1]`` or ``bits[2]`` bits in the first, middle and last third of the stack; the delta codes
are then entropy-coded (asymmetric numeral systems from ``constriction``) with a per-layer,
per-tensor symbol model that travels with the payload.
"""

from __future__ import annotations

from typing import Any

import constriction
import numpy as np
import torch

from kvcomm.wire.codecs.base import CODECS, Codec, Tensors, preset
from kvcomm.wire.codecs.quant import dequantize, quantize


def _entropy_encode(symbols: np.ndarray, alphabet: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(symbols, minlength=alphabet).astype(np.int64)
    coder = constriction.stream.stack.AnsCoder()
    if symbols.size:
        model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
        coder.encode_reverse(symbols.astype(np.int32), model)
    return counts, coder.get_compressed()


def _entropy_decode(counts: np.ndarray, stream: np.ndarray, size: int) -> np.ndarray:
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    if counts.sum() != size or (counts < 0).any():
        raise ValueError("symbol counts do not match the number of coded symbols")
    model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
    symbols = constriction.stream.stack.AnsCoder(stream.astype(np.uint32)).decode(model, size)
    if not np.array_equal(np.bincount(symbols, minlength=counts.size), counts):
        raise ValueError("entropy-coded stream does not decode to its declared symbols")
    return symbols.astype(np.int64)


@CODECS.register("cachegen")
class CacheGenCodec(Codec):
    """Anchor + delta coding in token groups, layer-wise bits, ANS entropy coding."""

    name = "cachegen"

    def __init__(self, group: int = 10, bits: tuple[int, int, int] | list[int] = (6, 5, 4)) -> None:
        if group < 2 or len(bits) != 3 or not all(2 <= b <= 8 for b in bits):
            raise ValueError("cachegen needs group >= 2 and three bit widths in 2..8")
        self.group, self.bits = group, tuple(int(b) for b in bits)

    def params(self) -> dict[str, Any]:
        return {"group": self.group, "bits": list(self.bits)}

    def _bits(self, layer: int, num_layers: int) -> int:
        return self.bits[min(2, 3 * layer // max(num_layers, 1))]

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[H, T, D] -> anchors [H, G, D] and a map from each token to its anchor."""
        index = torch.arange(x.shape[1]) // self.group
        return x[:, :: self.group], index

    def encode(self, keys: torch.Tensor, values: torch.Tensor, layer: int, num_layers: int) -> Tensors:
        bits = self._bits(layer, num_layers)
        out: Tensors = {}
        for name, x in (("k", keys.float()), ("v", values.float())):
            anchors, index = self._split(x)
            coded = quantize(anchors, 8, dim=1, group=max(anchors.shape[1], 1))  # per channel
            anchors = dequantize(coded, 8, 1, max(anchors.shape[1], 1), tuple(anchors.shape))
            delta = x - anchors[:, index]
            is_delta = torch.arange(x.shape[1]) % self.group != 0
            delta = delta[:, is_delta]  # [H, T - G, D]
            levels = (1 << (bits - 1)) - 1
            largest = delta.abs().amax(dim=1) if delta.shape[1] else torch.zeros(x.shape[0], x.shape[2])
            step = (largest / max(levels, 1)).clamp(min=1e-6).half()  # per channel [H, D]
            codes = (delta / step.float()[:, None]).round().clamp(-levels, levels).long() + levels
            counts, stream = _entropy_encode(codes.flatten().numpy(), 2 * levels + 1)
            out.update({f"{name}.anchor.{n}": t for n, t in coded.items()})
            out[f"{name}.step"] = step
            out[f"{name}.counts"] = torch.from_numpy(counts.astype(np.int32))
            out[f"{name}.stream"] = torch.from_numpy(stream.view(np.int32).copy())
        return out

    def decode(self, tensors: Tensors, shape: tuple[int, int, int], layer: int,
               num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        heads, length, dim = shape
        bits = self._bits(layer, num_layers)
        levels = (1 << (bits - 1)) - 1
        n_anchors = -(-length // self.group)
        is_delta = torch.arange(length) % self.group != 0
        result = []
        for name in ("k", "v"):
            coded = {n: tensors[f"{name}.anchor.{n}"] for n in ("q", "low", "scale")}
            anchors = dequantize(coded, 8, 1, max(n_anchors, 1), (heads, n_anchors, dim))
            counts = tensors[f"{name}.counts"].numpy().astype(np.int64)
            if counts.size != 2 * levels + 1:
                raise ValueError("symbol table has the wrong size for this layer's bit width")
            size = heads * int(is_delta.sum()) * dim
            codes = _entropy_decode(counts, tensors[f"{name}.stream"].numpy().view(np.uint32), size)
            delta = (torch.from_numpy(codes) - levels).float().view(heads, -1, dim)
            x = anchors[:, torch.arange(length) // self.group].clone()
            x[:, is_delta] += delta * tensors[f"{name}.step"].float()[:, None]
            result.append(x)
        return result[0], result[1]


preset("cachegen", "cachegen", group=10, bits=(6, 5, 4))
