"""Blending KV pieces computed apart: selective token recompute (CacheBlend, EuroSys '25).

Pieces prefilled alone (several senders, stored passages) and joined with consistent positions
(:func:`~kvcomm.protocol.shared.concat_shared`) miss every cross-piece attention: no token of piece
2 ever saw piece 1. Blending restores the tokens where that matters most:

1. every context token goes through the first layers again, up to the *check layer*, now seeing
   the whole joined context (the cache keeps this fresh KV for those layers);
2. at the check layer, the tokens whose fresh KV deviates most from the reused KV (keys, values or
   both, summed over heads and channels) are chosen, the top ``recompute`` fraction of each row;
3. only those tokens go through every later layer, attending to every key (their queries see the
   whole context); their fresh KV replaces theirs in the reused cache.

The recompute runs through the model's own layers: the chosen tokens are "own" tokens placed at
their original positions over a cache whose prefix holds every other context token, so the masks
(:mod:`~kvcomm.protocol.layout`) do the rest. Exact ends: ``recompute=1`` is a full prefill of the
joined token ids; ``recompute=0`` at check layer 1 is plain concatenation where layer 0 is shared
in full (layer 0's KV does not depend on other tokens; at a later check layer every token keeps
its fresh KV below it); a single piece shared in full is its own prefill at any ratio.

With KVComm layer selection (pieces sharing only some layers, the sink elsewhere) the check moves
to the first layer from the one asked that every piece shares in full, and every layer below it
keeps every context token's fresh KV from the first stage, sink-only layers too: what reading the
context as text gives at those layers, computed anyway. So there ``recompute=0`` is not the plain
join (the join with those first layers read as text) and a piece shared at some layers is not its
own prefill. Above the check, the recomputed tokens also keep their fresh KV at the sink-only
layers, where the receiver computed it itself; a token such a layer holds (the sink, a piece shared
there in full) that is recomputed keeps only its fresh KV there, so ``recompute=1`` is a full
prefill whatever each piece shares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, cast, get_args

import torch
from transformers import DynamicCache, PreTrainedModel

from kvcomm.errors import ConfigError, WireError
from kvcomm.protocol.hidden import only_layers
from kvcomm.protocol.layout import AttentionLayout
from kvcomm.protocol.sender import cache_tensors, check_model_argument, run_body
from kvcomm.protocol.shared import SharedKV

Deviation = Literal["keys", "values", "both"]
"""What blend ranks a token's deviation from a full prefill on, at the check layer: its keys, its
values (the default, CacheBlend's), or both summed."""
DEVIATIONS: tuple[str, ...] = get_args(Deviation)


@dataclass(frozen=True)
class BlendStats:
    """What a blend recomputed, per row."""

    context: list[int]  # context tokens
    recomputed: list[int]  # tokens recomputed through every layer after the check layer
    check_layer: int  # the layer deviations were measured at (the first full layer from the one asked)
    flops_fraction: list[float]  # of a full prefill of the context (the linear work, attention aside)


def _fresh_until(model: PreTrainedModel, ids: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
                 last: int, chunk: int | None = None,
                 check: Callable[[], None] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every context token's fresh KV at layers ``0..last``, each token seeing the joined context
    (at most ``chunk`` tokens per forward, ``check`` called before each)."""
    layers = model.config.get_text_config().num_hidden_layers
    layout = AttentionLayout.empty(layers, ids.shape[0], ids.device)
    cache = DynamicCache()
    width = ids.shape[1]
    step = max(1, width if chunk is None else chunk)
    for begin in range(0, width, step):
        if check is not None:
            check()
        end = begin + step
        with only_layers(model, 0, last + 1):  # ends each forward after layer ``last``
            run_body(model, ids[:, begin:end], valid[:, begin:end], cache, layout, head=False,
                     positions=positions[:, begin:end])
    keys, values = cache_tensors(cache)
    return keys, values


def blendable(valid: torch.Tensor, exact: int | torch.Tensor = 0) -> torch.Tensor:
    """``[B, C]`` the tokens a blend chooses among: each row's valid ones after its first ``exact``
    (an opening already a full prefill's; one count for every row, or ``[B]``)."""
    return valid & (valid.long().cumsum(dim=1) > torch.as_tensor(exact).reshape(-1, 1))


def _chosen(fresh_k: torch.Tensor, fresh_v: torch.Tensor, old_k: torch.Tensor, old_v: torch.Tensor,
            valid: torch.Tensor, recompute: float, deviation: str) -> torch.Tensor:
    """``[B, C]`` the tokens to recompute: each row's top ``floor(recompute · n)`` by KV deviation,
    a deviation within rounding of the token's own KV counting as none."""
    parts = {"keys": [(fresh_k, old_k)], "values": [(fresh_v, old_v)],
             "both": [(fresh_k, old_k), (fresh_v, old_v)]}[deviation]
    score = sum((f.float() - o.float()).pow(2).sum(dim=(1, 3)) for f, o in parts)  # [B, C]
    size = sum(o.float().pow(2).sum(dim=(1, 3)) for _, o in parts)  # [B, C] the reused KV's own squared norm
    assert isinstance(score, torch.Tensor) and isinstance(size, torch.Tensor)
    return top_fraction(score, valid, recompute, size * rounding_noise(fresh_k.dtype))


def rounding_noise(dtype: torch.dtype) -> float:
    """The share of a token's own squared KV norm below which its squared deviation is taken for
    float rounding (the token computed the same way twice, in another batch shape or thread
    count): a deviation of 256 units in the last place in float32 (3e-5 of its norm; on two
    threads tokens that see no other piece deviated by up to 6, which 4 took for deviations) and
    of 4 in 16-bit dtypes (3e-2 in bfloat16), in norm. Tokens that read another piece deviate by
    1e-1 of their norm and more."""
    info = torch.finfo(dtype)
    return float(((4 if info.bits <= 16 else 256) * info.eps) ** 2)


def top_fraction(score: torch.Tensor, valid: torch.Tensor, fraction: float,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, C]``: each row's top ``floor(fraction · n)`` valid columns by ``score`` (n: the row's
    valid columns). Scores at or below ``noise`` (``[B, C]``) count as 0 (rounding, not
    deviation), and equal scores go to the earlier column, so a row chooses the same tokens
    whatever the batch and its left padding (the budget is often larger than the tokens that
    deviate: a first piece's tokens, or on sliding-window layers those a window past every
    piece's start, deviate by rounding only)."""
    if noise is not None:
        score = score.masked_fill(score <= noise, 0.0)
    score = score.masked_fill(~valid, -torch.inf)
    counts = (valid.sum(dim=1).double() * fraction + 1e-9).floor().long()  # [B]
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
    return (ranks < counts[:, None]) & valid


def _gather(chosen: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each row's chosen columns of ``[B, C]`` tensors, left-padded to the longest row, plus validity."""
    width = int(chosen.sum(dim=1).max()) if chosen.numel() else 0
    order = (chosen.long() * torch.arange(1, chosen.shape[1] + 1)).argsort(dim=1)[:, chosen.shape[1] - width:]
    picked_valid = chosen.gather(1, order)
    return (*(t.gather(1, order) for t in tensors), picked_valid)


def unblendable(token_ids: bool, modes: Iterable[str], full: Sequence[bool],
                check_layer: int) -> tuple[Literal["token_ids", "mode", "layer"], str] | None:
    """Why pieces cannot be blended, and what it concerns (None: they can): no token ids (every
    piece must carry them: ``token_ids``), a mask mode other than causal among ``modes``, a check
    layer below 1, or no layer at or after ``check_layer`` that is ``full`` (shared in full by
    every piece)."""
    if not token_ids:
        return "token_ids", "blending recomputes tokens: the KV pieces must carry their token ids"
    if odd := sorted(set(modes) - {"causal"}):
        return "mode", f"blending needs causal masks, not {odd[0]!r}"
    if isinstance(check_layer, bool) or not isinstance(check_layer, int):
        return "layer", f"the check layer is a layer index, not {check_layer!r}"
    if check_layer < 1:  # layer 0's KV depends on a token and its position only: no token deviates there
        return "layer", f"the check layer is 1 or more, not {check_layer}: at layer 0 no reused token deviates"
    if check_layer >= len(full):
        return "layer", f"check layer {check_layer} is past the model's last layer ({len(full) - 1})"
    if not any(full[check_layer:]):
        return "layer", f"no layer at or after check layer {check_layer} is shared in full"
    return None


def check_token_ids(model: PreTrainedModel, ids: torch.Tensor) -> None:
    """Refuses token ids that are not rows of ``model``'s embedding (a message's ids, which its
    fingerprint does not vouch for).

    Raises:
        WireError: naming the vocabulary's size.
    """
    vocabulary = int(cast(torch.Tensor, model.get_input_embeddings().weight).shape[0])
    if ids.numel() and int(ids.max()) >= vocabulary:
        raise WireError(f"a token id is outside the receiver's vocabulary of {vocabulary}")


def blend(model: PreTrainedModel, joined: SharedKV, recompute: float, check_layer: int = 1,
          deviation: Deviation = "values", exact: int | torch.Tensor = 0, chunk: int | None = None,
          check: Callable[[], None] | None = None) -> tuple[SharedKV, BlendStats]:
    """The receiver's context cache after blending ``joined`` (see the module's docstring).

    Args:
        joined: the pieces joined by ``concat_shared``, with their token ids (``token_ids``).
        recompute: the fraction of each row's context tokens to recompute (0..1), of those after
            the first ``exact``.
        exact: each row's first context tokens whose KV is already a full prefill's (a prompt's
            opening, prefilled before the pieces): never recomputed, nor counted in ``recompute``
            (one count for every row, or ``[B]``).
        check_layer: where deviations are measured (moved to the first layer after it that is
            shared in full, when it is a sink-only layer); layers before it are recomputed for every token.
        deviation: what deviation is measured on: ``keys``, ``values`` or ``both``.
        chunk: the first layers' pass over every context token takes at most this many tokens per
            forward (the same KV up to float rounding; a long context then gives ``check`` a
            chance between chunks).
        check: called before each such chunk and before the recompute; it raises to stop (a
            deadline, a client that went away).

    Raises:
        ConfigError: no token ids, a mask mode other than causal, no full layer at or after the
            check layer, or an option out of range.
    """
    check_model_argument(model)
    if (refusal := unblendable(joined.token_ids is not None, [joined.mode], joined.full, check_layer)) is not None:
        raise ConfigError(refusal[1])
    if not 0.0 <= recompute <= 1.0 or deviation not in DEVIATIONS:
        raise ConfigError(f"recompute must be in [0, 1] and deviation one of {', '.join(DEVIATIONS)}")
    at = next(layer for layer in range(check_layer, joined.num_layers) if joined.full[layer])
    valid, positions, ids = joined.valid[at], joined.positions[at], joined.token_ids
    assert ids is not None
    check_token_ids(model, ids[valid])
    fresh_k, fresh_v = _fresh_until(model, ids, valid, positions, at, chunk, check)
    chosen = _chosen(fresh_k[at], fresh_v[at], joined.keys[at], joined.values[at], blendable(valid, exact),
                     recompute, deviation)
    if check is not None:
        check()
    return recompute_tokens(model, joined, chosen, (fresh_k, fresh_v), at)


def recompute_tokens(model: PreTrainedModel, joined: SharedKV, chosen: torch.Tensor,
                     fresh: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
                     check: int = 0) -> tuple[SharedKV, BlendStats]:
    """``joined`` with the ``chosen`` context tokens (``[B, C]``) recomputed through every layer,
    attending to the whole context; ``fresh`` holds every token's fresh KV for the layers before
    ``check`` (the blend's first stage), which replace the reused ones there.

    Recomputing every token of all pieces after the first is prefix reuse.
    """
    if joined.token_ids is None:
        raise ConfigError("recomputing tokens needs the KV pieces' token ids")
    fresh_k, fresh_v = fresh if fresh is not None else ([], [])
    columns = next((layer for layer in range(joined.num_layers) if joined.full[layer]), None)
    if columns is None:
        raise ConfigError("recomputing tokens needs a layer that is shared in full")
    ids, positions = joined.token_ids, joined.positions[columns]
    cache, layout = _cache_without(joined, fresh_k, fresh_v, chosen, check, columns)
    picked_ids, picked_pos, picked_valid = _gather(chosen, ids, positions)
    if picked_ids.shape[1]:
        run_body(model, picked_ids, picked_valid, cache, layout, head=False, positions=picked_pos)
    keys, values = cache_tensors(cache)
    blended = SharedKV(
        keys=keys, values=values, positions=[torch.cat([p, layout.own_pos], dim=1) for p in layout.prefix_pos],
        valid=[torch.cat([v, layout.own_valid], dim=1) for v in layout.prefix_valid], context_len=joined.context_len,
        full=[True if layer < check else joined.full[layer] for layer in range(joined.num_layers)])
    return blended, _stats(joined, joined.valid[columns], chosen, check, ran_first_stage=fresh is not None)


def _cache_without(joined: SharedKV, fresh_k: list[torch.Tensor], fresh_v: list[torch.Tensor],
                   chosen: torch.Tensor, check: int, columns: int) -> tuple[DynamicCache, AttentionLayout]:
    """The context cache with the chosen tokens left out (they come back as own tokens): fresh KV
    before the check layer, the reused KV from it on, sink-only layers as they were. ``columns``
    is a layer whose columns are the context's (a full one)."""
    valid, positions = joined.valid[columns], joined.positions[columns]
    cache, layout = DynamicCache(), AttentionLayout.empty(joined.num_layers, valid.shape[0])
    layout.context_len = joined.context_len
    # by position (unique in a row): which positions are recomputed, for layers with other columns
    last = int(positions.max())
    picked = torch.zeros(valid.shape[0], last + 2, dtype=torch.bool, device=valid.device)
    picked.scatter_(1, torch.where(valid & chosen, positions, -1) + 1, True)
    picked[:, 0] = False  # (column 0 collects what is not picked)
    for layer in range(joined.num_layers):
        if layer < check:
            parts = fresh_k[layer], fresh_v[layer], positions, valid & ~chosen
        elif joined.full[layer]:
            parts = joined.keys[layer], joined.values[layer], positions, valid & ~chosen
        else:  # what this layer holds (the sink, pieces shared here in full) but the recomputed tokens, which
            # add their own KV: a token held here and recomputed is not kept twice
            at = joined.positions[layer]
            stale = picked.gather(1, (at + 1).clamp(0, last + 1)) & (at >= 0) & (at <= last)
            parts = joined.keys[layer], joined.values[layer], at, joined.valid[layer] & ~stale
        cache.update(parts[0], parts[1], layer)
        layout.prefix_pos[layer], layout.prefix_valid[layer] = parts[2], parts[3]
    return cache, layout


def _stats(joined: SharedKV, valid: torch.Tensor, chosen: torch.Tensor, check: int,
           ran_first_stage: bool) -> BlendStats:
    layers = joined.num_layers
    context = valid.sum(dim=1).tolist()
    recomputed = chosen.sum(dim=1).tolist()
    first = check + 1 if ran_first_stage else 0  # layers every token went through in the first stage
    fraction = [(first * n + r * layers) / (layers * n) if n else 0.0 for n, r in zip(context, recomputed)]
    return BlendStats(context=context, recomputed=recomputed, check_layer=check, flops_fraction=fraction)
