"""The ``kvcomm`` attention function, registered with transformers' attention registries.

Models run with ``attn_implementation="kvcomm"``. When a forward call carries a
:class:`~kvcomm.protocol.layout.AttentionLayout` (keyword ``kvcomm_layout``), the mask of each
layer comes from that layout; otherwise the function behaves exactly like transformers' SDPA
attention with transformers' own mask, so a model set to ``kvcomm`` stays usable on its own.

The mask registry entry matters: transformers skips mask creation for attention names absent
from ``AttentionMaskInterface``, and SDPA would then run unmasked (see the test named after it).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from kvcomm.errors import ProtocolError
from kvcomm.protocol.layout import AttentionLayout

ATTENTION_NAME = "kvcomm"
REDUCED = (torch.bfloat16, torch.float16)  # dtypes whose one-query steps take `_one_query` (benchmarks switch it off)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, K, D] -> [B, Hkv*groups, K, D] so grouped-query heads line up with query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def kvcomm_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    kvcomm_layout: AttentionLayout | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over ``[received prefix ; own tokens]`` with a per-layer mask.

    Shapes: query ``[B, H, T, D]``, key/value ``[B, Hkv, K, D]``; returns ``[B, T, H, D]``.
    """
    if kvcomm_layout is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            sliding_window=sliding_window, **kwargs,
        )
    if getattr(module, "attn_logit_softcapping", None):
        raise ProtocolError("attention logit soft-capping (e.g. Gemma 2) is not supported by kvcomm attention")
    if kwargs.get("s_aux") is not None:  # before, dropped: the softmax lost its sink logits
        raise ProtocolError("learned attention sinks (e.g. gpt-oss) are not supported by kvcomm attention")
    layer = cast(int, module.layer_idx)
    layout = kvcomm_layout
    query_len = query.shape[2]
    expected = layout.prefix_pos[layer].shape[1] + layout.own_pos.shape[1]
    if key.shape[2] != expected:
        raise ProtocolError(f"layer {layer}: the cache holds {key.shape[2]} keys, its layout describes {expected}")
    mask = layout.mask(layer, query_len, sliding_window)  # [B, 1, T, K]
    groups = query.shape[1] // key.shape[1]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5

    if layout.recorder is not None:
        # Calibration (a prompt's prefill, never a decoding step; a one-token prompt included):
        # materialise this layer's probabilities once, use them for the output too.
        key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
        scores = torch.matmul(query, key.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)  # [B, H, T, K]
        _record_importance(layout, layer, probs)
        out = torch.matmul(probs, value)
    elif query_len == 1 and query.dtype in REDUCED and query.device.type == "cpu":
        out = _one_query(query, key, value, mask, scale)
    else:
        # Grouped heads share keys in place (the same result as repeating them, without the copy).
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


def _one_query(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """A decoding step's attention in float32 for bfloat16/float16 models on CPU: ``[B, H, 1, D]``.

    torch's CPU kernel for scaled-dot-product attention is 5-12x slower on one bfloat16 query
    on this project's machine than these two products in float32 (``docs/results.md``, the
    bfloat16 decoding step), and no more exact against a float64 reference. Each key-value head's
    query heads form the rows of one product, so grouped keys are read in place; keys and values
    are copied to float32 once per call.
    """
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim).float()
    scores = torch.matmul(grouped, key.float().transpose(-1, -2)) * scale  # [B, Hkv, G, K]
    scores = scores.masked_fill(~mask, float("-inf"))  # mask [B, 1, 1, K]
    out = torch.matmul(torch.softmax(scores, dim=-1), value.float())
    return out.to(query.dtype).reshape(batch, heads, 1, dim)


def _record_importance(layout: AttentionLayout, layer: int, probs: torch.Tensor) -> None:
    """Mean over heads and valid queries of the mass on context keys 1..|C|-1 (less the recorder's
    ``kept`` columns); one value per row. Every layer is shared here, so a layer's keys are the
    context's columns."""
    assert layout.recorder is not None
    prefix = layout.prefix_pos[layer].shape[1]
    counted = layout.context_keys(layer)
    if layout.recorder.kept is not None:
        assert layout.recorder.kept.shape == counted.shape, "kept columns are a shared layer's columns"
        counted = counted & ~layout.recorder.kept
    context = counted.to(probs.dtype)  # [B, P]
    mass = (probs[..., :prefix].float() * context[:, None, None, :]).sum(-1)  # [B, H, T]
    mass = torch.nan_to_num(mass.mean(dim=1))  # [B, T]
    queries = layout.own_valid[:, -probs.shape[2]:].float()
    layout.recorder.scores[layer] = (mass * queries).sum(1) / queries.sum(1).clamp(min=1)


def register() -> None:
    """Registers the attention and mask functions under :data:`ATTENTION_NAME` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, kvcomm_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


register()
