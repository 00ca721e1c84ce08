"""How well a receiver answers from a set of shared layers, measured without generating.

The receiver's teacher-forced log-likelihood of the gold answer, given the sender's KV at a set of
layers (and the sink elsewhere), is a smooth, cheap stand-in for the score it would get. Many
candidate sets of one item are scored in one batched forward: each row is the same context, and a
layer a row does not share has every context key but the sink masked out, which is exactly a
sink-only layer (the sink keeps position 0; masked keys take no attention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from kvcomm.errors import ConfigError
from kvcomm.protocol import SenderKV, SharedKV, receiver_input, run_body


@dataclass(frozen=True)
class Scored:
    """One calibration item as the likelihood needs it: its sender KV (one row) and token ids."""

    sender: SenderKV
    prompt: list[int]  # the receiver's message, ending with the generation prompt
    answer: list[int]  # the gold answer's tokens, as the receiver would write them


def _masked(sender: SenderKV, layer_sets: Sequence[frozenset[int]]) -> SharedKV:
    """``len(layer_sets)`` rows of ``sender``; at a layer a row does not share, only its sink is valid."""
    rows, layers = len(layer_sets), sender.num_layers
    sink_only = sender.valid & (sender.valid.cumsum(dim=1) == 1)  # [1, C]: the first real token
    valid = []
    for layer in range(layers):
        shares = torch.tensor([layer in chosen for chosen in layer_sets])[:, None]  # [R, 1]
        valid.append(torch.where(shares, sender.valid, sink_only))  # [R, C]
    return SharedKV(
        keys=[k.expand(rows, -1, -1, -1) for k in sender.keys],
        values=[v.expand(rows, -1, -1, -1) for v in sender.values],
        positions=[sender.positions.expand(rows, -1) for _ in range(layers)],
        valid=valid, context_len=sender.context_len.expand(rows), full=[True] * layers,
    )


@torch.inference_mode()
def answer_loglik(model: PreTrainedModel, item: Scored, layer_sets: Sequence[frozenset[int]],
                  chunk: int = 32) -> torch.Tensor:
    """Mean log-probability per gold-answer token for each layer set (``[len(layer_sets)]``, float64).

    Raises:
        ConfigError: the item has no answer tokens, or its sender KV holds more than one row.
    """
    if not item.answer or item.sender.context_len.shape[0] != 1:
        raise ConfigError("an answer-likelihood item needs one sender row and at least one answer token")
    ids = torch.tensor(item.prompt + item.answer[:-1])[None]  # the last answer token is only predicted
    target = torch.tensor(item.answer)
    out = []
    for start in range(0, len(layer_sets), chunk):
        sets = layer_sets[start:start + chunk]
        begin = receiver_input(_masked(item.sender, sets))
        logits = run_body(model, ids.expand(len(sets), -1), torch.ones(len(sets), ids.shape[1], dtype=torch.bool),
                          begin.cache, begin.layout, logits_to_keep=len(item.answer)).logits  # [R, A, V]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target.expand(len(sets), -1)[..., None])
        out.append(logp[..., 0].double().mean(dim=1))
    return torch.cat(out)
