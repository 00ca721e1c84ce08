"""A prefill whose rows agree below a layer (:mod:`kvcomm.protocol.fork`): the same logits, cache
and answers as the plain prefill of the whole batch, and a fork that does not fit is refused."""

from __future__ import annotations

import pytest
import torch

from kvcomm.errors import ConfigError, ProtocolError
from kvcomm.protocol import (
    Fork,
    fork_configurations,
    forked_prefill,
    greedy_generate,
    merge_senders,
    pad_left,
    prefill,
    receiver_input,
    run_body,
    share_many,
)
from kvcomm.protocol.decoding import chunked_prefill
from kvcomm.protocol.fork import check_fork
from kvcomm.protocol.sender import cache_tensors
from tests.conftest import tiny_model

torch.set_grad_enabled(False)

CONFIGURATIONS = [[1, 2], [0, 1, 2, 3], [2, 3], [3]]  # first shared layers 1, 0, 2, 3


def fused(family: str, opening: bool = False, seed: int = 3):
    """A tiny model, its sender KV of three left-padded rows (with ``opening``, joined from two
    pieces as passages are, the first kept at layers not shared: its width is returned), and the
    receivers' prompts of every configuration decoded together (configuration ``i`` takes rows
    ``3i, 3i+1, 3i+2``)."""
    model = tiny_model(family)
    generator = torch.Generator().manual_seed(seed)
    senders = [torch.randint(1, 99, (n,), generator=generator).tolist() for n in (6, 2, 9)]
    receivers = [torch.randint(1, 99, (n,), generator=generator).tolist() for n in (4, 7, 5)]
    kv, width = prefill(model, *pad_left(senders, 0)), 0
    if opening:
        heads = [row[:2] for row in senders]
        first = prefill(model, *pad_left(heads, 0))
        kv = merge_senders(model, [first, prefill(model, *pad_left([row[2:] or [5] for row in senders], 0))])
        width = first.valid.shape[1]
    ids, valid = pad_left(receivers, 0)
    copies = len(CONFIGURATIONS)
    return model, kv, width, ids.repeat(copies, 1), valid.repeat(copies, 1)


def rows_seen(model, layer: int, seen: list[int]):
    """A hook that records how many rows each forward runs through ``layer``."""
    return model.get_decoder().layers[layer].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[0]),
        with_kwargs=True)


def test_the_deepest_configurations_share_their_lower_layers():
    fork = fork_configurations(CONFIGURATIONS, 3, 4)
    assert fork == Fork(source=(0, 1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8), depth=2)  # [2, 3] and [3] share layers 0, 1
    # the measured sweep's shape (Qwen2.5-Coder-1.5B, Countries): ratios 0.3, 0.5, 0.7 start at layers 8, 6, 5
    fork = fork_configurations([[8, 12, 14], [6, 8, 9], [5, 6, 8], range(28)], 2, 28)
    assert fork is not None and fork.depth == 5 and fork.source == (0, 1, 0, 1, 0, 1, 6, 7)
    assert fork_configurations([range(4), [0, 2]], 3, 4) is None  # both read the sender at layer 0
    assert fork_configurations([[2, 3]], 3, 4) is None  # one configuration: nothing to share
    assert fork_configurations([[], []], 1, 4) == Fork(source=(0, 0), depth=3)  # never past the last layer


@pytest.mark.parametrize("with_fork", [True, False], ids=["forked", "identity"])
@pytest.mark.parametrize("opening", [False, True], ids=["sink", "opening"])
def test_a_forked_prefill_is_the_plain_prefill(family, with_fork, opening):
    """The same last logits, the same cache at every layer and row, the same answers after it, with
    the lower layers run for the distinct rows only; the identity fork (every row its own source)
    runs the two halves apart and must agree too. Also where rows keep an opening (passages)."""
    model, kv, width, ids, valid = fused(family, opening)
    fork = fork_configurations(CONFIGURATIONS, 3, 4) if with_fork else Fork(tuple(range(12)), 2)
    assert fork is not None
    plain_start = receiver_input(share_many(kv, CONFIGURATIONS, width))
    plain = chunked_prefill(model, plain_start, ids, valid, None)
    start = receiver_input(share_many(kv, CONFIGURATIONS, width))
    below, above = [], []
    hooks = [rows_seen(model, 0, below), rows_seen(model, fork.depth, above)]
    try:
        logits = forked_prefill(model, start, ids, valid, fork)
    finally:
        for hook in hooks:
            hook.remove()
    assert below == [9 if with_fork else 12] and above == [12]  # configurations [2, 3] and [3] share layers 0, 1
    assert start.used and (logits - plain).abs().max().item() <= 1e-5
    for (k, v), (pk, pv) in zip(zip(*cache_tensors(start.cache)), zip(*cache_tensors(plain_start.cache))):
        assert k.shape == pk.shape and (k - pk).abs().max().item() <= 1e-5 and (v - pv).abs().max().item() <= 1e-5
    answers = greedy_generate(model, receiver_input(share_many(kv, CONFIGURATIONS, width)), ids, valid, 6, [98], 0,
                              fork=fork)
    assert answers == greedy_generate(model, receiver_input(share_many(kv, CONFIGURATIONS, width)), ids, valid, 6,
                                      [98], 0)


def test_a_fork_is_checked_at_its_last_shared_layer_and_at_valid_keys_only():
    """[2, 3] and [3] agree at layers 0 and 1, not at layer 2; what invalid keys hold does not count."""
    model, kv, _, ids, valid = fused("llama")
    start = receiver_input(share_many(kv, CONFIGURATIONS))
    onto = Fork(source=tuple(range(6)) + (9, 10, 11, 9, 10, 11), depth=2)
    check_fork(model, start, ids, valid, onto)
    with pytest.raises(ProtocolError, match="below layer 3"):
        check_fork(model, start, ids, valid, Fork(onto.source, 3))
    keys, _ = cache_tensors(start.cache)
    sink = int(kv.valid[0].nonzero()[0])  # item 0's first valid column: all that row 6 sees at layer 0
    keys[0][6, :, -1] += 1.0  # a column valid for configuration [0..3], not for row 6
    check_fork(model, start, ids, valid, onto)
    keys[0][6, :, sink] += 1.0
    with pytest.raises(ProtocolError, match="below layer 2"):
        check_fork(model, start, ids, valid, onto)


def test_a_start_holding_prompt_tokens_is_not_forked():
    """A caller that ran the first prompt token itself (``run_body``): the fork would take the
    received columns for the whole row and miss that token, so it is refused."""
    model, kv, _, ids, valid = fused("llama")
    start = receiver_input(share_many(kv, CONFIGURATIONS))
    run_body(model, ids[:, :1], valid[:, :1], start.cache, start.layout, head=False)
    with pytest.raises(ConfigError, match="holds 1 prompt tokens already"):
        forked_prefill(model, start, ids[:, 1:], valid[:, 1:], fork_configurations(CONFIGURATIONS, 3, 4))
    assert not start.used


def test_a_fork_whose_rows_differ_below_its_depth_is_refused_and_the_start_kept():
    model, kv, _, ids, valid = fused("llama")
    start = receiver_input(share_many(kv, CONFIGURATIONS))
    wrong = Fork(source=(0, 1, 2, 0, 1, 2, 6, 7, 8, 6, 7, 8), depth=2)  # [0..3] reads the sender at layer 0
    with pytest.raises(ProtocolError, match="must equal their sources below layer 2"):
        forked_prefill(model, start, ids, valid, wrong)
    assert not start.used  # nothing ran: it can still be used
    other = ids.clone()
    other[11, -1] = 97  # a prompt that differs from its source's
    with pytest.raises(ProtocolError, match="must equal their sources"):
        forked_prefill(model, start, other, valid, fork_configurations(CONFIGURATIONS, 3, 4))
    for bad, match in [(Fork(tuple(range(12)), 0), "depth is 1..3"), (Fork(tuple(range(12)), 4), "depth is 1..3"),
                       (Fork(tuple(range(11)), 2), "each of the 12 rows"),
                       (Fork((1, 2) + tuple(range(2, 12)), 2), "its own source")]:
        with pytest.raises(ConfigError, match=match):
            forked_prefill(model, start, ids, valid, bad)
    with pytest.raises(ConfigError, match="without chunks"):
        chunked_prefill(model, start, ids, valid, 2, fork=fork_configurations(CONFIGURATIONS, 3, 4))
    assert not start.used
    forked_prefill(model, start, ids, valid, fork_configurations(CONFIGURATIONS, 3, 4))
    with pytest.raises(ProtocolError, match="used by an earlier prefill"):
        forked_prefill(model, start, ids, valid, fork_configurations(CONFIGURATIONS, 3, 4))
