"""How well a receiver answers from a set of shared layers, measured without generating.

The receiver's teacher-forced log-likelihood of the gold answer, given the sender's KV at a set of
layers (and the sink elsewhere), is a smooth, cheap stand-in for the score it would get. Each
candidate set is a row over the same context, and a layer a row does not share has every context
key but the sink masked out, which is exactly a sink-only layer (the sink keeps position 0;
masked keys take no attention).

Candidate sets mostly share their layers (greedy selection tries "the chosen layers plus one",
backward elimination "the kept layers but one"), and a row computes exactly what another row
computes up to the first layer where their sets differ. So one base set (the sets' common layers,
or for elimination their union) is run once, recording the hidden state entering each
layer where a set departs from it, and each set runs only its own layers from there on: for a
step over every layer that is about half the layer passes of running each set whole
(:func:`answer_loglik`, ``staircase=True``; not the default: its forwards are small, and on
Qwen2.5-Coder-1.5B only a search's first step gains; later steps are slower than batched whole
forwards).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from kvcomm.errors import ConfigError, DataError
from kvcomm.models.loading import LoadedModel
from kvcomm.protocol import SenderKV, SharedKV, kept_columns, receiver_input, run_body
from kvcomm.protocol.hidden import only_layers, recording
from kvcomm.tasks.base import Item


@dataclass(frozen=True)
class Scored:
    """One calibration item as the likelihood needs it: its sender KV (one row) and token ids.

    ``rivals``, for a multiple-choice item, are the other options as ``(index, token)``: where each
    departs from the gold answer's tokens and its token there (:func:`rival_tokens`). With rivals,
    the item's objective is the log-probability of choosing the gold option (below).

    ``reference``, when given (``[A, V]``: log-probabilities at each answer position with every
    layer shared, :func:`reference_logprobs`), makes the item's objective fidelity instead: minus
    the mean Kullback-Leibler divergence of a set's next-token distributions from it.
    """

    sender: SenderKV
    prompt: list[int]  # the receiver's message, ending with the generation prompt
    answer: list[int]  # the gold answer's tokens, as the receiver would write them
    rivals: tuple[tuple[int, int], ...] = ()
    reference: torch.Tensor | None = None
    opening: int = 0  # the first columns kept at layers not shared (passages' opening); 0: the sink alone


def _masked(sender: SenderKV, layer_sets: Sequence[frozenset[int]], opening: int = 0) -> SharedKV:
    """``len(layer_sets)`` rows of ``sender``; at a layer a row does not share, only its sink (or its
    ``opening``'s columns, as :func:`~kvcomm.protocol.share` keeps them) is valid."""
    rows, layers = len(layer_sets), sender.num_layers
    sink_only = kept_columns(sender, opening)  # [1, C]
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


@dataclass
class Work:
    """What scoring layer sets cost: decoder-layer passes of one row over the prompt and answer
    (a whole forward of one set is ``num_layers`` of them), and model calls."""

    layer_rows: int = 0
    calls: int = 0


@torch.inference_mode()
def answer_loglik(model: PreTrainedModel, item: Scored, layer_sets: Sequence[frozenset[int]],
                  chunk: int = 32, staircase: bool = False, work: Work | None = None) -> torch.Tensor:
    """Each layer set's objective (``[len(layer_sets)]``, float64): the mean log-probability per
    gold-answer token, with ``item.rivals`` the log-probability of choosing the gold option, or
    with ``item.reference`` fidelity (minus the mean KL divergence from every layer shared).

    Args:
        chunk: sets per batched forward.
        staircase: run one base set once (the sets' common layers, or their union)
            and each set only from the first layer where it departs from it (the module's
            docstring); False (the default) runs every set whole, batched: the same values up
            to float rounding. The staircase does fewer layer passes but in small forwards;
            measured, greedy's first step is 1.7x faster on SmolLM2-135M, either search's first
            step 1.4x on Qwen2.5-Coder-1.5B, and a later step of 8 candidates 0.8-0.9x on Qwen (docs/results.md).
        work: when given, the layer passes and calls made are added to it.

    Raises:
        ConfigError: the item has no answer tokens, or its sender KV holds more than one row.
    """
    if item.sender.context_len.shape[0] != 1:
        raise ConfigError("an answer-likelihood item needs one sender row")
    work = work if work is not None else Work()
    if not layer_sets:
        return torch.zeros(0, dtype=torch.float64)
    layers = item.sender.num_layers
    if not staircase:
        work.layer_rows += layers * len(layer_sets)
        work.calls += -(-len(layer_sets) // chunk)
        return torch.cat([rows_loglik(model, _masked(item.sender, layer_sets[start:start + chunk], item.opening),
                                      item.prompt,
                                      item.answer, rivals=item.rivals, reference=item.reference)
                          for start in range(0, len(layer_sets), chunk)])
    common, departs = _base(layer_sets, layers)
    groups = _groups([(start, row) for row, start in enumerate(departs) if start < layers], layers, chunk)
    with recording(model, {start for start, _ in groups}) as states:
        base = rows_loglik(model, _masked(item.sender, [common], item.opening), item.prompt, item.answer,
                           rivals=item.rivals, reference=item.reference)
    work.layer_rows += layers
    work.calls += 1
    out = base.expand(len(layer_sets)).clone()
    for start, rows in groups:
        hidden = states[start].expand(len(rows), -1, -1)
        shared = _masked(item.sender, [layer_sets[row] for row in rows], item.opening)
        out[rows] = rows_loglik(model, shared, item.prompt, item.answer, start=(start, hidden), rivals=item.rivals,
                                reference=item.reference)
        work.layer_rows += (layers - start) * len(rows)
        work.calls += 1
    return out


def _base(layer_sets: Sequence[frozenset[int]], layers: int) -> tuple[frozenset[int], list[int]]:
    """The set the staircase runs whole, and where each set departs from it (its first layer that
    differs; ``layers`` for none): the sets' common layers (greedy's step: the chosen layers, each
    candidate adding one) or their union (elimination's step: the layers kept, each candidate
    leaving one out), whichever lets the rows start deeper. A row computes what the base computes
    up to the layer where it departs."""
    sets = [frozenset(chosen) for chosen in layer_sets]
    options = []
    for base in (frozenset.intersection(*sets), frozenset.union(*sets)):
        options.append((base, [min(chosen ^ base, default=layers) for chosen in sets]))
    return max(options, key=lambda option: sum(option[1]))


def _groups(departing: list[tuple[int, int]], layers: int, chunk: int) -> list[tuple[int, list[int]]]:
    """Rows (``(first own layer, row)``) gathered into forwards, each starting at its earliest
    member's layer: a row may start before its own first layer, where it still computes what the
    base set does. Fewest layer passes, counting a forward's fixed cost as a quarter of one
    row's whole forward (exact dynamic programming over the rows sorted by layer; at most
    ``chunk`` rows per forward)."""
    ordered = sorted(departing)
    call = layers / 4
    best = [0.0] + [float("inf")] * len(ordered)  # best[i]: cost of the first i rows
    cut = [0] * (len(ordered) + 1)
    for end in range(1, len(ordered) + 1):
        for begin in range(max(0, end - chunk), end):
            cost = best[begin] + call + (layers - ordered[begin][0]) * (end - begin)
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    groups, end = [], len(ordered)
    while end:
        begin = cut[end]
        groups.append((ordered[begin][0], [row for _, row in ordered[begin:end]]))
        end = begin
    return groups[::-1]


@torch.inference_mode()
def rows_loglik(model: PreTrainedModel, rows: SharedKV, prompt: list[int], answer: list[int],
                start: tuple[int, torch.Tensor] | None = None,
                rivals: Sequence[tuple[int, int]] = (), reference: torch.Tensor | None = None) -> torch.Tensor:
    """Mean log-probability per gold-answer token after ``prompt``, for each row of ``rows`` (one
    candidate context KV per row, e.g. several ways of building the same context): ``[R]``, float64.

    With ``rivals`` (``(index, token)``: another option departs from the gold answer at token
    ``index`` with ``token``), it is instead the log-probability of choosing the gold option: a
    softmax over the options, each option's logit taken where it departs from the gold answer,
    ``-log(1 + Σ exp(logit[i, rival] - logit[i, gold_i]))``. Up to where they depart, the options
    are the gold answer's own tokens, so one teacher-forced pass scores them all.

    With ``reference`` (``[A, V]`` log-probabilities), it is instead fidelity: minus the mean over
    the answer's positions of KL(reference ‖ row), the row's next-token distribution against the
    reference's (every layer shared, :func:`reference_logprobs`), teacher-forced on the same tokens.

    ``start = (layer, hidden)`` runs only layers ``layer..L-1``, from ``hidden`` (``[R, T, H]``,
    the state entering ``layer`` over the prompt and answer tokens, as recorded from a row that
    computes the same as these up to there).

    Raises:
        ConfigError: no answer tokens.
    """
    logits = _answer_logits(model, rows, prompt, answer, start)  # [R, A, V]
    count, target = logits.shape[0], torch.tensor(answer)
    if reference is not None:
        logp = torch.log_softmax(logits.float(), dim=-1)  # [R, A, V]
        # a token the reference gives no probability adds nothing (0 · log 0 = 0, not NaN)
        terms = torch.where(torch.isfinite(reference), reference.exp() * (reference - logp), 0.0)
        kl = terms.sum(dim=-1)  # [R, A]
        return -kl.double().mean(dim=1)
    if rivals:
        where = torch.tensor([index for index, _ in rivals])
        gaps = logits[:, where, torch.tensor([token for _, token in rivals])] - logits[:, where, target[where]]
        gaps = torch.cat([torch.zeros(count, 1), gaps.float()], dim=1)  # [R, 1 + rivals]; gold's own is 0
        return -torch.logsumexp(gaps.double(), dim=1)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target.expand(count, -1)[..., None])
    return logp[..., 0].double().mean(dim=1)


@torch.inference_mode()
def reference_logprobs(model: PreTrainedModel, sender: SenderKV, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """The receiver's log-probabilities at each of ``answer``'s positions (``[A, V]``, float32),
    teacher-forced, with the sender's KV at every layer: what fidelity compares a layer set with."""
    logits = _answer_logits(model, _masked(sender, [frozenset(range(sender.num_layers))]), prompt, answer)
    return torch.log_softmax(logits[0].float(), dim=-1)


def _answer_logits(model: PreTrainedModel, rows: SharedKV, prompt: list[int], answer: list[int],
                   start: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """The receiver's logits at each of ``answer``'s positions (``[R, A, V]``), teacher-forced after
    ``prompt`` on every row of ``rows``; ``start`` as in :func:`rows_loglik`.

    Raises:
        ConfigError: no answer tokens.
    """
    if not answer:
        raise ConfigError("an answer-likelihood item needs at least one answer token")
    count = int(rows.context_len.shape[0])
    ids = torch.tensor(prompt + answer[:-1])[None]  # the last answer token is only predicted
    begin = receiver_input(rows)
    valid = torch.ones(count, ids.shape[1], dtype=torch.bool)
    if start is None:
        return run_body(model, ids.expand(count, -1), valid, begin.cache, begin.layout,
                        logits_to_keep=len(answer)).logits
    layer, hidden = start
    with only_layers(model, layer, rows.num_layers):
        return run_body(model, hidden, valid, begin.cache, begin.layout, logits_to_keep=len(answer)).logits


def rival_tokens(model: LoadedModel, item: Item, answer: list[int]) -> tuple[tuple[int, int], ...]:
    """For a multiple-choice item, each other option as ``(index, token)``: the first token where
    its tokens (as ``model`` writes them) depart from the gold ``answer``'s, and its token there.
    Options that depart nowhere inside the gold answer's tokens (one is the other's prefix) are
    left out: one teacher-forced pass cannot tell them apart. No choices: ``()``."""
    out = []
    for option in item.choices:
        if option == item.answers[0]:
            continue
        ids = _written(model, option)
        index = next((i for i, (a, b) in enumerate(zip(answer, ids)) if a != b), None)
        if index is not None:
            out.append((index, ids[index]))
    return tuple(out)


def _written(model: LoadedModel, text: str) -> list[int]:
    """``text``'s tokens as ``model`` writes them after its prompt."""
    text = text if model.has_chat_template else " " + text  # after "Answer:"
    return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_ids(model: LoadedModel, item: Item) -> list[int]:
    """The first gold answer's tokens as ``model`` would write them after its prompt.

    Raises:
        DataError: the item has no gold answer, or it has no tokens.
    """
    if not item.answers:
        raise DataError(f"item {item.id} has no gold answer; the answer-aware rules need one "
                        "(calibrate on items with answers, or rank by attention: --selection paper)")
    ids = _written(model, item.answers[0]) if item.answers[0].strip() else []  # not a lone space
    if not ids:
        raise DataError(f"item {item.id}'s gold answer has no tokens")
    return ids
