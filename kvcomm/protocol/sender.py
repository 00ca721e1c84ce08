"""The sender's side: one prefill over its chat-formatted message, keeping every layer's KV."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from kvcomm.protocol.layout import AttentionLayout
from kvcomm.protocol.rope import inverse_frequencies, rotate_keys


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
    model: PreTrainedModel, tokens: torch.Tensor, valid: torch.Tensor, cache: DynamicCache,
    layout: AttentionLayout, head: bool = True, logits_to_keep: int = 0, hidden_states: bool = False,
) -> Any:
    """One forward step of ``model`` over new own tokens, masked by ``layout``.

    Args:
        tokens: ids ``[B, T]``, or input embeddings ``[B, T, H]`` (CIPHER's vectors).
        head: run the language-model head (its output has ``logits``, the last ``logits_to_keep``
            positions or all if 0); prefill-only callers skip it.
        hidden_states: also return every layer's hidden states.
    """
    position_ids = layout.append(valid)
    inputs = {"inputs_embeds": tokens} if tokens.is_floating_point() else {"input_ids": tokens}
    kwargs = dict(position_ids=position_ids, past_key_values=cache, use_cache=True, kvcomm_layout=layout,
                  output_hidden_states=hidden_states, **inputs)
    if head:
        return model(logits_to_keep=logits_to_keep, **kwargs)
    return model.get_decoder()(**kwargs)


@torch.inference_mode()
def prefill(model: PreTrainedModel, input_ids: torch.Tensor, valid: torch.Tensor) -> SenderKV:
    """Runs the sender once over its (left-padded) messages and returns every layer's KV."""
    num_layers = model.config.get_text_config().num_hidden_layers
    layout = AttentionLayout.empty(num_layers, input_ids.shape[0], input_ids.device)
    cache = DynamicCache()
    run_body(model, input_ids, valid, cache, layout, head=False)
    return SenderKV(
        keys=[layer.keys for layer in cache.layers],
        values=[layer.values for layer in cache.layers],
        positions=layout.own_pos,
        valid=layout.own_valid,
    )


def follow_on_keys(model: PreTrainedModel, layer: int, keys: Sequence[torch.Tensor],
                   offsets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Parts' keys ``[B, H, T_i, D]`` (each prefilled from position 0) concatenated along tokens,
    part ``i`` re-rotated by ``offsets[i]`` (``[B]``) so that its positions follow the earlier parts'."""
    return torch.cat([rotate_keys(k, o, inverse_frequencies(model, layer)) if bool(o.any()) else k
                      for k, o in zip(keys, offsets)], dim=2)


def merge_senders(model: PreTrainedModel, senders: Sequence[SenderKV]) -> SenderKV:
    """Several senders' KV as one context, in order, with consistent positions.

    Each sender prefilled its own context from position 0; every later sender's keys are
    re-rotated so that its positions follow the earlier senders' (the reference code leaves them
    overlapping). Padding may then sit between senders; masks only look at validity.
    """
    if len(senders) == 1:
        return senders[0]
    offsets = [torch.zeros_like(senders[0].context_len)]
    for sender in senders[:-1]:
        offsets.append(offsets[-1] + sender.context_len)
    return SenderKV(
        keys=[follow_on_keys(model, layer, [s.keys[layer] for s in senders], offsets)
              for layer in range(senders[0].num_layers)],
        values=[torch.cat([s.values[layer] for s in senders], dim=2) for layer in range(senders[0].num_layers)],
        positions=torch.cat([s.positions + o[:, None] for s, o in zip(senders, offsets)], dim=1),
        valid=torch.cat([s.valid for s in senders], dim=1),
    )
