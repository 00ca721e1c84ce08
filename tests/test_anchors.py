"""KVCOMM's anchor-based offset correction: one anchor that is the text itself gives back the dense
KV (and the graph's answers with reuse off); weights follow closeness per token and per channel;
the shareability test and eviction work as documented."""

from __future__ import annotations

import pytest
import torch

from kvcomm.errors import ConfigError, ProtocolError
from kvcomm.graphs import AnchorOptions, EdgeOptions, Graph
from kvcomm.graphs.anchors import Anchor, AnchorPool, Segment
from kvcomm.tasks import load_task
from kvcomm.tasks.base import Item
from tests.conftest import tiny_loaded


def segment(seed: int, length: int = 3, tail: int = 2, layers: int = 3, scale: float = 1.0) -> Segment:
    g = torch.Generator().manual_seed(seed)
    shape = (layers, 2, length + tail, 4)
    return Segment(scale * torch.randn(shape, generator=g), scale * torch.randn(shape, generator=g), length,
                   tuple(range(tail)))


def offsets(seed: int, like: Segment) -> tuple[torch.Tensor, torch.Tensor]:
    moved = segment(seed, like.length, len(like.tail), len(like.keys))
    return moved.minus(Segment(0 * moved.keys, 0 * moved.values, like.length, like.tail))


def test_one_anchor_that_is_the_text_itself_gives_back_the_dense_kv_past_layer_0():
    base, dense = segment(0), segment(1)
    pool = AnchorPool(AnchorOptions(min_anchors=1))
    pool.add(Anchor(base, {3: dense.minus(base)}))
    corrected = pool.correct(3, base)
    assert torch.equal(corrected.keys[0], base.keys[0]) and torch.equal(corrected.values[0], base.values[0])
    for layer in (1, 2):
        torch.testing.assert_close(corrected.keys[layer], dense.keys[layer], rtol=0, atol=1e-6)
        torch.testing.assert_close(corrected.values[layer], dense.values[layer], rtol=0, atol=1e-6)
    with pytest.raises(ProtocolError, match="no anchor holds offsets for step 4"):
        pool.correct(4, base)  # never corrected with nothing (before: base given back as if corrected)


def test_the_weights_follow_closeness_per_token_and_per_channel():
    near, far = segment(0), segment(1, scale=50.0)
    pool = AnchorPool(AnchorOptions(min_anchors=1))
    near_offsets, far_offsets = offsets(2, near), offsets(3, near)
    pool.add(Anchor(far, {0: far_offsets}))
    pool.add(Anchor(near, {0: near_offsets}))
    out = pool.correct(0, near)  # the new text is the near anchor's: its offsets win everywhere
    for layer in (1, 2):
        torch.testing.assert_close(out.keys[layer], near.keys[layer] + near_offsets[0][layer], rtol=0, atol=1e-5)
        torch.testing.assert_close(out.values[layer], near.values[layer] + near_offsets[1][layer], rtol=0, atol=1e-5)
    shorter = Segment(near.keys[:, :, 1:], near.values[:, :, 1:], 2, near.tail)
    assert len(pool.usable(shorter)) == 2 and not pool.usable(segment(0, length=4))  # longer: no anchor fits
    assert not pool.usable(segment(0, tail=1))  # another template after it


def test_the_shareability_test_and_eviction():
    pool = AnchorPool(AnchorOptions(min_anchors=2, max_anchors=3, window=2, threshold=0.3))
    first, second = segment(0), segment(1)
    assert not pool.shareable(first, 0)  # no anchors yet: computed densely
    pool.add(Anchor(first, {0: offsets(5, first)}))
    assert not pool.shareable(first, 0)  # one anchor, fewer than min_anchors
    pool.add(Anchor(second, {0: offsets(6, second)}))
    assert pool.shareable(first, 0)  # one anchor is its twin: p is peaked, entropy 0
    assert (pool.anchors[0].uses, pool.anchors[1].uses) == (1, 0)
    between = Segment((first.keys + second.keys) / 2, (first.values + second.values) / 2, 3, first.tail)
    assert not pool.shareable(between, 0)  # equally close to both: entropy 1 bit > 0.3 × log2(2)
    pool.add(Anchor(segment(2)))
    pool.add(Anchor(segment(3)))  # four anchors: the least used of the two oldest goes (the second)
    assert len(pool.anchors) == 3 and pool.anchors[0].base is first
    assert all(a.base is not second for a in pool.anchors)


def test_only_anchors_with_offsets_for_the_step_count_toward_the_test():
    """Anchors that hold no offsets for a step cannot correct it: they neither make the minimum
    nor enter the entropy (before, one usable anchor among several passed the test with entropy 0,
    and the step's text was then reused with no correction at all)."""
    pool = AnchorPool(AnchorOptions(min_anchors=2, threshold=0.3))
    text = segment(0)
    pool.add(Anchor(segment(1), {0: offsets(2, text)}))
    pool.add(Anchor(segment(3), {0: offsets(4, text)}))
    pool.add(Anchor(text, {1: offsets(5, text)}))  # its twin, but with offsets for step 1 only
    assert not pool.shareable(text, 1)  # one anchor holds step 1's offsets: fewer than min_anchors
    pool.add(Anchor(segment(6), {1: offsets(7, text)}))
    assert pool.shareable(text, 1)  # two for step 1, the twin far closer: reused, and corrected by them
    pool.correct(1, text)


def twin_items() -> list[Item]:
    """Two items with the same content (the second's question can lean on the first as its anchor)."""
    return [Item(id=name, context="", question="q0?", answers=("x",), pieces=("a0a0", "bb")) for name in ("0", "1")]


@pytest.mark.parametrize("closing", [True, False])
def test_a_graph_whose_anchor_is_the_same_text_answers_as_computing_it_in_every_context(family, closing):
    """The first item is computed in every agent's context and becomes the only anchor; its twin
    reuses the question (and the chat's closing) corrected by it, which gives back each agent's
    dense KV: the replies equal those with reuse off, and the twin reused more tokens."""
    model = tiny_loaded(family, seed={"gemma3": 2}.get(family, 1))
    task = load_task("facts", items=1, max_new_tokens=4)
    for edge in (EdgeOptions(via="text"), EdgeOptions(codec=None)):
        plain = Graph.build(model, "star", 2, edge=edge).run(task, twin_items(), batch_size=1, progress=False)
        anchored = Graph.build(model, "star", 2, edge=edge, reuse=AnchorOptions(min_anchors=1, closing=closing)).run(
            task, twin_items(), batch_size=1, progress=False)
        assert [r.replies for r in anchored.items] == [r.replies for r in plain.items]
        assert anchored.anchored == 0.5 and anchored.anchors is not None and anchored.anchors["closing"] is closing
        assert anchored.label.endswith("+reuse/anchor" if closing else "+reuse/anchor[question]")
        for before, after in zip(plain.steps, anchored.steps):
            assert after.prompt_tokens == before.prompt_tokens and after.reused_tokens > before.reused_tokens


def test_anchors_take_no_cluster_and_the_options_are_checked():
    with pytest.raises(ConfigError, match="anchor correction: threshold"):
        AnchorOptions(threshold=-1)
    with pytest.raises(ConfigError, match="would never reuse"):
        AnchorOptions(min_anchors=3, max_anchors=2)
    graph = Graph.build(tiny_loaded(), "star", 2, edge=EdgeOptions(via="text"), reuse=AnchorOptions())
    with pytest.raises(ConfigError, match="without a cluster"):
        graph.run(load_task("facts", items=1), twin_items(), cluster=object())  # type: ignore[arg-type]


def test_with_no_item_shareable_every_question_is_computed_in_context_as_with_reuse_off(family):
    """The other end: while the pool holds fewer than ``min_anchors`` anchors nothing is corrected,
    every item is computed in every agent's context, and the replies are those of reuse off."""
    model = tiny_loaded(family, seed={"gemma3": 2}.get(family, 1))
    task = load_task("facts", items=1, max_new_tokens=4)
    items = [Item(id=str(i), context="", question=f"q{i}?", answers=("x",), pieces=(f"a{i}" * (i + 1), "bb"))
             for i in range(3)]
    plain = Graph.build(model, "star", 2, edge=EdgeOptions(via="text")).run(task, items, batch_size=2,
                                                                           progress=False)
    dense = Graph.build(model, "star", 2, edge=EdgeOptions(via="text"), reuse=AnchorOptions(min_anchors=20)).run(
        task, items, batch_size=2, progress=False)
    assert dense.anchored == 0.0 and all(step.reused_tokens == 0 for step in dense.steps)
    assert [r.replies for r in dense.items] == [r.replies for r in plain.items]
