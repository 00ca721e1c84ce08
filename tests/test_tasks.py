"""Task loaders: the paper's files (by path), generic JSONL, the generated task, bad input."""

from __future__ import annotations

import json

import pytest

from kvcomm.errors import ConfigError, DataError
from kvcomm.eval import split_items
from kvcomm.tasks import load_task
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


def test_generic_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"context": "c1", "question": "q1", "answers": ["a", "b"]}, {"id": "x", "context": "c2",
                                                                          "question": "q2", "answers": "z"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = load_task("jsonl", path)
    assert [i.answers for i in task.items] == [("a", "b"), ("z",)] and task.items[1].id == "x"


@pytest.mark.parametrize("line, message", [("{not json", "not valid JSON"), ('{"context": "c"}', "missing field"),
                                           ("[1, 2]", "JSON object")])
def test_bad_jsonl_names_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "c", "question": "q", "answers": ["a"]}\n' + line + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl:2: .*{message}"):
        load_task("jsonl", path)


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
