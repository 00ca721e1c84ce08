"""Linear layers with a second, oneDNN-packed copy of their weight for few rows.

torch's CPU ``linear`` calls MKL's ``sgemm``, which packs the weight anew on every call and, on
this project's 2-core AMD (AVX2) machine, runs few rows at about half the rate of many: a
decoding step (one row per sequence) or a question of a few dozen tokens pays most. oneDNN packs a
weight once, ahead of time, and its kernels for few rows are faster here (MKL's own pre-packing,
``torch.ops.mkl._mkl_linear``, gained only 1.1–1.2× in a probe). Qwen2.5-Coder-1.5B's 8,960 ×
1,536 product ran 1.3–1.9× faster from 1 to 128 rows, 1.15× at 256 and 0.78× at 1,058, its
151,936-row output layer 1.3–3.1× from 1 to 128 rows (``benchmarks/linear.py``,
``benchmarks/results/linear/linear-qwen.json``; ±20% on this machine). So a packed layer takes
the packed path up to :data:`PACKED_ROWS` rows and torch's own above: it keeps both copies of
the weight, and those layers' memory doubles (for Qwen2.5-Coder-1.5B nearly every weight, +6 GB;
for SmolLM2-135M only the tied output layer, +113 MB).

The packed path is float32 on the CPU and inference only; anything else (another dtype or
device, autograd, a weight replaced or changed in place through the parameter since it was
packed) takes torch's path, so a packed model computes what it computed before wherever the
packed path does not apply. Where it does, values differ from MKL's by rounding (~1e-4
relative), and each row's result does not depend on how many rows share the call (a lone row
is computed as two copies of itself: oneDNN's one-row kernel rounds otherwise, at real sizes).

Packing is for fixed weights. Writes that bypass the parameter's version counter (through
``weight.data``, as peft's ``merge_and_unload`` does, or through a NumPy view) are not seen:
pack a model after such changes, not before. A packed model cannot be deep-copied or pickled
whole (oneDNN's packed tensor has no storage); ``state_dict`` and ``save_pretrained`` hold only
the ordinary parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from kvcomm.errors import ConfigError

Linear = Literal["dense", "packed"]
"""How a model's linear layers run: ``dense`` (torch's) or ``packed`` (a second, oneDNN-packed copy
of each weight, used for products of up to :data:`PACKED_ROWS` rows: :func:`pack_linears`)."""
LINEARS: tuple[str, ...] = get_args(Linear)

PACKED_ROWS = 128
"""Calls with at most this many rows take the packed path (see the module docstring)."""

PACKED_MIN_WEIGHT = 1 << 20
"""Layers with fewer weights than this (4 MiB in float32) stay as they are: MKL's packing of a
small weight is cheap, and packed ones ran slower at one row and no faster at 16–128 (Qwen's
256 × 1,536 key and value layers: 0.13 against 0.06 ms at one row)."""


def packing_available() -> bool:
    """Whether this torch build can pack weights with oneDNN."""
    ops = torch.ops.mkldnn
    return bool(torch.backends.mkldnn.is_available()) and all(
        hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise"))


def require_packing() -> None:
    """Raises ConfigError, saying what to use instead, where :func:`packing_available` is false."""
    if not packing_available():
        raise ConfigError("packed linear layers need a torch build with oneDNN (torch.backends.mkldnn); "
                          "this one has none: use linear='dense'")


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, shared with the layer it replaced) that also holds its
    weight packed by oneDNN and uses it for calls of at most ``rows`` rows."""

    packed: torch.Tensor
    rows: int
    _packed_from: tuple[int, int, torch.dtype]  # the weight packed: its storage, version and dtype
    _packed_source: torch.Tensor  # that weight, kept so that its address stays its own

    @classmethod
    def of(cls, linear: nn.Linear, rows: int = PACKED_ROWS) -> PackedLinear:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight  # the same Parameter: tied weights stay tied
        layer.bias = linear.bias
        layer.rows = rows
        with torch.no_grad():
            layer.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        layer._packed_from = _identity(linear.weight)
        # holds the packed weight's storage: freed, its address could be reused by a replacement (a
        # model converted to bfloat16 and back), which the address in _packed_from would then pass
        layer._packed_source = linear.weight.detach()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(self.in_features, 1)
        if (rows == 0 or rows > self.rows or x.dtype != torch.float32 or x.device.type != "cpu"
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                                 or (self.bias is not None and self.bias.requires_grad)))
                or _identity(self.weight) != self._packed_from):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)
        if rows == 1:  # oneDNN's one-row kernel rounds otherwise than its kernel for several rows
            flat = flat.expand(2, -1)
        bias = None if self.bias is None else self.bias.detach()
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, bias, "none", [], "")
        return out[:rows].reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> PackedLinear:
        """As ``nn.Module``'s (under ``.to()``, ``.half()``, ...); a weight that conversion replaced
        (another dtype or device) lets the packed copy and the float32 weight it holds go: they would
        never be used again, and a packed model converted to bfloat16 kept its float32 weights
        besides."""
        module = super()._apply(fn, recurse)
        if _identity(self.weight) != self._packed_from and self._packed_source.numel():
            self.packed = self._packed_source = torch.empty(0)
            self._packed_from = (-1, -1, torch.float32)  # no weight's: torch's path from now on
        return module

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, packed up to {self.rows} rows"


def _identity(weight: torch.Tensor) -> tuple[int, int, torch.dtype]:
    return weight.data_ptr(), weight._version, weight.dtype


def pack_linears(model: nn.Module, rows: int = PACKED_ROWS, min_weight: int = PACKED_MIN_WEIGHT) -> int:
    """Replaces every float32 CPU ``nn.Linear`` of ``model`` with at least ``min_weight`` weights
    by a :class:`PackedLinear` sharing its parameters; returns how many were replaced.

    Raises:
        ConfigError: this torch build has no oneDNN packing, or ``rows`` < 1.
    """
    if rows < 1:
        raise ConfigError(f"rows must be at least 1, not {rows}")
    require_packing()
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is nn.Linear and child.weight.dtype == torch.float32
                    and child.weight.device.type == "cpu" and child.weight.numel() >= min_weight):
                setattr(parent, name, PackedLinear.of(child, rows))
                replaced += 1
    return replaced
