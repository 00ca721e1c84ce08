"""The sender's side: one prefill over its chat-formatted message, keeping every layer's KV."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from kvcomm.protocol.layout import AttentionLayout


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads token id lists into ``ids [B, T]`` and ``valid [B, T]`` (False on padding)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            valid[row, width - len(seq):] = True
    return ids, valid


@dataclass
class SenderKV:
    """Per-layer keys and values of a batch of sender contexts (left-padded).

    Attributes:
        keys: per layer ``[B, Hkv, C, D]``, after RoPE at positions 0..|C|-1 of each row.
        values: per layer ``[B, Hkv, C, D]``.
        positions: ``[B, C]`` RoPE position of each column.
        valid: ``[B, C]`` False on padding columns.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor
    valid: torch.Tensor

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def context_len(self) -> torch.Tensor:
        """``[B]`` number of real context tokens per row (|C|)."""
        return self.valid.sum(dim=1)

    def token_bytes(self, layer: int) -> int:
        """Bytes of one token's key and value at ``layer``."""
        k = self.keys[layer]
        return 2 * k.shape[1] * k.shape[3] * k.element_size()


def run_body(
    model: PreTrainedModel, input_ids: torch.Tensor, valid: torch.Tensor,
    cache: DynamicCache, layout: AttentionLayout, with_logits: bool, logits_to_keep: int = 0,
) -> torch.Tensor | None:
    """One forward step of ``model`` over new own tokens, masked by ``layout``.

    Returns logits ``[B, T', V]`` when ``with_logits`` (the last ``logits_to_keep`` positions, all
    if 0); otherwise skips the language-model head, which prefill-only callers do not need.
    """
    position_ids = layout.append(valid)
    kwargs = dict(position_ids=position_ids, past_key_values=cache, use_cache=True, kvcomm_layout=layout)
    if with_logits:
        return model(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs).logits
    model.get_decoder()(input_ids=input_ids, **kwargs)
    return None


@torch.inference_mode()
def prefill(model: PreTrainedModel, input_ids: torch.Tensor, valid: torch.Tensor) -> SenderKV:
    """Runs the sender once over its (left-padded) messages and returns every layer's KV."""
    num_layers = model.config.get_text_config().num_hidden_layers
    layout = AttentionLayout.empty(num_layers, input_ids.shape[0], input_ids.device)
    cache = DynamicCache()
    run_body(model, input_ids, valid, cache, layout, with_logits=False)
    return SenderKV(
        keys=[layer.keys for layer in cache.layers],
        values=[layer.values for layer in cache.layers],
        positions=layout.own_pos,
        valid=layout.own_valid,
    )
