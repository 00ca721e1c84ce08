"""Attention importance: how much the receiver's prompt attends to the sender's context, per layer."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from kvcomm.protocol.layout import ImportanceRecorder
from kvcomm.protocol.receiver import build_receiver_input
from kvcomm.protocol.sender import SenderKV, run_body
from kvcomm.protocol.shared import kept_columns


@torch.inference_mode()
def attention_importance(
    model: PreTrainedModel, sender: SenderKV, input_ids: torch.Tensor, valid: torch.Tensor, opening: int = 0,
) -> torch.Tensor:
    """Per-row, per-layer importance ``[B, L]``: receiver prefill attention mass on the context.

    All layers are shared (as in the reference calibration); nothing is generated, and the
    language-model head is skipped. With ``opening`` (passages: the receiver keeps the first
    ``opening`` columns at every layer), the mass on those columns does not count: sharing a layer
    or not changes only what follows them.
    """
    start = build_receiver_input(model, sender, range(sender.num_layers))
    start.layout.recorder = ImportanceRecorder(kept=kept_columns(sender, opening) if opening else None)
    run_body(model, input_ids, valid, start.cache, start.layout, head=False)
    scores = start.layout.recorder.scores
    return torch.stack([scores[layer] for layer in range(sender.num_layers)], dim=1)
