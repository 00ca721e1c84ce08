"""Attention importance: how much the receiver's prompt attends to the sender's context, per layer."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from kvcomm.protocol.layout import ImportanceRecorder
from kvcomm.protocol.receiver import build_receiver_input
from kvcomm.protocol.sender import SenderKV, run_body


@torch.inference_mode()
def attention_importance(
    model: PreTrainedModel, sender: SenderKV, input_ids: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Per-row, per-layer importance ``[B, L]``: receiver prefill attention mass on the context.

    All layers are shared (as in the reference calibration); nothing is generated, and the
    language-model head is skipped.
    """
    start = build_receiver_input(model, sender, range(sender.num_layers))
    start.layout.recorder = ImportanceRecorder()
    run_body(model, input_ids, valid, start.cache, start.layout, head=False)
    scores = start.layout.recorder.scores
    return torch.stack([scores[layer] for layer in range(sender.num_layers)], dim=1)
