"""Task loaders: the paper's files (by path), generic JSONL, the generated task, bad input."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from kvcomm.errors import ConfigError, DataError
from kvcomm.eval import split_items
from kvcomm.tasks import METRICS, TASKS, Task, load_task
from kvcomm.tasks.loaders import COUNTRIES_SUFFIX
from tests.conftest import shared_file


def test_countries_matches_the_reference_prompts():
    task = load_task("countries", shared_file("countries.jsonl"))
    assert len(task.items) == 200 and task.max_new_tokens == 5
    first = task.items[0]
    assert first.context == "Uma is at the Mahaffie House."
    assert first.question == "Which country is Uma located in?" + COUNTRIES_SUFFIX  # no space, as the reference
    assert first.answers == ("United States",)
    assert task.sender_message(first).startswith("Instruction: Directly answer the question based on the context")


def test_tipsheets_gold_is_the_label():
    task = load_task("tipsheets", shared_file("tipsheets.jsonl"))
    assert len(task.items) == 500 and task.max_new_tokens == 10
    assert task.items[0].answers == ("Sable LLC",)
    assert task.items[0].choices == ("Atlas LLC", "Sable LLC", "Trace LLC")  # the question's options
    assert all(len(item.choices) == 3 for item in task.items)


def test_generic_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"context": "c1", "question": "q1", "answers": ["a", "b"]}, {"id": "x", "context": "c2",
                                                                          "question": "q2", "answers": "z"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = load_task("jsonl", path)
    assert [i.answers for i in task.items] == [("a", "b"), ("z",)] and task.items[1].id == "x"
    assert task.items[0].choices == ()
    path.write_text(json.dumps({"context": "c", "question": "q", "answers": "b", "choices": ["a", "b"]}) + "\n")
    assert load_task("jsonl", path).items[0].choices == ("a", "b")
    path.write_text(json.dumps({"context": "", "question": "q", "answers": "b"}) + "\n")  # closed-book
    assert load_task("jsonl", path).items[0].context == ""
    path.write_text(json.dumps({"context": "c", "question": "q", "answers": "z", "choices": ["a", "b"]}) + "\n")
    with pytest.raises(DataError, match="not among its choices"):
        load_task("jsonl", path)


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"), ('{"context": "c"}', "missing field"), ("[1, 2]", "JSON object"),
    # valid JSON that Python refuses to read, or that is no text: before, a traceback
    ('{"context": "c", "question": "q", "answers": ["a"], "n": ' + "9" * 5000 + "}", "ValueError"),
    ('{"context": "c", "question": "q", "answers": ["a"], "n": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "RecursionError"),
    ('{"context": "c", "question": "q", "answers": ["a"], "n": NaN}', "NaN is not a number"),
    ('{"context": "c\\ud800", "question": "q", "answers": ["a"]}', "lone surrogate"),
])
def test_bad_jsonl_names_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "c", "question": "q", "answers": ["a"]}\n' + line + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl:2: .*{message}"):
        load_task("jsonl", path)


@pytest.mark.parametrize("record, message", [
    ({"answers": True}, "'answers' must be a list of strings or whole numbers, or one"),
    ({"answers": None}, "'answers' must be a list of strings or whole numbers"),
    ({"answers": ["Paris", False]}, "'answers' must be a list of strings or whole numbers"),
    ({"answers": 2.5}, "'answers' holds the number 2.5, which is not a whole number: write it as a string"),
    ({"choices": ["Paris", 2.0]}, "'choices' holds the number 2.0"),
    ({"answers": {"Paris": 1}}, "'answers' must be a list"),
    ({"answers": [None]}, "'answers' must be a list"),
    ({"answers": ["Paris", " "]}, "'answers' holds an empty string"),
    ({"answers": []}, "'answers' is empty"),
    ({"context": {"a": 1}}, "'context' must be a string, got dict"),
    ({"question": None}, "'question' must be a string, got NoneType"),
    ({"choices": "Paris"}, "'choices' must be a list of strings"),
    ({"question": ""}, "'question' is empty"),
    ({"id": {"k": 1}}, "'id' must be a non-empty string or an integer"),
    ({"id": None}, "'id' must be a non-empty string or an integer"),
    ({"id": True}, "'id' must be"),
])
def test_jsonl_fields_of_the_wrong_type_are_refused(tmp_path, record, message):
    path = tmp_path / "typed.jsonl"
    path.write_text(json.dumps({"context": "c", "question": "q", "answers": ["Paris"]} | record) + "\n")
    with pytest.raises(DataError, match=f"typed.jsonl:1: {message}"):
        load_task("jsonl", path)


def test_jsonl_answers_and_choices_may_be_numbers_as_the_paper_files_labels_may(tmp_path):
    """A JSONL answer of 42 was refused, where a paper file's label of 42 was read as "42"."""
    path = tmp_path / "numbers.jsonl"
    path.write_text(json.dumps({"context": "c", "question": "How many?", "answers": 42}) + "\n"
                    + json.dumps({"context": "c", "question": "Which?", "answers": [3, "three"],
                                  "choices": [3, 10**30, "five"]}) + "\n")
    first, second = load_task("jsonl", path).items
    assert first.answers == ("42",) and first.choices == ()
    assert second.answers == ("3", "three") and second.choices == ("3", "1" + "0" * 30, "five")
    path.write_text('{"context": "c", "question": "q", "answers": [1e400]}\n')  # JSON reads it as infinity
    with pytest.raises(DataError, match="numbers.jsonl:1: 'answers' holds the number inf, which is not a whole"):
        load_task("jsonl", path)


def test_paper_files_of_the_wrong_type_are_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt_A": "c", "prompt_B": 5, "y": "France"}) + "\n")
    with pytest.raises(DataError, match="p.jsonl:1: 'prompt_B' must be a string, got int"):
        load_task("countries", path)
    path.write_text(json.dumps({"prompt_A": "c", "prompt_B": "q", "label": "Acme", "options": "Acme"}) + "\n")
    with pytest.raises(DataError, match="'options' must be a list of strings"):
        load_task("tipsheets", path)
    path.write_text(json.dumps({"prompt_A": "c", "prompt_B": "q", "y": ""}) + "\n")
    with pytest.raises(DataError, match="'y' is empty"):
        load_task("countries", path)


def test_jsonl_lines_end_at_newlines_only_and_bad_bytes_are_a_data_error(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"context": "one\u2028two\x85three", "question": "q", "answers": "a"},
                               ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert load_task("jsonl", path).items[0].context == "one\u2028two\x85three"
    path.write_bytes(b'{"context": "caf\xe9", "question": "q", "answers": "a"}\n')
    with pytest.raises(DataError, match="cannot read .*u.jsonl"):
        load_task("jsonl", path)


def test_a_jsonl_file_starting_with_a_byte_order_mark_is_read(tmp_path):
    """Before, the BOM (as Windows editors save UTF-8) made line 1 "not valid JSON"."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"context": "c", "question": "q", "answers": "a"}).encode() + b"\n")
    assert load_task("jsonl", path).items[0].answers == ("a",)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt_A": "c", "prompt_B": "q", "y": "France"}).encode())
    assert load_task("countries", path).items[0].context == "c"


def test_generated_tasks_refuse_options_they_cannot_honour():
    with pytest.raises(DataError, match="16 countries"):
        load_task("relay", hops=2, distractors=16, items=1)
    assert load_task("relay", hops=2, distractors=15, items=1).items
    with pytest.raises(DataError, match="leaving a piece empty"):
        load_task("multihop", pieces=3, facts_per_piece=1, items=1)
    made = load_task("multihop", pieces=3, facts_per_piece=2, items=5)
    assert all(all(piece for piece in item.pieces) for item in made.items)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError):
        load_task("countries", tmp_path / "nope.jsonl")


def test_facts_are_deterministic_and_answerable():
    a, b = load_task("facts", items=5, seed=3), load_task("facts", items=5, seed=3)
    assert a.items == b.items
    for item in a.items:
        assert f"lives in {item.answers[0]}." in item.context
    assert load_task("facts", items=5, seed=4).items != a.items


def test_unknown_task_suggests_a_name():
    with pytest.raises(ConfigError, match="Did you mean 'countries'"):
        load_task("countrie")


def test_split_keeps_calibration_and_test_disjoint():
    items = load_task("facts", items=10).items
    test, calib = split_items(items, 8, 2)
    assert not {i.id for i in test} & {i.id for i in calib} and len(test) == 8
    with pytest.raises(ConfigError, match="overlap"):
        split_items(items, 9, 2)
    later, calib = split_items(items, 3, 2, skip=4)
    assert [i.id for i in later] == [i.id for i in items[4:7]] and calib == list(items[8:])
    assert [i.id for i in split_items(items, None, 2, skip=5)[0]] == [i.id for i in items[5:8]]
    with pytest.raises(ConfigError, match="after the first 4.*--skip"):
        split_items(items, 5, 2, skip=4)
    # the hold-out does not depend on the methods (runs of each test the same items): the error says
    # how a run that calibrates nothing takes every item
    with pytest.raises(ConfigError, match="whatever the methods.*--calib-size 0"):
        split_items(items, 10, 1)
    assert len(split_items(items, 10, 0)[0]) == 10


def test_registry_knows_each_tasks_metric_and_budget_without_loading_it(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"context": "c", "question": "q", "answers": ["a"]}\n')
    for name in TASKS:
        info = TASKS.get(name)
        assert info.metric in METRICS and info.max_new_tokens >= 1 and info.description
        if name in ("jsonl", "facts"):
            task = load_task(name, path if name == "jsonl" else None)
            assert (task.metric, task.max_new_tokens) == (info.metric, info.max_new_tokens)


def test_budget_and_metric_can_be_replaced(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"context": "c", "question": "q", "answers": ["a"]}\n')
    task = load_task("jsonl", path, max_new_tokens=3, metric="exact_match")
    assert (task.name, task.max_new_tokens, task.metric, task.data) == ("mine", 3, "exact_match", str(path))
    assert load_task("facts", items=2, seed=5).seed == 5 and load_task("facts", items=2).data is None
    with pytest.raises(ConfigError, match="unknown metric 'f2'"):
        load_task("jsonl", path, metric="f2")
    with pytest.raises(ConfigError, match="at least 1 token"):
        Task("t", [], max_new_tokens=0)


def test_paper_data_is_pinned_to_a_commit_and_its_sha256(tmp_path, monkeypatch):
    """The shared files are the pinned ones; a download with other content is refused and not cached."""
    import hashlib

    from kvcomm.tasks import loaders

    assert loaders.PAPER_DATA_COMMIT in loaders.PAPER_DATA_URL
    for name in ("countries", "tipsheets"):
        data = shared_file(f"{name}.jsonl").read_bytes()
        assert hashlib.sha256(data).hexdigest() == loaders.PAPER_DATA_SHA256[name]
    monkeypatch.setenv("KVCOMM_CACHE", str(tmp_path))

    class Tampered:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return b'{"prompt_A": "x", "prompt_B": "y", "y": "z"}\n'

    monkeypatch.setattr(loaders.urllib.request, "urlopen", lambda url, timeout: Tampered())
    with pytest.raises(DataError, match="not the pinned"):
        loaders.paper_file("countries", None)
    assert not (tmp_path / "data" / "countries.jsonl").exists()


def test_a_task_keeps_the_options_it_was_made_with(tmp_path):
    """``Task.options``: what the loader was given, its defaults filled in; nothing for a file."""
    assert load_task("multihop", items=3, pieces=2).options == {
        "items": 3, "pieces": 2, "facts_per_piece": 3, "seed": 0, "filler_per_piece": 0, "distractor_kind": "pairs"}
    (tmp_path / "mine.jsonl").write_text(json.dumps({"context": "c", "question": "q", "answers": ["a"]}) + "\n")
    assert load_task("jsonl", tmp_path / "mine.jsonl").options == {}


def test_multihop_items_are_pinned():
    """The generated items every multihop result was measured on (seed, pieces, facts, filler):
    a change to the generator that moves them fails here (hash of 30 items, pinned before
    ``distractor_kind`` existed)."""
    items = (load_task("multihop", items=20, pieces=4, facts_per_piece=2).items
             + load_task("multihop", items=10, seed=3, pieces=3, facts_per_piece=3, filler_per_piece=1).items)
    blob = json.dumps([[i.id, i.context, list(i.pieces), i.question, list(i.answers)] for i in items])
    pinned = "f93cd60488351fdd25d5bb4c8692ee30739f54f97db9ea3a8c87e5a582488d84"
    assert hashlib.sha256(blob.encode()).hexdigest() == pinned


def test_multihop_loose_distractors_leave_the_asked_pair_the_only_link():
    """With loose distractors each item has as many facts, in different pieces for the two hops,
    but only the asked person's city is located anywhere; the default ("pairs") is unchanged."""
    from kvcomm.tasks.options import parse_options

    assert load_task("multihop", items=5, pieces=4, facts_per_piece=2).items == \
        load_task("multihop", items=5, pieces=4, facts_per_piece=2, distractor_kind="pairs").items
    plain = load_task("multihop", items=30, pieces=4, facts_per_piece=2).items
    loose = load_task("multihop", items=30, pieces=4, facts_per_piece=2, distractor_kind="loose").items
    for kind, items in (("pairs", plain), ("loose", loose)):
        for item in items:
            facts = [(i, f) for i, piece in enumerate(item.pieces) for f in re.split(r"(?<=\.) ", piece)]
            assert len(facts) == 8
            homes = {f.split(" lives in ")[1].rstrip("."): (i, f.split(" lives in ")[0]) for i, f in facts
                     if " lives in " in f}
            placed = {f.split(" is in ")[0]: (i, f.split(" is in ")[1].rstrip(".")) for i, f in facts
                      if " is in " in f}
            linked = homes.keys() & placed.keys()
            assert len(linked) == (1 if kind == "loose" else 4)
            person = item.question.removeprefix("Which country does ").split(" live in?")[0]
            city = next(c for c, (_, who) in homes.items() if who == person)
            assert city in linked and placed[city][1] == item.answers[0] and homes[city][0] != placed[city][0]
    assert [i.question for i in loose] != [i.question for i in plain]
    assert parse_options("multihop", TASKS.get("multihop").load, ["distractor-kind=loose"]) == \
        {"distractor_kind": "loose"}  # from the command line: a str
    with pytest.raises(DataError, match="pairs or loose, not 'chains'"):
        load_task("multihop", items=1, distractor_kind="chains")
    assert len(load_task("multihop", items=1, pieces=15, facts_per_piece=2, distractor_kind="loose").items) == 1
    with pytest.raises(DataError, match="at most 30 facts per item with loose"):
        load_task("multihop", items=1, pieces=16, facts_per_piece=2, distractor_kind="loose")


def test_multihop_filler_adds_unlinked_sentences_and_keeps_the_facts():
    """Filler lengthens every piece with sentences naming no person, city or country; the facts,
    their pieces, the question and the answer are those of the same item without filler."""
    from kvcomm.tasks.multihop import CITIES, COUNTRIES, FILLER

    plain = load_task("multihop", items=20, pieces=4, facts_per_piece=2).items
    padded = load_task("multihop", items=20, pieces=4, facts_per_piece=2, filler_per_piece=5).items
    assert load_task("multihop", items=20, pieces=4, facts_per_piece=2, filler_per_piece=5).items == padded
    names = {*CITIES, *COUNTRIES}
    assert not any(word.strip(".'s") in names for sentence in FILLER for word in sentence.split())
    for a, b in zip(plain, padded):
        assert (a.question, a.answers, a.id) == (b.question, b.answers, b.id)
        every = []
        for piece, longer in zip(a.pieces, b.pieces):
            sentences = re.split(r"(?<=\.) ", longer)
            kept = [s for s in sentences if s not in FILLER]
            assert " ".join(kept) == piece and len(sentences) - len(kept) == 5
            every += sentences
        assert len(set(every)) == len(every)  # no filler sentence twice in one item
    with pytest.raises(DataError, match="filler sentences: at most 8 per piece"):
        load_task("multihop", items=1, pieces=4, filler_per_piece=9)


def test_an_option_a_task_does_not_take_is_refused_with_the_nearest():
    with pytest.raises(ConfigError, match="Did you mean 'facts_per_piece'.*Its options: items, pieces"):
        load_task("multihop", items=2, fact_per_piece=2)
    with pytest.raises(ConfigError, match="takes no option 'items'. Its options: none"):
        load_task("jsonl", "x.jsonl", items=2)
    assert TASKS.get("relay").options["hops"] == (int, 3) and TASKS.get("countries").options == {}


def test_task_options_parse_to_their_types_and_a_prefix_picks_the_task():
    from kvcomm.tasks.options import option_task, parse_options

    load = TASKS.get("multihop").load
    pairs = ["items=7", "multihop:filler-per-piece=2", "facts:facts_per_item=3"]
    assert parse_options("multihop", load, pairs) == {"items": 7, "filler_per_piece": 2}
    assert parse_options("facts", TASKS.get("facts").load, pairs) == {"items": 7, "facts_per_item": 3}
    assert [option_task(p) for p in pairs] == [None, "multihop", "facts"]


@pytest.mark.parametrize("name", ["facts", "multihop", "relay"])
def test_a_negative_seed_is_refused(name):
    """random.Random(-5) draws what random.Random(5) does: a negative seed would repeat another
    seed's items under other ids (which the profile's leak check, by id, cannot see)."""
    with pytest.raises(DataError, match="seed is 0 or more, not -5"):
        load_task(name, items=2, seed=-5)
    assert load_task(name, items=2, seed=5).items


def test_a_task_option_of_the_wrong_type_is_refused_naming_it():
    import numpy as np

    from kvcomm.errors import ConfigError
    from kvcomm.tasks import load_task

    for bad in ("5", 2.5, True):
        with pytest.raises(ConfigError, match="option 'items' is a whole number"):
            load_task("facts", items=bad)
    assert len(load_task("facts", items=np.int64(3)).items) == 3


def test_numpy_numbers_as_task_options_become_python_numbers():
    """``items=np.int64(2)`` loaded and ran, then the results could not be saved (numpy's int is no
    JSON); ``seed=np.int64(1)`` failed in the generator with a bare TypeError."""
    import numpy as np

    task = load_task("facts", items=np.int64(2), seed=np.int64(1))
    assert task.options["items"] == 2 and type(task.options["items"]) is int and type(task.options["seed"]) is int
    assert [i.id for i in task.items] == [i.id for i in load_task("facts", items=2, seed=1).items]
    json.dumps(task.options)
    assert type(load_task("facts", items=2, max_new_tokens=np.int64(3)).max_new_tokens) is int
    for bad in (2.5, True, 0):
        with pytest.raises(ConfigError, match="max_new_tokens is a whole number"):
            load_task("facts", items=2, max_new_tokens=bad)
