"""A prefill whose rows agree below a layer: those layers computed once per distinct row.

A sweep decodes several KVComm configurations' receivers as one batch over one copy of the
sender's KV (:func:`~kvcomm.protocol.shared.share_many`). Below a configuration's first shared
layer its receiver sees the sink (or the kept opening) alone, so configurations whose first shared
layer is ``depth`` or deeper compute the same thing for an item at layers ``0..depth-1``.
:func:`forked_prefill` computes those layers once per distinct row, hands the hidden state on to
every row that shares it, and computes every row from ``depth`` on: the prompt's KV at the lower
layers is the source row's, copied. Up to float rounding (a batch of other rows), this is the
prefill of the whole batch (the tests bound it and compare the answers). A fork's depth is 1 or
more and below the last layer; where nothing is shared there is no fork (None).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from kvcomm.errors import ConfigError, ProtocolError
from kvcomm.protocol.hidden import only_layers
from kvcomm.protocol.receiver import ReceiverInput, check_unused, take
from kvcomm.protocol.sender import cache_tensors, run_body


@dataclass(frozen=True)
class Fork:
    """Row ``r`` takes its layers below ``depth`` from row ``source[r]`` (a source is its own source)."""

    source: tuple[int, ...]
    depth: int

    @property
    def distinct(self) -> list[int]:
        """The rows whose lower layers are computed, in order."""
        return sorted(set(self.source))


def fork_configurations(layer_sets: Sequence[Iterable[int]], rows: int, num_layers: int) -> Fork | None:
    """The fork of a :func:`~kvcomm.protocol.shared.share_many` batch (configuration ``i`` takes rows
    ``i·rows …``) that saves the most layer-rows: the configurations whose first shared layer is
    deepest share layers ``0..depth-1`` (``depth`` their shallowest first layer, below the last
    layer) with the first of them. None where no two configurations share a layer below their first.
    """
    firsts = [min(set(layers), default=num_layers) for layers in layer_sets]
    deepest = sorted(range(len(firsts)), key=lambda i: (-firsts[i], i))
    best, group, depth = 0, [], 0
    for count in range(2, len(deepest) + 1):
        shared = min(firsts[deepest[count - 1]], num_layers - 1)
        if (count - 1) * shared > best:
            best, group, depth = (count - 1) * shared, sorted(deepest[:count]), shared
    if not best:
        return None
    leader = group[0]
    source = tuple((leader if config in group else config) * rows + row
                   for config in range(len(firsts)) for row in range(rows))
    return Fork(source, depth)


def check_fork(model: PreTrainedModel, start: ReceiverInput, input_ids: torch.Tensor, valid: torch.Tensor,
               fork: Fork) -> None:
    """Refuses a fork whose rows do not agree with their sources below ``depth``: prompt, padding,
    received keys and values, their positions and their mask (so a wrong fork is an error, not a
    silently different answer).

    Raises:
        ConfigError: a depth out of range, a source map of the wrong length or not closed, or a
            start that holds tokens of its own already (a prompt's opening: fork a whole prompt).
        ProtocolError: a row differs from its source below ``depth``.
    """
    num_layers = model.config.get_text_config().num_hidden_layers
    rows = input_ids.shape[0]
    if not 1 <= fork.depth < num_layers:
        raise ConfigError(f"a fork's depth is 1..{num_layers - 1} layers, not {fork.depth}")
    if len(fork.source) != rows or any(not 0 <= s < rows or fork.source[s] != s for s in fork.source):
        raise ConfigError(f"a fork maps each of the {rows} rows to a row that is its own source")
    layout = start.layout
    if layout.own_pos.shape[1]:
        raise ConfigError("a forked prefill starts from received KV alone; this start holds "
                          f"{layout.own_pos.shape[1]} prompt tokens already")
    moved = [row for row, s in enumerate(fork.source) if s != row]  # the rows that take another's layers
    if not moved:
        return
    to, source = torch.tensor(moved), torch.tensor([fork.source[row] for row in moved])
    same = torch.equal(input_ids[source], input_ids[to]) and torch.equal(valid[source], valid[to])
    same = same and torch.equal(layout.context_len[source], layout.context_len[to])
    keys, values = cache_tensors(start.cache)
    for layer in range(fork.depth):
        if not same:
            break
        kept, theirs = layout.prefix_valid[layer][to], layout.prefix_valid[layer][source]
        same = (torch.equal(theirs, kept)
                and torch.equal(layout.prefix_pos[layer][source][kept], layout.prefix_pos[layer][to][kept])
                and _equal_where(keys[layer], source, to, kept) and _equal_where(values[layer], source, to, kept))
    if not same:
        raise ProtocolError(f"a forked prefill's rows must equal their sources below layer {fork.depth} (prompt, "
                            "received KV and mask): these do not")


def _equal_where(tensor: torch.Tensor, source: torch.Tensor, to: torch.Tensor, kept: torch.Tensor) -> bool:
    """Whether rows ``to`` of ``tensor`` (``[B, H, K, D]``) equal rows ``source`` at their kept
    columns (``[len(to), K]``; the others are invalid keys, whatever they hold)."""
    return torch.equal(tensor[source].transpose(1, 2)[kept], tensor[to].transpose(1, 2)[kept])


@torch.inference_mode()
def forked_prefill(model: PreTrainedModel, start: ReceiverInput, input_ids: torch.Tensor, valid: torch.Tensor,
                   fork: Fork) -> torch.Tensor:
    """The last position's logits ``[B, 1, V]`` after prefilling ``input_ids`` on ``start``, the
    layers below ``fork.depth`` computed for ``fork.distinct`` rows only (checked first:
    :func:`check_fork`). ``start``'s cache then holds every row's prompt at every layer, as after
    a plain prefill, and is marked used (:func:`~kvcomm.protocol.receiver.take`) once the fork has passed.

    Raises:
        ProtocolError: ``start`` was used by an earlier prefill, or the fork does not fit (:func:`check_fork`).
    """
    check_unused(start)
    check_fork(model, start, input_ids, valid, fork)
    take(start)
    num_layers = model.config.get_text_config().num_hidden_layers
    distinct = fork.distinct
    rows = torch.tensor(distinct)
    spread = torch.tensor([distinct.index(s) for s in fork.source])  # each row's place among the distinct
    layout = start.layout
    lower = DynamicCache()
    keys, values = cache_tensors(start.cache)
    for layer in range(fork.depth):
        lower.update(keys[layer][rows], values[layer][rows], layer)
    lower_layout = layout.select_rows(rows)
    with only_layers(model, 0, fork.depth) as below:
        run_body(model, input_ids[rows], valid[rows], lower, lower_layout, head=False)
    assert below.leaving is not None
    with only_layers(model, fork.depth, num_layers):
        logits = run_body(model, below.leaving[spread], valid, start.cache, layout, logits_to_keep=1).logits
    width = input_ids.shape[1]
    own_keys, own_values = cache_tensors(lower)
    for layer in range(fork.depth):
        start.cache.update(own_keys[layer][spread, :, -width:], own_values[layer][spread, :, -width:], layer)
    return logits
