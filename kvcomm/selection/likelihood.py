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

from kvcomm.errors import ConfigError, DataError
from kvcomm.models.loading import LoadedModel
from kvcomm.protocol import SenderKV, SharedKV, receiver_input, run_body
from kvcomm.tasks.base import Item


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
    if item.sender.context_len.shape[0] != 1:
        raise ConfigError("an answer-likelihood item needs one sender row")
    return torch.cat([rows_loglik(model, _masked(item.sender, layer_sets[start:start + chunk]), item.prompt,
                                  item.answer) for start in range(0, len(layer_sets), chunk)])


@torch.inference_mode()
def rows_loglik(model: PreTrainedModel, rows: SharedKV, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """Mean log-probability per gold-answer token after ``prompt``, for each row of ``rows`` (one
    candidate context KV per row, e.g. several ways of building the same context): ``[R]``, float64.

    Raises:
        ConfigError: no answer tokens.
    """
    if not answer:
        raise ConfigError("an answer-likelihood item needs at least one answer token")
    count = int(rows.context_len.shape[0])
    ids = torch.tensor(prompt + answer[:-1])[None]  # the last answer token is only predicted
    target = torch.tensor(answer)
    begin = receiver_input(rows)
    logits = run_body(model, ids.expand(count, -1), torch.ones(count, ids.shape[1], dtype=torch.bool),
                      begin.cache, begin.layout, logits_to_keep=len(answer)).logits  # [R, A, V]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target.expand(count, -1)[..., None])
    return logp[..., 0].double().mean(dim=1)


def answer_ids(model: LoadedModel, item: Item) -> list[int]:
    """The first gold answer's tokens as ``model`` would write them after its prompt.

    Raises:
        DataError: the item has no gold answer, or it has no tokens.
    """
    if not item.answers:
        raise DataError(f"item {item.id} has no gold answer; the answer-aware rules need one "
                        "(calibrate on items with answers, or rank by attention: --selection paper)")
    text = item.answers[0] if model.has_chat_template else " " + item.answers[0]  # after "Answer:"
    ids = list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise DataError(f"item {item.id}'s gold answer has no tokens")
    return ids
