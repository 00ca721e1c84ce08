"""Re-rotating cached keys to new RoPE positions.

Keys are cached after RoPE. Because RoPE is a rotation whose angle is linear in the position,
moving a key from position p to p + delta is one more rotation by delta: no need for the
pre-RoPE key. KVComm-S uses it to move the sink next to the receiver's tokens.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def inverse_frequencies(model: PreTrainedModel, layer: int) -> torch.Tensor:
    """The RoPE inverse frequencies ``[D_rot/2]`` that ``layer`` of ``model`` uses."""
    rotary = model.get_decoder().rotary_emb
    if hasattr(rotary, "inv_freq"):
        return rotary.inv_freq
    layer_type = model.config.get_text_config().layer_types[layer]  # e.g. Gemma3: local/global RoPE
    return getattr(rotary, f"{layer_type}_inv_freq")


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Moves post-RoPE keys ``[B, H, K, D]`` by ``delta`` positions (``[B]``, one shift per row).

    Uses the half-split layout of transformers' ``rotate_half``; with partial rotary embeddings
    only the first ``2 * len(inv_freq)`` channels rotate.
    """
    rot = 2 * inv_freq.shape[0]
    angles = delta.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]  # [B, D_rot/2]
    emb = torch.cat([angles, angles], dim=-1)[:, None, None, :]  # [B, 1, 1, D_rot]
    cos, sin = emb.cos().to(keys.dtype), emb.sin().to(keys.dtype)
    head, tail = keys[..., :rot], keys[..., rot:]
    half = rot // 2
    rotated_half = torch.cat([-head[..., half:], head[..., :half]], dim=-1)
    return torch.cat([head * cos + rotated_half * sin, tail], dim=-1)
