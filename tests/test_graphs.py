"""Agent graphs: topologies unroll as documented; a turn heard as KV at every layer equals reading
the concatenated token sequence; batches equal single items; bytes are counted per edge; the relay
task needs every hop."""

from __future__ import annotations

import warnings

import pytest
import torch

from kvcomm.errors import ConfigError, DataError
from kvcomm.graphs import DECISION, EdgeOptions, Graph, Step, Turn, unroll
from kvcomm.protocol import empty_input, greedy_generate, pad_left
from kvcomm.tasks import load_task
from kvcomm.tasks.base import Item
from tests.conftest import tiny_loaded


def hears(steps):
    return {(s.agent, s.turn.round): [(t.agent, t.round) for t in s.hears] for s in steps}


def test_topologies_unroll_into_the_documented_edges():
    assert hears(unroll("chain", 3)) == {(0, 0): [], (1, 0): [(0, 0)], (2, 0): [(1, 0)]}
    assert hears(unroll("chain", 2, rounds=2))[(0, 1)] == [(1, 0)]
    assert hears(unroll("star", 3)) == {(0, 0): [], (1, 0): [], (2, 0): [], (DECISION, 0): [(0, 0), (1, 0), (2, 0)]}
    full = hears(unroll("full", 3, rounds=2))
    assert full[(2, 0)] == [(0, 0), (1, 0)] and full[(1, 1)] == [(0, 0), (2, 0), (0, 1)]
    assert full[(DECISION, 1)] == [(0, 1), (1, 1), (2, 1)]
    debate = hears(unroll("debate", 2, rounds=3))
    assert debate[(0, 0)] == [] and debate[(1, 2)] == [(0, 1), (1, 1)] and debate[(DECISION, 2)] == [(0, 2), (1, 2)]


def test_bad_graphs_are_refused_with_a_clear_error():
    with pytest.raises(ConfigError, match="unknown topology 'ring'; valid: chain, star, full, debate"):
        unroll("ring", 3)
    with pytest.raises(ConfigError, match="at least 2 turns"):
        unroll("chain", 1)
    with pytest.raises(ConfigError, match="a star has one round"):  # before: later rounds ran, heard by no one
        unroll("star", 2, rounds=2)
    with pytest.raises(ConfigError, match="reply_tokens is the budget of a turn, a whole number at least 1, not 0"):
        Graph.build(tiny_loaded(), "chain", 2, reply_tokens=0)
    # before: range()'s ValueError
    with pytest.raises(ConfigError, match="the batch size is a whole number at least 1, not 0"):
        Graph.build(tiny_loaded(), "chain", 2).run(load_task("relay", items=1, hops=2), load_task(
            "relay", items=1, hops=2).items, batch_size=0)
    model = tiny_loaded()
    with pytest.raises(ConfigError, match="agent1/r1 hears agent2/r1, which has not spoken yet"):
        Graph(model, [Step(Turn(0, 0), (Turn(1, 0),)), Step(Turn(1, 0), ())], 2)
    with pytest.raises(ConfigError, match="ratio or a layer list, not both"):
        EdgeOptions(ratio=0.5, layers=(1,))
    with pytest.raises(ConfigError, match="are for kv edges: a text edge carries words"):
        EdgeOptions(via="text", ratio=0.5)
    with pytest.raises(ConfigError, match="agent2/r1 hears a turn twice"):
        Graph(model, [Step(Turn(0, 0), ()), Step(Turn(1, 0), (Turn(0, 0), Turn(0, 0)))], 2)
    with pytest.raises(ConfigError, match="agent1/r1 speaks twice"):
        Graph(model, [Step(Turn(0, 0), ()), Step(Turn(0, 0), ())], 2)
    with pytest.raises(ConfigError, match="out of range for a 4-layer model"):
        Graph.build(model, "chain", 2, edge=EdgeOptions(layers=(7,)))
    with pytest.raises(ConfigError, match="codec"):
        EdgeOptions(codec="mp3")
    # one set of layers, one edge and one label, however it was written
    assert EdgeOptions(layers=(1, 0)) == EdgeOptions(layers=(0, 1, 1)) == EdgeOptions(layers=(0, 1))
    assert EdgeOptions(layers=(1, 0)).label == "kv@0-1+fp16"
    for agents in (0, -5, 2.5):  # before: 0 and -5 ran a graph that read nothing, 2.5 a TypeError
        with pytest.raises(ConfigError, match="whole number >= 1"):
            Graph(model, [Step(Turn(DECISION, 0), ())], agents)
    from kvcomm.graphs.compare import graph_grid

    for edges, reuse, said in (([], [False], "no edge configuration"), ([EdgeOptions()], [], "no reuse setting")):
        with pytest.raises(ConfigError, match=said):  # before: a message about prefixes no one asked for
            graph_grid(edges, reuse)
    with pytest.raises(ConfigError, match="blend recomputes heard KV placed inline"):
        EdgeOptions(place="prefix", blend=0.15)
    with pytest.raises(ConfigError, match="other than causal is for place prefix"):
        EdgeOptions(mode="shift-back")
    turns = EdgeOptions(content="turn")  # inline: a speaker that hears turns would send only what follows them
    with pytest.raises(ConfigError, match="agent2/r1 hears turns inline and is heard: no one piece of KV holds"):
        Graph.build(model, "chain", 3, edge=turns)
    with pytest.raises(ConfigError, match="cannot reuse the question"):
        Graph.build(model, "star", 2, edge=turns, reuse=True)
    assert Graph.build(model, "star", 3, edge=turns).label == "star×3 kv-turn@all+fp16"  # speakers hear nothing
    assert Graph.build(model, "chain", 3, edge=turns.model_copy(update={"place": "prefix"})).steps
    assert EdgeOptions(place="prefix", mode="shift-back").label == "kv/prefix@all+fp16[shift-back]"


def items(count=3, pieces=3):
    return [Item(id=str(i), context="", question=f"q{i}?", answers=("x",),
                 pieces=(f"a{i}" * (i + 1), "bb", "c")[:pieces]) for i in range(count)]


def expected_replies(model, graph, task, item, budget, heard=True):
    """Every turn computed as plain generation over the concatenated token sequence it hears
    (``heard=False``: over its own prompt alone, to show the check is sensitive to what is heard)."""
    ids, replies, text = {}, {}, []
    for step in graph.steps:
        own = graph.prompt_ids(step, graph.message(task, item, step, []))
        prefix = [token for t in step.hears for token in ids[t] + replies[t]] if heard else []
        tokens, valid = pad_left([prefix + own], model.pad_id)
        out = greedy_generate(model.model, empty_input(model.model, 1), tokens, valid, budget, model.stop_ids,
                              model.pad_id)[0]
        ids[step.turn], replies[step.turn] = own, out
        text.append(model.decode(out))
    return text


# where every hearer hears the whole history: a chain of 2; full (the decision agent hears all 3)
@pytest.mark.parametrize("topology,agents", [("chain", 2), ("full", 3)])
def test_turns_heard_as_kv_at_every_layer_read_as_the_concatenated_sequence(family, topology, agents):
    model = tiny_loaded(family, seed={"gemma3": 2}.get(family, 1))  # seeds whose replies depend on context
    task = load_task("facts", items=1, max_new_tokens=6)
    edge = EdgeOptions(content="turn", place="prefix", codec=None)  # whole turns, every layer, in process
    graph = Graph.build(model, topology, agents, edge=edge)
    run = graph.run(task, items(3, agents), batch_size=3, progress=False)
    sensitive = False
    for row, item in zip(run.items, items(3, agents)):
        assert row.replies == expected_replies(model, graph, task, item, 6)
        sensitive |= row.replies != expected_replies(model, graph, task, item, 6, heard=False)
    assert sensitive  # what is heard changes the replies, so the equality above says something


def test_heard_kv_placed_inline_has_its_two_exact_ends(family):
    """Blend 1 (every context token recomputed) reads the spliced token sequence as plain text;
    blend 0 is the splice alone."""
    model = tiny_loaded(family, seed={"gemma3": 2}.get(family, 1))
    task = load_task("facts", items=1, max_new_tokens=5)
    for content in ("reply", "turn"):
        full = Graph.build(model, "chain", 2, edge=EdgeOptions(content=content, codec=None, blend=1.0))
        runs = full.run(task, items(2, 2), progress=False)
        for row, item in zip(runs.items, items(2, 2)):
            first = full.steps[0]
            own = model.encode_message(full.message(task, item, first, []))
            tokens, valid = pad_left([own], model.pad_id)
            reply = greedy_generate(model.model, empty_input(model.model, 1), tokens, valid, 5, model.stop_ids,
                                    model.pad_id)[0]
            heard = (own if content == "turn" else []) + (reply or own[-1:])
            marker = "\x00heard\x00"
            head, tail = model.encode_message_parts(full.message(task, item, full.steps[1], [("agent1", marker)]),
                                                    [marker])
            tokens, valid = pad_left([head + heard + tail], model.pad_id)
            expected = greedy_generate(model.model, empty_input(model.model, 1), tokens, valid, 5, model.stop_ids,
                                       model.pad_id)[0]
            assert row.replies == [model.decode(reply), model.decode(expected)]
        none = Graph.build(model, "chain", 2, edge=EdgeOptions(content=content, codec=None, blend=0.0))
        reuse = Graph.build(model, "chain", 2, edge=EdgeOptions(content=content, codec=None))
        assert [r.replies for r in none.run(task, items(2, 2), progress=False).items] == \
            [r.replies for r in reuse.run(task, items(2, 2), progress=False).items]


def test_a_batch_answers_as_items_one_at_a_time_for_kv_and_text():
    model = tiny_loaded("qwen2")
    task = load_task("relay", items=5, hops=3, max_new_tokens=4)
    for edge in (EdgeOptions(ratio=0.5, codec="int8"), EdgeOptions(via="text")):
        graph = Graph.build(model, "chain", 3, edge=edge)
        batched = graph.run(task, task.items, batch_size=5, progress=False)
        alone = graph.run(task, task.items, batch_size=1, progress=False)
        assert [r.replies for r in batched.items] == [r.replies for r in alone.items]


def test_an_auto_edge_counts_the_encoding_its_hearer_waits_for():
    graph = Graph.build(tiny_loaded(), "chain", 2, edge=EdgeOptions(codec="auto"))
    assert graph._codec is not None and graph._codec.params()["count_encode"] is True


def test_bytes_are_counted_per_edge_and_fall_with_fewer_layers():
    model = tiny_loaded()
    task = load_task("relay", items=2, hops=3, max_new_tokens=3)
    every = Graph.build(model, "chain", 3, edge=EdgeOptions(codec="fp16")).run(task, task.items, progress=False)
    half = Graph.build(model, "chain", 3, edge=EdgeOptions(ratio=0.5, codec="fp16")).run(task, task.items,
                                                                                         progress=False)
    text = Graph.build(model, "chain", 3, edge=EdgeOptions(via="text")).run(task, task.items, progress=False)
    for run in (every, half, text):
        first, middle, last = run.steps
        assert first.bytes_in == 0 and first.bytes_out > 0 and middle.bytes_in == first.bytes_out
        assert last.bytes_out == 0  # nobody hears the answer
        assert run.bytes_per_item == pytest.approx(first.bytes_out + middle.bytes_out)
    assert half.steps[0].bytes_out < every.steps[0].bytes_out and half.layers == [1, 2]
    replies = [r.replies for r in text.items]
    assert text.steps[0].bytes_out == pytest.approx(sum(len(r[0].encode()) for r in replies) / 2)


def test_text_edges_put_the_replies_heard_in_the_prompt():
    model = tiny_loaded()
    task = load_task("relay", items=1, hops=2)
    graph = Graph.build(model, "chain", 2, edge=EdgeOptions(via="text"))
    item = task.items[0]
    message = graph.message(task, item, graph.steps[1], [("agent1", "Istra")])
    assert f"Context: {item.pieces[1]}" in message and "Message from agent1: Istra" in message
    assert message.endswith(f"Question: {item.asks[1]}")
    decision = Graph.build(model, "star", 2).message(task, item, Step(Turn(DECISION, 0), ()), [])
    assert "Context" not in decision and decision.endswith(f"Question: {item.question}")
    single = Graph.single(model).message(task, item, Step(Turn(0, 0), ()), [])
    assert f"Context: {item.context}" in single and single.endswith(f"Question: {item.question}")


@pytest.mark.parametrize("hops", [2, 3, 4])
def test_the_relay_needs_every_hop_in_order(hops):
    task = load_task("relay", items=20, hops=hops, seed=3)
    assert task == load_task("relay", items=20, hops=hops, seed=3)  # seeded
    for item in task.items:
        assert len(item.pieces) == len(item.asks) == len(item.ask_answers) == hops
        assert item.answers == (item.ask_answers[-1],)
        start = item.asks[0].split("Who is ")[-1].split("Which city does ")[-1].split("'s")[0].split(" live")[0]
        subjects = [start, *item.ask_answers[:-1]]
        for j, (piece, subject, hop) in enumerate(zip(item.pieces, subjects, item.ask_answers)):
            fact = next(s for s in piece.split(". ") if s.startswith(f"{subject} ") or s.startswith(f"{subject}'s"))
            assert fact.rstrip(".").endswith(f" {hop}")  # each hop sits in its own piece …
            assert [k for k, p in enumerate(item.pieces) if hop in p] == [j, j + 1][:hops - j]  # … and the next's
        assert all("previous message" in ask for ask in item.asks[1:])  # … and needs the one before
        countries = [s.split(" is in ")[1] for s in item.pieces[-1].split(". ") if " is in " in s]
        assert len(set(countries)) == len(countries)  # the answer cannot be guessed from repeats
    with pytest.raises(DataError, match="2..4 hops"):
        load_task("relay", hops=5)


def test_hop_accuracy_scores_each_agent_against_its_hop():
    model = tiny_loaded()
    task = load_task("relay", items=2, hops=2, max_new_tokens=2)
    run = Graph.build(model, "chain", 2, edge=EdgeOptions(via="text")).run(task, task.items, progress=False)
    assert all(row.hop_accuracy is not None and 0 <= row.hop_accuracy <= 1 for row in run.steps)
    assert Graph.single(model).run(task, task.items, progress=False).steps[0].hop_accuracy is None


def test_the_cli_runs_every_configuration_and_writes_json_and_a_plot(tiny_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from kvcomm.cli import app

    out = tmp_path / "graph.json"
    result = CliRunner().invoke(app, ["graph", "-m", str(tiny_dir), "-t", "relay", "--agents", "2", "--limit", "3",
                                      "--via", "kv,text", "--ratios", "0.5,1", "--codecs", "none,int8",
                                      "--blends", "none", "-q", "--out", str(out)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [r["label"] for r in report["runs"]] == ["single agent", "chain×2 kv@0.5", "chain×2 kv@0.5+int8",
                                                    "chain×2 kv@all", "chain×2 kv@all+int8", "chain×2 text"]
    assert all(r["n"] == 3 and len(r["steps"]) == (1 if r["topology"] == "single" else 2) for r in report["runs"])
    assert out.with_suffix(".png").stat().st_size > 1000 and "per agent" in result.output
    bad = CliRunner().invoke(app, ["graph", "-m", str(tiny_dir), "--via", "kv,smoke", "--out", str(out)])
    assert bad.exit_code != 0 and "--via: 'smoke' is not one of kv, kv-turn, text, text-turn" in bad.output
    lonely = CliRunner().invoke(app, ["graph", "-m", "no-such-model", "--agents", "1", "--out", str(out)])
    assert lonely.exit_code == 2 and "a chain needs at least 2 turns" in lonely.output  # before any model loads
    reused = CliRunner().invoke(app, ["graph", "-m", str(tiny_dir), "-t", "facts", "--topology", "star", "--agents",
                                      "2", "--limit", "4", "--via", "text", "--reuse", "off,on,anchor", "--no-single",
                                      "-q", "--batch-size", "1", "--anchor-threshold", "1", "--overwrite", "--out",
                                      str(out)], env={"COLUMNS": "200"})
    assert reused.exit_code == 0, reused.output
    runs = json.loads(out.read_text())["runs"]
    assert [r["label"] for r in runs] == ["star×2 text", "star×2 text +reuse", "star×2 text +reuse/anchorγ1"]
    assert runs[0]["steps"][0]["reused_tokens"] == 0 < runs[1]["steps"][0]["reused_tokens"]
    # three anchors (the 2nd and 3rd had fewer than 2 at least as long), the 4th item reused at every step
    assert runs[2]["anchored"] == pytest.approx(1 / 4) and runs[2]["anchors"]["threshold"] == 1
    assert "questions anchor-corrected" in reused.output
    wrong = CliRunner().invoke(app, ["graph", "-m", str(tiny_dir), "--reuse", "maybe", "--out", str(out)])
    assert wrong.exit_code != 0 and "--reuse takes off, on and anchor" in wrong.output
    clustered = CliRunner().invoke(app, ["graph", "-m", str(tiny_dir), "--reuse", "anchor", "--ray", "local", "--out",
                                         str(out)])
    assert clustered.exit_code == 2 and "not with --ray" in clustered.output
    stray = CliRunner().invoke(app, ["graph", "-m", str(tiny_dir), "--reuse", "on", "--no-anchor-closing", "--out",
                                     str(out)])
    assert stray.exit_code == 2 and "are for --reuse anchor" in stray.output


def test_the_cli_refuses_options_that_would_do_nothing_or_lose_a_file(tiny_dir, tmp_path, monkeypatch):
    """Before any model loads: KV-only options with no KV edge, a ratio above 1, a codec or blend
    that does not exist, whatever --via says (before, they ran, or --ratios 5 became every layer),
    a grid whose every graph is left out (before, only the single agent ran, exit 0), an --out
    whose plot would replace it, and a plot in the way."""
    from typer.testing import CliRunner

    from kvcomm.cli import app

    out = tmp_path / "g.json"
    base = ["graph", "-m", str(tiny_dir), "-t", "relay", "--agents", "2", "--limit", "1", "-q"]
    for extra, said in ((["--via", "text", "--codecs", "bogus"], "bogus"),
                        (["--via", "text", "--blends", "7"], "blend"),
                        (["--via", "text", "--ratios", "0.5"], "are for kv edges; --via text has none"),
                        (["--via", "text", "--place", "prefix"], "are for kv edges"),
                        (["--via", "kv", "--ratios", "5"], "0 < RATIO <= 1"),
                        (["--via", "kv", "--place", "prefix", "--reuse", "on"], "no graph to run"),
                        (["--out", str(tmp_path / "g.png")], "give the results another name")):
        refused = CliRunner().invoke(app, [*base, *extra, *(["--out", str(out)] if "--out" not in extra else [])],
                                     env={"COLUMNS": "200"})
        assert refused.exit_code == 2 and said in refused.output, (extra, refused.output)
    (tmp_path / "g.png").write_bytes(b"precious")
    in_the_way = CliRunner().invoke(app, [*base, "--out", str(out)], env={"COLUMNS": "200"})
    assert in_the_way.exit_code == 2 and "g.png exists" in in_the_way.output
    assert (tmp_path / "g.png").read_bytes() == b"precious" and not out.exists()
    grid = CliRunner().invoke(app, [*base, "--via", "kv,text", "--place", "prefix", "--reuse", "off,on", "--no-single",
                                    "--blends", "none", "--overwrite", "--out", str(out)], env={"COLUMNS": "200"})
    assert grid.exit_code == 0, grid.output
    assert "not run: kv/prefix@all+fp16 with reuse on" in grid.output
    # --overwrite: the earlier run's results and plot are gone once the model has loaded, so that a
    # run that then fails leaves nothing to take for its own (before: both stayed, looking new)
    import kvcomm.cli.graph as graph_command

    def no_room(*args, **kwargs):
        raise MemoryError("no room")

    monkeypatch.setattr(graph_command, "compare", no_room)
    failed = CliRunner().invoke(app, [*base, "--via", "text", "--no-single", "--overwrite", "--out", str(out)])
    assert isinstance(failed.exception, MemoryError) and not out.exists() and not (tmp_path / "g.png").exists()


def test_the_cli_says_what_a_relay_cannot_do(tiny_dir, tmp_path, monkeypatch):
    """Reuse on a chain relay (each agent asked its own hop) ran extra rows that reused nothing,
    labelled +reuse; --blends with KV placed as a prefix was dropped silently; --agents beyond a
    relay's hops was refused as 'hops'; text edges recorded a codec."""
    import json

    from typer.testing import CliRunner

    from kvcomm.cli import app

    out = tmp_path / "g.json"
    base = ["graph", "-m", str(tiny_dir), "-t", "relay", "--limit", "2", "-q", "--no-single", "--out", str(out)]
    ran = CliRunner().invoke(app, [*base, "--agents", "2", "--via", "text", "--reuse", "off,on,anchor"],
                             env={"COLUMNS": "200"})
    assert ran.exit_code == 0, ran.output
    assert "not run: reuse on (no two agents are asked the same question" in ran.output
    report = json.loads(out.read_text())
    assert [r["label"] for r in report["runs"]] == ["chain×2 text"] and report["runs"][0]["edge"]["codec"] is None
    assert report["config"]["data"] is None
    for extra, said in ((["--agents", "2", "--via", "text", "--reuse", "on"], "no graph to run: reuse reuses"),
                        (["--agents", "2", "--via", "kv", "--place", "prefix", "--blends", "0.3"],
                         "--place prefix) recomputes nothing"),
                        (["--agents", "2", "--via", "kv", "--place", "prefix", "--blends", "0.15"],  # the default's
                         "--place prefix) recomputes nothing"),                                       # value, given
                        (["--agents", "2", "--via", "text", "--blends", "0.15"], "are for kv edges"),
                        (["--agents", "5"], "--agents 5: a graph over relay gives each agent one of its hops, "
                                            "and relay has 2 to 4")):
        refused = CliRunner().invoke(app, [*base, "--overwrite", *extra], env={"COLUMNS": "200"})
        assert refused.exit_code == 2 and said in " ".join(refused.output.split()), (extra, refused.output)
    # what only a graph refuses, before any model loads
    monkeypatch.setattr("kvcomm.cli.graph.load_model", lambda *args, **kwargs: pytest.fail("a model loaded"))
    early = CliRunner().invoke(app, ["graph", "-m", str(tiny_dir), "-t", "relay", "--agents", "3",
                                     "--via", "kv-turn", "--out", str(out)], env={"COLUMNS": "200"})
    assert early.exit_code == 2 and "hears turns inline and is heard" in " ".join(early.output.split())


def test_a_relay_asks_its_hops_only_of_agents_that_hear_the_hop_before():
    """In a star every agent but the first hears no one, yet was asked about "the previous message"
    and scored on that hop; they are asked the item's question now, and have no hop accuracy."""
    model = tiny_loaded()
    task = load_task("relay", items=2, hops=3, max_new_tokens=2)
    item = task.items[0]
    star = Graph.build(model, "star", 3, edge=EdgeOptions(via="text"))
    assert [star.ask(item, step) for step in star.steps] == [item.asks[0], item.question, item.question,
                                                             item.question]
    chain = Graph.build(model, "chain", 3, edge=EdgeOptions(via="text"))
    assert [chain.ask(item, step) for step in chain.steps] == list(item.asks)
    run = star.run(task, task.items, progress=False)
    assert [s.hop_accuracy is None for s in run.steps] == [False, True, True, True]
    assert not chain.shares_question(task.items) and star.shares_question(task.items)
    debate = Graph.build(model, "debate", 3, rounds=2, edge=EdgeOptions(via="text"))
    hop = {(s.agent, s.turn.round): debate.ask(item, s) != item.question for s in debate.steps}
    # round 2: each agent hears every first-round turn, the last of them agent 3's: agent 2's hop question
    # ("the person named in the previous message") would point at agent 3's reply, not agent 1's (before,
    # it was asked it all the same), so only agent 1, whose hop names its person, is asked its hop
    assert hop == {(0, 0): True, (1, 0): False, (2, 0): False, (0, 1): True, (1, 1): False, (2, 1): False,
                   (-1, 1): False}
    from kvcomm.graphs.report import _hop_column

    ran = debate.run(task, task.items, progress=False)
    assert [s.hop_accuracy is None for s in ran.steps] == [not hop[s.agent, s.turn.round] for s in debate.steps]
    column = _hop_column(ran.steps)  # each value named by its turn, "-" where none was asked
    assert column.startswith("agent1 ") and "agent2 -" in column and "agent3/r2 -" in column
    assert _hop_column(star.run(task, task.items, progress=False).steps).endswith(", agent2 -, agent3 -, decision -")
    assert _hop_column(chain.run(task, task.items, progress=False).steps).count(" ") == 2  # a chain's: bare
    with pytest.warns(UserWarning, match="nothing is reused"):
        Graph.build(model, "chain", 3, edge=EdgeOptions(via="text"), reuse=True).run(task, task.items, progress=False)


def test_graph_api_mistakes_are_config_errors():
    from kvcomm.graphs.compare import compare

    model = tiny_loaded()
    task = load_task("relay", items=1, hops=2, max_new_tokens=2)
    graph = Graph.build(model, "chain", 2, edge=EdgeOptions(via="text"))
    for call, said in ((lambda: Graph.build(model, "chain", 2, reply_tokens=2.5), "reply_tokens is the budget"),
                       (lambda: graph.run(task, task.items, batch_size=2.5), "batch size is a whole number"),
                       (lambda: graph.run(task, task.items, batch_size="4"), "batch size is a whole number"),
                       (lambda: compare(model, task, task.items, "chain", 2, [EdgeOptions()], reuse=True),
                        "reuse is a list"),
                       (lambda: compare(model, task, task.items, "chain", 2, EdgeOptions()), "edges is a list"),
                       (lambda: EdgeOptions(via="text", codec="klt"), "a codec is for kv edges")):
        with pytest.raises(ConfigError, match=said):
            call()
    assert EdgeOptions(via="text").codec is None and EdgeOptions(via="text", codec="fp16").codec is None


def test_a_codec_s_one_off_costs_are_paid_before_the_clock_starts(monkeypatch):
    """Entropy coders compile and build tables on their first long message: a graph with a codec
    sends one message before its clock starts (before, the first item's turn paid for it)."""
    import kvcomm.graphs.graph as graph_module

    model = tiny_loaded()
    task = load_task("relay", items=1, hops=2, max_new_tokens=2)
    events: list[str] = []
    real_clock, real_send = graph_module.clock, graph_module.Graph._send
    monkeypatch.setattr(graph_module, "clock", lambda: events.append("clock") or real_clock())
    monkeypatch.setattr(graph_module.Graph, "_send",
                        lambda self, kv, counts: events.append(f"send {max(counts)}") or real_send(self, kv, counts))
    Graph.build(model, "chain", 2, edge=EdgeOptions(codec="int4-ans")).run(task, task.items, progress=False)
    assert events[0].startswith("send") and int(events[0].split()[1]) >= 32 and events[1] == "clock"
    events.clear()
    Graph.build(model, "chain", 2, edge=EdgeOptions(codec=None)).run(task, task.items, progress=False)
    assert events[0] == "clock"  # in process: nothing to warm


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_the_hearer_s_own_text_between_heard_turns_is_computed_after_them(family, monkeypatch):
    """Exact end: where the pieces before it are a full prefill's, the hearer's own text after them
    (``continued``) is what that prefill computes for it (before, each own segment was prefilled
    alone from position 0); and a hearer of two turns inline uses it for the text between them."""
    import kvcomm.graphs.graph as graph_module
    from kvcomm.graphs.graph import continued
    from kvcomm.protocol import SharedKV, pad_left, prefill, splice
    from kvcomm.protocol.reply import rebase

    model = tiny_loaded(family, seed={"gemma3": 2}.get(family, 1))
    tokens = torch.randint(3, 90, (1, 17), generator=torch.Generator().manual_seed(0))
    full = prefill(model.model, tokens, torch.ones_like(tokens, dtype=torch.bool))
    a, b = SharedKV.whole(full.first(6)), SharedKV.whole(rebase(model.model, full.last([11]).first(5)))
    tail = rebase(model.model, full.last([6]))
    after = continued(model, [splice(model.model, [a, b])], *pad_left([tokens[0, 11:].tolist()], model.pad_id))[0]
    alone = SharedKV.whole(prefill(model.model, tokens[:, 11:], torch.ones(1, 6, dtype=torch.bool)))
    for layer in range(1, len(tail.keys)):
        torch.testing.assert_close(after.keys[layer], tail.keys[layer], rtol=0, atol=1e-4)
        torch.testing.assert_close(after.values[layer], tail.values[layer], rtol=0, atol=1e-4)
    assert (alone.values[1] - tail.values[1]).abs().max() > 1e-3  # alone it is another computation
    calls = []
    real = graph_module.continued
    monkeypatch.setattr(graph_module, "continued", lambda *args: calls.append(len(args[1])) or real(*args))
    task = load_task("facts", items=1, max_new_tokens=2)
    Graph.build(model, "star", 2, edge=EdgeOptions(codec=None)).run(task, task.items, progress=False)
    assert calls == [1]  # the decision agent: its text between the two turns it hears


def test_splice_joins_pieces_that_share_different_layers():
    import torch

    from kvcomm.protocol import SharedKV, concat_shared, prefill, share, splice

    model = tiny_loaded()
    a = prefill(model.model, *pad_left([[5, 6, 7, 8]], model.pad_id))
    b = prefill(model.model, *pad_left([[9, 10, 11]], model.pad_id))
    whole = [SharedKV.whole(a), SharedKV.whole(b)]
    joined, reference = splice(model.model, whole), concat_shared(model.model, whole)
    assert all(torch.equal(x, y) for x, y in zip(joined.keys, reference.keys)) and joined.full == reference.full
    partial = splice(model.model, [whole[0], share(model.model, b, [1, 2])])
    assert [k.shape[2] for k in partial.keys] == [4, 7, 7, 4] and partial.full == [False, True, True, False]
    assert partial.positions[1][0].tolist() == [0, 1, 2, 3, 4, 5, 6] and int(partial.context_len[0]) == 7
    with pytest.raises(ConfigError, match="first piece of a splice must be full at every layer"):
        splice(model.model, [share(model.model, a, [1]), whole[1]])


@pytest.mark.parametrize("topology,rounds", [("star", 1), ("full", 2), ("debate", 2), ("chain", 2)])
def test_every_topology_runs_on_a_task_split_among_agents(topology, rounds):
    model = tiny_loaded()
    task = load_task("facts", items=3, facts_per_item=4, max_new_tokens=3)
    for edge in (EdgeOptions(ratio=0.5, blend=0.15), EdgeOptions(via="text")):
        run = Graph.build(model, topology, 2, rounds, edge).run(task, task.items, batch_size=2, progress=False)
        decision = topology != "chain"
        assert len(run.steps) == 2 * rounds + decision and run.n == 3 and run.rounds == rounds
        assert (run.steps[-1].agent == "decision") == decision and run.steps[-1].bytes_out == 0
        assert all(s.bytes_in > 0 for s in run.steps if s.hears) and run.bytes_per_item > 0


def test_a_graph_of_other_agents_than_the_items_pieces_says_so():
    """Through the Python API a relay of 3 hops run by 2 agents was split between sentences and
    asked the item's question, silently; the command line makes the task with as many hops."""
    model = tiny_loaded()
    relay = load_task("relay", items=2, hops=3, max_new_tokens=2)
    graph = Graph.build(model, "chain", 2, edge=EdgeOptions(via="text"))
    with pytest.warns(UserWarning, match="comes in 3 pieces of its own .* 2 agents.*no hop accuracy"):
        run = graph.run(relay, relay.items, progress=False)
    assert all(step.hop_accuracy is None for step in run.steps)
    matched = load_task("relay", items=2, hops=2, max_new_tokens=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph.run(matched, matched.items, progress=False)


# -- reuse across agents: the shared question computed once ---------------------------------------

def test_reusing_the_shared_question_has_its_exact_end_and_counts_what_it_reused(family):
    """With every context token recomputed (blend 1), a graph that reuses each item's question KV
    answers exactly as one that computes it in every agent's own context; reuse off is the plain
    graph. Reused tokens are the heard turns' and the shared question's."""
    model = tiny_loaded(family, seed={"gemma3": 2}.get(family, 1))
    task = load_task("facts", items=1, max_new_tokens=4)
    runs = {}
    for reuse in (False, True):
        for blend in (1.0, None):
            edge = EdgeOptions(codec=None, blend=blend)
            runs[reuse, blend] = Graph.build(model, "star", 2, edge=edge, reuse=reuse).run(task, items(3, 2),
                                                                                           progress=False)
    assert [r.replies for r in runs[True, 1.0].items] == [r.replies for r in runs[False, 1.0].items]
    assert runs[True, None].label.endswith("+reuse") and runs[True, None].reuse
    plain, reused = runs[False, None].steps, runs[True, None].steps
    for before, after in zip(plain, reused):
        assert after.prompt_tokens == before.prompt_tokens  # the same context, some of it reused
    first, second, decision = reused
    assert plain[0].reused_tokens == 0 and 0 < first.reuse_rate < 1 and first.reused_tokens == second.reused_tokens
    assert decision.reused_tokens > plain[2].reused_tokens > 0  # heard replies, plus the question


def test_the_question_is_prefilled_once_per_item_for_every_agent(monkeypatch):
    import kvcomm.graphs.graph as graph_module

    model = tiny_loaded()
    task = load_task("facts", items=1, max_new_tokens=3)
    calls = []
    real = graph_module.prefill_shared
    monkeypatch.setattr(graph_module, "prefill_shared", lambda m, rows, pad: calls.append(len(rows)) or real(m, rows,
                                                                                                           pad))
    Graph.build(model, "star", 3, edge=EdgeOptions(via="text"), reuse=True).run(task, items(2), batch_size=2,
                                                                                progress=False)
    assert calls == [2]  # one prefill of both items' questions; every other agent found them
    relay = load_task("relay", items=2, hops=3, max_new_tokens=3)  # each agent asked its own hop: nothing shared
    off = Graph.build(model, "chain", 3, edge=EdgeOptions(via="text")).run(relay, relay.items, progress=False)
    with pytest.warns(UserWarning, match="nothing is reused"):
        on = Graph.build(model, "chain", 3, edge=EdgeOptions(via="text"), reuse=True).run(relay, relay.items,
                                                                                          progress=False)
    assert [r.replies for r in on.items] == [r.replies for r in off.items] and on.reuse and not off.reuse
    assert all(step.reused_tokens == 0 for step in on.steps)
    for wrong in (0, None, "on"):  # before, 0 and None turned reuse on (and 0 got past the prefix check)
        with pytest.raises(ConfigError, match="reuse is True, False or AnchorOptions"):
            Graph.build(model, "chain", 2, edge=EdgeOptions(via="text"), reuse=wrong)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not place prefix"):
        Graph.build(model, "chain", 2, edge=EdgeOptions(place="prefix"), reuse=True)


def test_whole_turns_heard_as_text_carry_no_reuse_markers_and_reuse_counts_blends_recompute(monkeypatch):
    """text-turn with reuse: the turns heard are the words their speakers read (the markers reuse
    cuts a message at stay out of every prompt), and anchors run on them; blend's recomputed tokens
    do not count as reused."""
    import kvcomm.graphs.graph as graph_module
    from kvcomm.graphs import AnchorOptions

    model = tiny_loaded()
    task = load_task("facts", items=1, max_new_tokens=3)
    seen = []
    real = graph_module.Graph._prompt

    def spy(self, *args):
        start = real(self, *args)
        seen.extend(start.messages)
        return start

    monkeypatch.setattr(graph_module.Graph, "_prompt", spy)
    turns = EdgeOptions(via="text", content="turn")
    for reuse in (False, True, AnchorOptions()):
        seen.clear()
        run = Graph.build(model, "star", 2, edge=turns, reuse=reuse).run(task, items(2, 2), progress=False)
        hearer = [m for m in seen if "Message from agent1:" in m]
        assert hearer and all(m.count(graph_module.QUESTION) <= 1 for m in hearer)  # its own question's cut only
        assert all(graph_module.ASKED not in m.split(" Message from ")[1] for m in hearer)  # none in what it heard
        assert run.steps[-1].bytes_in > 0
    monkeypatch.setattr(graph_module.Graph, "_prompt", real)
    blended = {blend: Graph.build(model, "star", 2, edge=EdgeOptions(codec=None, blend=blend), reuse=True)
               .run(task, items(2, 2), progress=False).steps[-1] for blend in (None, 1.0)}
    assert blended[None].recomputed_tokens == 0 and blended[None].reuse_rate > 0
    assert blended[1.0].recomputed_tokens >= blended[1.0].reused_tokens and blended[1.0].reuse_rate == 0


def test_a_graphs_task_takes_the_generators_other_options():
    """--task-option reaches a graph's generated task beside the options the graph sets itself."""
    from kvcomm.cli.graph import graph_task
    from kvcomm.tasks.multihop import FILLER

    plain, more = graph_task("relay", None, 3, 4, 0), graph_task("relay", None, 3, 4, 0, ["distractors=5"])
    assert len(more.items) == 4 and all(len(b.context) > len(a.context) for a, b in zip(plain.items, more.items))
    filled = graph_task("multihop", None, 2, 3, 0, ["multihop:filler_per_piece=1"])
    assert all(len(item.pieces) == 2 and sum(s in item.context for s in FILLER) == 2 for item in filled.items)
    with pytest.raises(ConfigError, match="cannot set items \\(set by --limit\\)"):
        graph_task("relay", None, 3, 4, 0, ["items=9"])
    facts = [graph_task("facts", None, 3, 150, seed) for seed in (0, 7)]  # --limit and --seed reach facts too
    assert [len(t.items) for t in facts] == [150, 150] and facts[0].items[0].context != facts[1].items[0].context


def test_hop_accuracy_refuses_replies_that_do_not_pair_with_the_items():
    """Replies and hop answers were zipped: a missing reply dropped out of the count while n stayed."""
    from kvcomm.errors import ProtocolError
    from kvcomm.graphs.graph import _StepTally
    from kvcomm.graphs.topology import unroll

    step = unroll("chain", 2)[0]
    tally = _StepTally()
    tally.add(0.1, 0.2, [1, 1], 0, 0, ["Cairo", "Oslo"])
    assert tally.row(step, 2, ["Cairo", "Rome"]).hop_accuracy == 0.5
    with pytest.raises(ProtocolError, match="1 replies and 2 hop answers for 2 items"):
        short = _StepTally()
        short.add(0.1, 0.2, [1], 0, 0, ["Cairo"])
        short.row(step, 2, ["Cairo", "Rome"])
