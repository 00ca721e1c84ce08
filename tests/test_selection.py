"""Importance scores against a hand computation, and the selection rules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from kvcomm.errors import ConfigError, DataError
from kvcomm.protocol import attention_importance, pad_left, prefill
from kvcomm.selection import (
    combined_scores,
    contiguous_layers,
    format_layers,
    gaussian_prior,
    layer_count,
    parse_layers,
    random_layers,
    rank_layers,
    top_layers,
)
from tests.conftest import tiny_loaded, tiny_model


@pytest.mark.parametrize("receiver_len", [5, 1])  # a one-token prompt is recorded too
def test_importance_equals_eager_attention_mass_on_context(family, receiver_len):
    model = tiny_model(family)
    eager = tiny_model(family)
    eager.set_attn_implementation("eager")
    sender_ids, receiver_ids = torch.randint(0, 99, (1, 10)), torch.randint(0, 99, (1, receiver_len))
    with torch.no_grad():
        attentions = eager(torch.cat([sender_ids, receiver_ids], 1), output_attentions=True).attentions
        got = attention_importance(model, prefill(model, sender_ids, sender_ids >= 0), receiver_ids, receiver_ids >= 0)
    # Receiver queries (rows 10 on) on context keys 1..9, summed over keys, mean over heads and queries.
    expected = torch.stack([a[0, :, 10:, 1:10].sum(-1).mean() for a in attentions])
    assert torch.allclose(got[0], expected, atol=1e-5)


def test_importance_ignores_padding():
    model = tiny_model("llama")
    senders, receivers = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]], [[3, 4], [20, 21, 22, 23]]
    s_ids, s_valid = pad_left(senders, 0)
    r_ids, r_valid = pad_left(receivers, 0)
    with torch.no_grad():
        batch = attention_importance(model, prefill(model, s_ids, s_valid), r_ids, r_valid)
        for row in range(2):
            s, r = torch.tensor([senders[row]]), torch.tensor([receivers[row]])
            alone = attention_importance(model, prefill(model, s, s >= 0), r, r >= 0)
            assert torch.allclose(batch[row], alone[0], atol=1e-5)


def test_combined_score_is_the_papers_formula():
    importance = [0.2, 0.9, 0.4, 0.1, 0.5]
    alpha, mu, sigma = 0.8, 0.5, 2.0
    centre = mu * 4
    prior = np.array([math.exp(-((layer - centre) ** 2) / (2 * sigma**2)) for layer in range(5)])
    prior = (prior - prior.min()) / (prior.max() - prior.min())
    imp = (np.array(importance) - 0.1) / 0.8
    assert np.allclose(combined_scores(importance, alpha, mu, sigma), alpha * imp + (1 - alpha) * prior)
    assert np.allclose(gaussian_prior(5, mu, sigma).max(), 1.0)


def test_alpha_one_ranks_by_importance_alone():
    assert rank_layers(combined_scores([0.3, 0.9, 0.1, 0.5], 1.0)) == [1, 3, 0, 2]


def test_constant_importance_falls_back_to_prior():
    assert rank_layers(combined_scores([0.5] * 5, 0.5, sigma=1.0))[0] == 2


@pytest.mark.parametrize("ratio, layers, count", [(0.3, 28, 9), (0.5, 28, 14), (0.7, 28, 20), (0.3, 30, 9),
                                                  (0.7, 24, 17), (1.0, 30, 30), (0.01, 30, 1)])
def test_layer_count_is_ceil(ratio, layers, count):
    assert layer_count(ratio, layers) == count


def test_top_layers_takes_the_head_of_the_ranking():
    assert top_layers([4, 0, 3, 1, 2], 0.4) == [0, 4]


def test_bad_ratio_is_refused():
    with pytest.raises(ConfigError):
        layer_count(0.0, 10)


def test_random_layers_are_seeded_and_sized():
    assert random_layers(30, 0.5, seed=1) == random_layers(30, 0.5, seed=1)
    assert random_layers(30, 0.5, seed=1) != random_layers(30, 0.5, seed=2)
    assert len(random_layers(30, 0.5)) == 15


def test_contiguous_layers_form_one_centred_block():
    assert contiguous_layers(10, 0.3) == [4, 5, 6] or contiguous_layers(10, 0.3) == [3, 4, 5]
    assert contiguous_layers(10, 1.0) == list(range(10))


def test_parse_and_format_layers_round_trip():
    assert parse_layers("0,4,10-12,-1", 30) == [0, 4, 10, 11, 12, 29]
    assert format_layers([0, 4, 10, 11, 12, 29]) == "0,4,10-12,29"
    for bad in ("x", "31", "5-40", ""):
        with pytest.raises(ConfigError):
            parse_layers(bad, 30)


@pytest.mark.parametrize("opening", [0, 3], ids=["sink", "opening"])
def test_answer_likelihood_of_a_layer_set_equals_the_receiver_given_those_layers(family, opening):
    """Batched scoring with masked sink layers must equal the real sink-only cache (or the cache
    keeping an opening of 3 tokens, as passages do), set by set, whether each set runs whole or only
    from the first layer where it departs from a base set (the staircase: greedy's chosen layers
    plus one, or elimination's kept layers but one); the staircase does less work."""
    from kvcomm.protocol import prefill_logits, receiver_input, share
    from kvcomm.selection.likelihood import Scored, Work, _base, answer_loglik

    model = tiny_model(family)
    layers = model.config.get_text_config().num_hidden_layers
    sender = prefill(model, torch.randint(0, 99, (1, 9)), torch.ones(1, 9, dtype=torch.bool))
    prompt, answer = [5, 6, 7, 8], [9, 10, 11]
    unrelated = [frozenset(), frozenset({1}), frozenset({0, 3}), frozenset(range(4))]
    greedy = [frozenset({1}), frozenset({1, 0}), frozenset({1, 2}), frozenset({1, 3}), frozenset({1, 2, 3}),
              frozenset({1, 3})]
    # elimination's steps: every layer but one, then the kept layers {0, 2, 3} but one
    everything = frozenset(range(layers))
    elimination = [everything - {out} for out in range(layers)] + [frozenset({0, 2, 3}) - {out} for out in (0, 2, 3)]
    sets = unrelated + greedy + elimination
    item = Scored(sender, prompt, answer, opening=opening)
    works = {True: Work(), False: Work()}
    pruned = {True: Work(), False: Work()}
    got = {staircase: torch.cat([answer_loglik(model, item, unrelated, chunk=3, staircase=staircase,
                                               work=works[staircase]),
                                 answer_loglik(model, item, greedy, chunk=1, staircase=staircase,
                                               work=works[staircase]),
                                 answer_loglik(model, item, elimination[:layers], chunk=1, staircase=staircase,
                                               work=pruned[staircase]),
                                 answer_loglik(model, item, elimination[layers:], chunk=2, staircase=staircase,
                                               work=pruned[staircase])])
           for staircase in (True, False)}
    for chosen, value, whole in zip(sets, got[True], got[False]):
        ids = torch.tensor([prompt + answer[:-1]])
        logits = prefill_logits(model, receiver_input(share(model, sender, sorted(chosen), opening=opening)), ids,
                                ids >= 0)
        logp = torch.log_softmax(logits[0, len(prompt) - 1:], -1)[torch.arange(3), torch.tensor(answer)]
        assert abs(float(logp.mean()) - float(value)) < 1e-4
        assert abs(float(whole) - float(value)) < 1e-4
    assert works[False].layer_rows + pruned[False].layer_rows == layers * len(sets)
    if opening:  # the opening is not the sink alone: a set without every layer scores otherwise
        sink = answer_loglik(model, Scored(sender, prompt, answer), unrelated[:1])
        assert abs(float(sink[0]) - float(got[False][0])) > 1e-4
    # greedy's sets share layer 1 and depart from it at layers 0, 2, 3: the staircase skips work
    assert works[True].layer_rows < works[False].layer_rows
    # elimination's sets are the kept layers but one: the base is their union, and each
    # runs from the layer it leaves out
    assert _base(elimination[:layers], layers) == (everything, list(range(layers)))
    assert _base(greedy, layers)[0] == frozenset({1})
    assert pruned[True].layer_rows < pruned[False].layer_rows


def test_staircase_groups_start_each_row_no_later_than_its_own_first_layer():
    """Rows join forwards that start at or before the first layer they do not share (where they
    still compute what the common part does); every row once; a forward holds at most ``chunk``."""
    from kvcomm.selection.likelihood import _groups

    departing = [(layer, row) for row, layer in enumerate([5, 0, 27, 13, 13, 26, 1, 20])]
    for chunk in (1, 3, 32):
        groups = _groups(departing, 28, chunk)
        rows = [row for _, members in groups for row in members]
        assert sorted(rows) == list(range(8)) and all(len(members) <= chunk for _, members in groups)
        first = dict((row, layer) for layer, row in departing)
        assert all(start == min(first[row] for row in members) for start, members in groups)
    # far-apart rows of a deep model run from their own layers; one forward would redo layers 0..26
    assert len(_groups([(0, 0), (27, 1)], 28, 32)) == 2
    assert _groups([(3, 0), (4, 1)], 28, 32) == [(3, [0, 1])]  # one layer apart: one forward


def test_greedy_selection_follows_the_objective():
    """On an objective whose best sets are known, greedy adds layers in the order that helps most."""
    from kvcomm.selection.search import greedy_order

    value = {0: 0.1, 1: 2.0, 2: 0.5, 3: 1.0}
    calls = []

    def objective(sets):
        calls.append(len(sets))
        return np.array([sum(value[layer] for layer in s) for s in sets])

    ranking, trace = greedy_order(objective, 4, steps=2)
    assert ranking == [1, 3, 2, 0] and [t["layer"] for t in trace] == [1, 3] and calls == [4, 3]


def test_backward_elimination_removes_what_is_missed_least_and_judges_layers_together():
    """Layers 0 and 1 help only together (forward selection, judging them alone, starts elsewhere);
    elimination from every layer keeps the pair, and its ranking reverses the removals."""
    from kvcomm.selection.search import backward_order, greedy_order

    def objective(sets):
        return np.array([3.0 * ({0, 1} <= s) + 1.0 * (2 in s) + 0.5 * (3 in s) + 0.1 * (4 in s) for s in sets])

    ranking, trace = backward_order(objective, 5, steps=3)
    assert [t["layer"] for t in trace] == [4, 3, 2] and ranking == [0, 1, 2, 3, 4]
    assert [t["left"] for t in trace] == [4, 3, 2] and trace[-1]["loglik"] == 3.0
    assert greedy_order(objective, 5, steps=2)[0][:2] == [2, 3]  # forward: the pair is invisible alone
    # a pool of 2 after the first step tries only the two layers missed least before
    tried = backward_order(objective, 5, steps=3, pool=2)[1]
    assert [t["tried"] for t in tried] == [5, 2, 2] and [t["layer"] for t in tried] == [4, 3, 2]


def test_backward_elimination_drops_a_redundant_layer_and_every_prefix_is_a_set_it_scored():
    """Layers 0 and 1 carry the same thing: either is enough. Leaving one out at a time would rank
    both last (each is missed by nothing); elimination drops one (the deeper, on a tie) and then
    finds the other indispensable. Down to one layer, every prefix of the ranking is a set it left."""
    from kvcomm.selection.search import backward_order, default_removals

    def objective(sets):
        return np.array([2.0 * bool({0, 1} & s) + 1.0 * (2 in s) + 0.5 * (3 in s) for s in sets])

    ranking, trace = backward_order(objective, 4, steps=default_removals(4))
    assert [t["layer"] for t in trace] == [1, 3, 2] and ranking == [0, 2, 3, 1]
    assert [t["loglik"] for t in trace] == [3.5, 3.0, 2.0]
    left = [set(range(4)) - {t["layer"] for t in trace[:k]} for k in range(len(trace) + 1)]
    assert all(set(ranking[:4 - k]) == left[k] for k in range(len(left)))
    assert default_removals(28) == 27 and default_removals(1) == 0
    assert backward_order(objective, 1, steps=default_removals(1)) == ([0], [])


def test_backward_elimination_with_a_pool_tries_again_what_the_step_before_found_least_missed():
    """An additive objective: each layer's weight, summed. Scores fall as layers go, so scores from
    earlier steps outranked the step before's, and from step 5 on none of the step before's
    candidates was tried again: the pool rotated through stale layers and removed heavier ones than
    it had to. Now each step tries the step before's (but the one removed) first."""
    from kvcomm.selection.search import backward_order

    weights = np.random.default_rng(1).uniform(0.05, 1.0, size=28)

    def objective(sets):
        return np.array([float(sum(weights[i] for i in s)) for s in sets])

    ranking, trace = backward_order(objective, 28, 27, 8)
    removed = [t["layer"] for t in trace]
    assert removed == sorted(range(28), key=lambda layer: weights[layer])[:27]  # the lightest first, every time
    assert ranking[0] == int(np.argmax(weights))


def test_a_search_pool_below_one_layer_is_refused():
    from kvcomm import Agents, calibrate, load_task

    model = tiny_loaded("llama")
    task = load_task("facts", items=2)
    with pytest.raises(ConfigError, match="pool must be at least 1"):
        calibrate(Agents(model, model), task, task.items, progress=False, rule="prune", pool=0)


def test_a_fitted_prior_finds_the_depth_that_helps():
    """When only deep layers help the answer, the fitted prior moves its centre deep."""
    from kvcomm.selection.search import fit_prior

    def objective(sets):
        return np.array([sum(layer >= 14 for layer in s) / max(len(s), 1) for s in sets])

    fitted = fit_prior(objective, importance=[0.0] * 20)
    assert fitted["mu"] >= 0.7 and fitted["settings"] == 5 * 9 * 5 and fitted["distinct_sets"] >= 2


@pytest.mark.parametrize("rule", ["paper", "answer", "prior", "prune"])
def test_every_rule_ranks_every_layer_once_and_records_what_it_did(rule):
    from kvcomm import Agents, calibrate, load_task

    model = tiny_loaded("llama")
    task = load_task("facts", items=3)
    profile = calibrate(Agents(model, model), task, task.items, progress=False, rule=rule, batch_size=2,
                        objective="likelihood")  # one search: its steps counted (auto's two: a test below)
    assert sorted(profile.ranking) == [0, 1, 2, 3] and profile.rule == rule and profile.version == 2
    assert profile.cost["seconds"] > 0 and profile.cost["items"] == 3
    if rule == "answer":
        assert [t["layer"] for t in profile.details["trace"]] == profile.ranking[:3]  # 70% of 4 layers
        assert profile.cost["forwards_per_item"] == 3  # one batched forward per step
        assert profile.details["whole_forwards_per_item"] == 4 + 3 + 2  # every set tried, whole
    if rule == "prune":  # down to one layer: 3 removals, of 4, 3 and 2 sets
        assert [t["layer"] for t in profile.details["trace"]] == list(reversed(profile.ranking[1:]))
        assert profile.details["whole_forwards_per_item"] == 4 + 3 + 2
    if rule == "prior":
        fitted = profile.details["fitted"]
        assert (profile.alpha, profile.mu, profile.sigma) == (fitted["alpha"], fitted["mu"], fitted["sigma"])


def test_version_1_profiles_still_load(tmp_path):
    from kvcomm.selection import Profile

    old = {"version": 1, "sender": "s", "receiver": "s", "task": "t", "num_layers": 2, "alpha": 1.0, "mu": 0.5,
           "sigma": 10.0, "calibration_items": ["a"], "importance": [0.1, 0.2], "scores": [0.0, 1.0],
           "ranking": [1, 0]}
    (tmp_path / "p.json").write_text(json.dumps(old))
    profile = Profile.load(tmp_path / "p.json")
    assert profile.rule == "paper" and profile.ranking == [1, 0]


def test_a_damaged_profile_is_refused_when_read(tmp_path):
    """A ranking that leaves layers out or names one twice, an unknown rule or a newer version was
    read as given: a ratio then shared as many layers as the ranking held, silently."""
    from kvcomm.selection import Profile

    good = {"version": 2, "sender": "s", "receiver": "s", "task": "t", "num_layers": 4, "alpha": 1.0, "mu": 0.5,
            "sigma": 10.0, "calibration_items": ["a"], "importance": [0.1] * 4, "scores": [0.0] * 4,
            "ranking": [1, 0, 3, 2], "rule": "prune"}
    (tmp_path / "p.json").write_text(json.dumps(good))
    assert Profile.load(tmp_path / "p.json").ranking == [1, 0, 3, 2]
    for change, said in (({"ranking": [1]}, "ranking must order each of the 4 layers once"),
                         ({"ranking": [0, 0, 0, 0]}, "ranking must order"),
                         ({"ranking": [0, 1, 2, 4]}, "ranking must order"),
                         ({"scores": [0.0]}, "importance and scores must hold one value per layer"),
                         ({"rule": "bogus"}, "rule 'bogus' is none of paper"),
                         ({"version": 9}, "version 9 is not one this kvcomm reads"),
                         # hand-edited: a typo read as chats, a prior no rule makes, a provenance that crashed
                         ({"details": {"pieces": "passagez"}}, "details.pieces must be"),
                         ({"sigma": -1.0}, r"the prior's alpha must be in .*sigma -1.0"),
                         ({"alpha": 1.5}, r"the prior's alpha must be in .*alpha 1.5"),
                         ({"details": {"provenance": "oops"}}, "details.provenance must be"),
                         ({"details": {"provenance": {"data": "x"}}}, "details.provenance must be"),
                         ({"ranking": list(range(5000))}, r"ranking must order .*… \(5000 entries\)")):
        (tmp_path / "p.json").write_text(json.dumps(good | change))
        with pytest.raises(DataError, match=f"cannot read profile .*p.json: {said}"):
            Profile.load(tmp_path / "p.json")


def test_the_budget_is_the_smallest_ratio_within_the_tolerance(monkeypatch):
    """With answers right exactly when layers 2 and 3 are shared, the budget is the first ratio whose top
    layers hold both; a looser tolerance gives a smaller budget."""
    from kvcomm import Agents, load_task
    from kvcomm.selection import budget as budget_module

    model = tiny_loaded("llama", layers=8)
    task = load_task("facts", items=4)
    shared_layers = []
    real_share = budget_module.share

    def spy(model_, sender, layers, mode="causal", opening=0):
        shared_layers.append(set(layers))
        return real_share(model_, sender, layers, mode, opening)

    monkeypatch.setattr(budget_module, "share", spy)
    monkeypatch.setattr(budget_module, "METRICS", {"contains": lambda answer, gold: float({2, 3} <= shared_layers[-1])})
    ranking = [5, 2, 7, 3, 0, 1, 4, 6]  # 2 and 3 are in the top 4 (ratio 0.5)
    tight = budget_module.smallest_ratio(Agents(model, model), task, task.items, ranking, tolerance=0.0)
    assert tight["ratio"] == 0.5 and tight["all_layers"] == 1.0 and tight["scores"]["0.375"] == 0.0
    loose = budget_module.smallest_ratio(Agents(model, model), task, task.items, ranking, tolerance=1.0)
    assert loose["ratio"] == 0.125 and loose["layers"] == 1
    with pytest.raises(ConfigError, match="tolerance"):  # before: a bare StopIteration
        budget_module.smallest_ratio(Agents(model, model), task, task.items, ranking, tolerance=float("nan"))


def test_a_budget_ratio_given_back_shares_the_layers_it_was_measured_with():
    """3 of 28 layers is 0.107142…; printed to six figures (0.107143) and given back as --ratio it
    shared 4."""
    from kvcomm.selection.rules import layer_count

    for layers in range(1, 65):
        for count in range(1, layers + 1):
            given_back = math.floor(count / layers * 1e4) / 1e4
            assert layer_count(float(f"{given_back:g}"), layers) == count


def test_calibration_refuses_steps_and_tolerances_it_cannot_use():
    """steps=0 ran a whole search (read as the default), a negative count none; a negative or NaN
    tolerance ran the whole calibration, then a bare StopIteration."""
    from kvcomm import Agents, calibrate, load_task

    model = tiny_loaded("llama")
    task = load_task("facts", items=2)
    for options, said in (({"steps": 0}, "steps are at least 1"), ({"steps": -2}, "steps are at least 1"),
                          ({"tolerance": -0.5}, "tolerance"), ({"tolerance": float("nan")}, "tolerance")):
        with pytest.raises(ConfigError, match=said):
            calibrate(Agents(model, model), task, task.items, progress=False, rule="prune", **options)


def test_greedy_with_a_pool_tries_only_the_previous_best():
    from kvcomm.selection.search import greedy_order

    value = {layer: float(layer) for layer in range(10)}
    sizes = []

    def objective(sets):
        sizes.append(len(sets))
        return np.array([sum(value[layer] for layer in s) for s in sets])

    ranking, trace = greedy_order(objective, 10, steps=4, pool=3)
    assert ranking[:4] == [9, 8, 7, 6] and sizes == [10, 3, 3, 3] and [t["tried"] for t in trace] == [10, 3, 3, 3]


@pytest.mark.parametrize("given, total, expected", [
    ({}, 200, 8), ({"objective": "likelihood"}, 200, 4), ({"selection": "answer"}, 200, 8),
    ({"selection": "prior"}, 200, 4), ({"selection": "paper"}, 200, 1),
    ({}, 3, 2), ({"limit": 2}, 3, 1), ({"limit": 197}, 200, 3), ({"limit": 50}, 200, 8),
    ({"limit": 50, "objective": "probability"}, 200, 4),
    ({"calib_size": 0}, 200, 0), ({"calib_size": 9, "selection": "paper"}, 200, 9),
])
def test_each_rule_takes_its_own_calibration_items_as_far_as_the_task_can_spare(given, total, expected):
    """The searches calibrate on 8 items unless told with their default objective, ``auto`` (4 to
    search on, 4 held out), and on 4 with another (one leaves them noisy); ``prior`` on 4, the
    paper's rule on 1 as in the paper; a small task keeps at least one test item, an explicit
    count wins."""
    from kvcomm import EvalConfig

    assert EvalConfig(**given).calibration_count(total) == expected


def test_the_results_record_how_many_items_calibrated_when_the_rule_chose():
    from kvcomm import Agents, EvalConfig, build_methods, evaluate
    from kvcomm.tasks import load_task

    model = tiny_loaded("llama")
    report = evaluate(Agents(model, model), load_task("facts", items=4), build_methods(["kvcomm"], ratios=[0.5]),
                      EvalConfig(selection="paper", batch_size=4), progress=False)
    assert report.config["calib_size"] == len(report.config["calibration_items"]) == 1
    assert report.config["test_items"] == 3


def test_every_layer_asks_for_no_ranking_so_nothing_is_calibrated_for_it():
    from kvcomm import Agents, EvalConfig, build_methods, evaluate
    from kvcomm.tasks import load_task

    model = tiny_loaded("llama")
    report = evaluate(Agents(model, model), load_task("facts", items=4), build_methods(["kvcomm"], ratios=[1.0]),
                      EvalConfig(batch_size=4, calib_size=1), progress=False)
    assert report.runs[0].layers == [0, 1, 2, 3] and report.profiles == {} and report.profile is None


def test_a_split_that_cannot_hold_its_items_names_the_fix():
    from kvcomm import EvalConfig
    from kvcomm.tasks.base import Item

    items = [Item(id=f"i{n}", context="c", question="q", answers=("a",)) for n in range(3)]
    test, calib = EvalConfig().split(items)
    assert [i.id for i in test] == ["i0"] and [i.id for i in calib] == ["i1", "i2"]
    with pytest.raises(ConfigError, match="lower --limit to at most 2"):
        EvalConfig(limit=3).split(items)
    many = [Item(id=f"i{n}", context="c", question="q", answers=("a",)) for n in range(100)]
    with pytest.raises(ConfigError, match="lower --skip to at most 97, or --limit,"):  # 2 test items after 97 fit
        EvalConfig(limit=2, skip=99, calib_size=1).split(many)
    assert len(EvalConfig(limit=2, skip=97, calib_size=1).split(many)[0]) == 2


def test_backward_elimination_is_the_default_everywhere_and_the_papers_is_one_option_away():
    """The best measured rule (docs/results.md, issue 18) is what eval, sweep, the service and the
    Python API calibrate with unless told; ``paper`` stays a valid choice for reproductions."""
    import inspect

    from kvcomm import EvalConfig, calibrate
    from kvcomm.serve.config import ServeConfig

    assert EvalConfig().selection == ServeConfig().selection == "prune"
    assert inspect.signature(calibrate).parameters["rule"].default == "prune"
    assert EvalConfig(selection="paper").selection == "paper"
    with pytest.raises(ConfigError, match="'paper', 'answer', 'prior' or 'prune'"):
        EvalConfig(selection="attention")


def test_choice_objective_is_the_gold_options_share_where_each_option_departs(family):
    """With rivals, an item scores log P(gold) among the options, each option's logit taken at the
    token where it departs from the gold answer; staircase and whole forwards agree."""
    from kvcomm.protocol import build_receiver_input, prefill_logits
    from kvcomm.selection.likelihood import Scored, answer_loglik

    model = tiny_model(family)
    sender = prefill(model, torch.randint(0, 99, (1, 9)), torch.ones(1, 9, dtype=torch.bool))
    prompt, answer = [5, 6, 7, 8], [9, 10, 11]
    rivals = ((0, 40), (1, 41), (1, 42))  # one option departs at the first token, two at the second
    sets = [frozenset(), frozenset({1}), frozenset({1, 3})]
    item = Scored(sender, prompt, answer, rivals)
    for staircase in (True, False):
        got = answer_loglik(model, item, sets, staircase=staircase)
        for chosen, value in zip(sets, got):
            ids = torch.tensor([prompt + answer[:-1]])
            logits = prefill_logits(model, build_receiver_input(model, sender, sorted(chosen)), ids, ids >= 0)[0]
            at = logits[len(prompt) - 1:]  # at[i] predicts answer[i]
            options = torch.stack([at[0, 9], at[0, 40], at[1, 41] - at[1, 10] + at[0, 9],
                                   at[1, 42] - at[1, 10] + at[0, 9]])
            assert abs(float(torch.log_softmax(options, 0)[0]) - float(value)) < 1e-4


def test_fidelity_is_minus_the_kl_from_every_layer_shared(family):
    """Fidelity scores a set by -mean KL(every layer ‖ set) over the answer's positions, against the
    receiver given exactly those layers; every layer scores 0 and staircase agrees with whole forwards."""
    from kvcomm.protocol import build_receiver_input, prefill_logits
    from kvcomm.selection.likelihood import Scored, answer_loglik, reference_logprobs

    model = tiny_model(family)
    sender = prefill(model, torch.randint(0, 99, (1, 9)), torch.ones(1, 9, dtype=torch.bool))
    prompt, answer = [5, 6, 7, 8], [9, 10, 11]
    reference = reference_logprobs(model, sender, prompt, answer)
    every = frozenset(range(sender.num_layers))
    sets = [frozenset(), frozenset({1}), frozenset({1, 3}), every]
    item = Scored(sender, prompt, answer, reference=reference)
    ids = torch.tensor([prompt + answer[:-1]])
    full = prefill_logits(model, build_receiver_input(model, sender, sorted(every)), ids, ids >= 0)[0]
    assert torch.allclose(reference, torch.log_softmax(full[len(prompt) - 1:], -1), atol=1e-5)
    for staircase in (True, False):
        got = answer_loglik(model, item, sets, staircase=staircase)
        for chosen, value in zip(sets, got):
            logits = prefill_logits(model, build_receiver_input(model, sender, sorted(chosen)), ids, ids >= 0)[0]
            logp = torch.log_softmax(logits[len(prompt) - 1:], -1)
            kl = (reference.exp() * (reference - logp)).sum(-1).mean()
            assert abs(float(-kl) - float(value)) < 1e-4
        assert abs(float(got[-1])) < 1e-5 and float(got[0]) < -1e-4  # no layer shared moves the distribution


def test_calibration_by_fidelity_ranks_every_layer_and_says_so():
    from kvcomm import Agents, calibrate, load_task

    model = tiny_loaded("llama")
    task = load_task("facts", items=3)
    agents = Agents(model, model)
    profile = calibrate(agents, task, task.items, progress=False, rule="answer", objective="fidelity")
    assert sorted(profile.ranking) == [0, 1, 2, 3] and "KL divergence" in profile.details["objective"]
    likelihood = calibrate(agents, task, task.items, progress=False, rule="answer", objective="likelihood")
    # the reference forward of each item (every layer shared) is counted: one call, every layer, per item
    assert profile.cost["forwards_per_item"] == likelihood.cost["forwards_per_item"] + 1
    assert profile.details["whole_forwards_per_item"] == likelihood.details["whole_forwards_per_item"] + 1
    fidelity = [t["loglik"] for t in profile.details["trace"]]
    assert fidelity != [t["loglik"] for t in likelihood.details["trace"]]  # another objective was maximised
    assert all(-50 < value < 0 for value in fidelity)  # minus a KL: below 0 short of every layer, finite


def test_calibration_by_probability_averages_each_items_exp_likelihood():
    """``probability`` scores a set by the mean over items of exp(mean log-likelihood per gold
    token): the first greedy step's values equal that, computed item by item, and lie in (0, 1]."""
    import numpy as np

    from kvcomm import Agents, Batch, calibrate, load_task
    from kvcomm.selection.likelihood import Scored, answer_ids, answer_loglik

    model = tiny_loaded("llama")
    task = load_task("facts", items=3)
    agents = Agents(model, model)
    profile = calibrate(agents, task, task.items, progress=False, rule="answer", objective="probability", pool=None)
    assert sorted(profile.ranking) == [0, 1, 2, 3] and "probability" in profile.details["objective"]
    first = profile.details["trace"][0]
    read = Batch(agents, task, task.items).reading(1, "chats")
    per_item = [answer_loglik(model.model, Scored(read.kv.row(i), read.prompt.ids[i], answer_ids(model, item)),
                              [frozenset([first["layer"]])]).numpy()[0] for i, item in enumerate(task.items)]
    assert abs(first["loglik"] - float(np.mean(np.exp(per_item)))) < 1e-6
    assert all(0 < t["loglik"] <= 1 for t in profile.details["trace"])


def test_the_auto_objective_keeps_the_ranking_held_out_items_answer_better():
    """``auto`` searches with each candidate objective on the later half of the items (each ranking
    equals that search run alone), scores both rankings' top layers at 0.3/0.5/0.7 on the earlier
    half by likelihood (the recorded scores equal it, item by item) and keeps the better."""
    import numpy as np

    from kvcomm import Agents, Batch, EvalConfig, calibrate, load_task
    from kvcomm.errors import ConfigError, DataError
    from kvcomm.selection.likelihood import Scored, answer_ids, answer_loglik
    from kvcomm.selection.rules import top_layers

    model = tiny_loaded("llama")
    task = load_task("facts", items=4)
    agents = Agents(model, model)
    profile = calibrate(agents, task, task.items, progress=False, objective="auto", batch_size=1)
    held = profile.details["held_out"]
    assert held["items"] == [i.id for i in task.items[:2]] and held["searched_on"] == [i.id for i in task.items[2:]]
    rows = 0.0  # decoder-layer passes of one row, over both searches run alone
    for candidate in ("likelihood", "probability"):
        alone = calibrate(agents, task, task.items[2:], progress=False, objective=candidate, batch_size=1)
        assert held["rankings"][candidate] == alone.ranking
        rows += alone.details["layer_rows_per_item"] * 2
    # the first step (every layer but one, for each layer) is the same in both searches: scored once
    layers = agents.num_layers
    assert held["steps_shared"] >= 1
    judged = 2 * 3 * 2 * layers  # 2 held-out items, 3 ratios of 2 rankings, whole forwards
    assert profile.details["layer_rows_per_item"] * 4 <= rows - 2 * layers * layers + judged
    rows = []
    for item in task.items[:2]:
        read = Batch(agents, task, [item]).reading(1, "chats")
        rows.append(Scored(read.kv.row(0), read.prompt.ids[0], answer_ids(model, item)))
    for candidate, ranking in held["rankings"].items():
        sets = [frozenset(top_layers(ranking, ratio)) for ratio in (0.3, 0.5, 0.7)]
        want = np.mean([answer_loglik(model.model, row, sets).numpy() for row in rows])
        assert abs(held["scores"][candidate] - want) < 1e-6
    assert held["chosen"] == max(held["scores"], key=held["scores"].get)
    assert profile.details["objective"] == f"auto: {held['chosen']}"
    assert profile.ranking == held["rankings"][held["chosen"]]
    assert EvalConfig(objective="auto").calibration_count(200) == 8 and EvalConfig(
        objective="auto", selection="paper").calibration_count(200) == 1
    with pytest.raises(ConfigError, match="not prior"):
        calibrate(agents, task, task.items, progress=False, rule="prior", objective="auto")
    with pytest.raises(ConfigError, match="not prior"):  # refused before any model loads
        EvalConfig(objective="auto", selection="prior")
    with pytest.raises(ConfigError, match="at least 2, not --calib-size 1"):
        EvalConfig(objective="auto", calib_size=1)
    assert EvalConfig(objective="auto", selection="paper", calib_size=1).calib_size == 1  # paper ignores it
    with pytest.raises(DataError, match="at least 2"):
        calibrate(agents, task, task.items[:1], progress=False, objective="auto")


def test_unless_told_the_searches_choose_their_objective_and_the_prior_fits_the_likelihood():
    """The default objective is each rule's own: ``auto`` for ``prune`` and ``answer`` given the 8
    items it takes (the same ranking as asking for it), ``likelihood`` on fewer (a search on fewer
    items than it was measured with only when ``auto`` is asked for) and for ``prior`` (which
    ``auto`` refuses: the default must not)."""
    from kvcomm import Agents, EvalConfig, calibrate, load_task
    from kvcomm.selection.calibrate import default_objective

    model = tiny_loaded("llama")
    task = load_task("facts", items=8)
    agents = Agents(model, model)
    default = calibrate(agents, task, task.items, progress=False, batch_size=4)
    asked = calibrate(agents, task, task.items, progress=False, batch_size=4, objective="auto")
    assert default.details["objective"].startswith("auto: ") and default.ranking == asked.ranking
    assert default.details["held_out"] == asked.details["held_out"]
    assert len(default.details["held_out"]["searched_on"]) == 4
    for fewer in (task.items[:1], task.items[:4], task.items[:7]):
        profile = calibrate(agents, task, fewer, progress=False, batch_size=4)
        assert profile.details["objective"] == "mean log-likelihood per gold-answer token"
        assert "held_out" not in profile.details
    prior = calibrate(agents, task, task.items[:2], progress=False, rule="prior")
    assert prior.details["objective"] == "mean log-likelihood per gold-answer token"
    assert [default_objective(rule, 8) for rule in ("prune", "answer", "prior", "paper")] == \
        ["auto", "auto", "likelihood", "likelihood"] and default_objective("prune", 7) == "likelihood"
    assert EvalConfig(selection="prior").objective is None and EvalConfig(calib_size=1).calib_size == 1


def test_fidelity_ignores_tokens_the_reference_gives_no_probability():
    """A vocabulary entry masked to -inf in the reference adds 0 to the KL, not NaN."""
    from kvcomm.selection.likelihood import Scored, answer_loglik, reference_logprobs

    model = tiny_model("llama")
    sender = prefill(model, torch.randint(0, 99, (1, 6)), torch.ones(1, 6, dtype=torch.bool))
    prompt, answer = [5, 6, 7], [9, 10]
    reference = reference_logprobs(model, sender, prompt, answer)
    masked = reference.clone()
    masked[:, 50:] = float("-inf")
    masked = torch.log_softmax(masked, dim=-1)
    values = answer_loglik(model, Scored(sender, prompt, answer, reference=masked), [frozenset(), frozenset({0})])
    assert torch.isfinite(values).all() and (values < 0).all()


def test_rival_tokens_mark_where_each_option_departs_from_the_gold_answer():
    from kvcomm.selection.likelihood import answer_ids, rival_tokens
    from kvcomm.tasks.base import Item

    loaded = tiny_loaded()
    item = Item(id="x", context="c", question="q", answers=("Atlas LLC",),
                choices=("Atlas LLC", "Apex LLC", "Sable LLC", "Atlas LLC Holdings"))
    gold = answer_ids(loaded, item)
    rivals = rival_tokens(loaded, item, gold)
    written = {o: answer_ids(loaded, Item(id="o", context="c", question="q", answers=(o,))) for o in item.choices}
    # "Atlas LLC Holdings" runs on past the gold answer's tokens: one pass cannot tell it apart
    assert len(rivals) == 2
    for option, (index, token) in zip(("Apex LLC", "Sable LLC"), rivals):
        assert written[option][:index] == gold[:index] and written[option][index] == token != gold[index]
    assert rival_tokens(loaded, Item(id="y", context="c", question="q", answers=("a",)), [1]) == ()


def test_an_item_whose_answer_is_not_among_its_choices_is_refused():
    from kvcomm.tasks.base import Item

    with pytest.raises(DataError, match="not among its choices"):
        Item(id="x", context="c", question="q", answers=("Nova LLC",), choices=("Atlas LLC", "Apex LLC"))


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
def test_a_blank_gold_answer_is_refused_with_or_without_a_chat_template(chat):
    """Without a chat template an answer is written after a space: a blank gold answer would score
    that space instead of being refused."""
    import copy
    from dataclasses import replace

    from kvcomm.selection.likelihood import answer_ids
    from kvcomm.tasks.base import Item

    loaded = tiny_loaded()
    if not chat:
        plain = copy.deepcopy(loaded.tokenizer)
        plain.chat_template = None
        loaded = replace(loaded, tokenizer=plain)
    assert loaded.has_chat_template == chat
    for blank in ("", "  "):
        with pytest.raises(DataError, match="no tokens"):
            answer_ids(loaded, Item(id="b", context="c", question="q", answers=(blank,)))


@pytest.mark.parametrize("options, match", [({"pieces": "passage"}, "unknown pieces 'passage'"),
                                            ({"mu": 5.0}, "mu"), ({"sigma": 0.0}, "sigma"),
                                            ({"batch_size": 0}, "batch size")])
def test_calibration_options_are_checked_before_any_work(options, match):
    """A typo in ``pieces`` calibrated on chats and recorded the typo; ``mu=5`` ranked layers."""
    from kvcomm import Agents, calibrate
    from kvcomm.tasks import load_task

    model = tiny_loaded("llama")
    task = load_task("facts", items=2)
    with pytest.raises(ConfigError, match=match):
        calibrate(Agents(model, model), task, task.items, progress=False, rule="paper", **options)
