"""Task loaders: the paper's Countries and Tipsheets, generic JSONL, and a generated task.

The paper's files are fetched once from the KVComm repository and cached; pass ``path`` to use a
local copy instead (offline machines).
"""

from __future__ import annotations

import json
import random
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kvcomm.cache import cache_root
from kvcomm.errors import DataError
from kvcomm.files import atomic_write
from kvcomm.registry import Registry
from kvcomm.tasks.base import Item, Task

PAPER_DATA_URL = "https://raw.githubusercontent.com/Zephyroam/KVComm/main/dataloader/data/{name}.jsonl"
# The reference appends this to every Countries question with no separating space; kept for parity.
COUNTRIES_SUFFIX = "You are required to extrapolate the country from the context."

TaskFactory = Callable[..., Task]
TASKS: Registry[TaskFactory] = Registry("task")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields ``(line number, record)``; a malformed line raises :class:`DataError` naming it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}") from err
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object")
            yield number, record


def _field(record: dict[str, Any], key: str, where: str) -> Any:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r} (has {', '.join(sorted(record))})")
    return record[key]


def paper_file(name: str, path: str | Path | None) -> Path:
    """A local path to the paper's ``name``.jsonl: ``path`` if given, else a cached download."""
    if path is not None:
        return Path(path)
    target = cache_root() / "data" / f"{name}.jsonl"
    if not target.is_file():
        url = PAPER_DATA_URL.format(name=name)
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                data = response.read()
        except OSError as err:
            raise DataError(
                f"cannot download {name} from {url} ({err}); pass a local copy with --data PATH"
            ) from err
        atomic_write(target, data)
    return target


@TASKS.register("countries")
def countries(path: str | Path | None = None) -> Task:
    """Countries: "X is at landmark L" → "Which country is X located in?" (200 items)."""
    file = paper_file("countries", path)
    items = []
    for number, rec in read_jsonl(file):
        where = f"{file}:{number}"
        items.append(Item(
            id=str(rec.get("id", f"countries_{number - 1:04d}")),
            context=_field(rec, "prompt_A", where),
            question=_field(rec, "prompt_B", where) + COUNTRIES_SUFFIX,
            answers=(str(_field(rec, "y", where)),),
        ))
    return Task("countries", items, max_new_tokens=5)


@TASKS.register("tipsheets")
def tipsheets(path: str | Path | None = None) -> Task:
    """Tipsheets: three firms' blurbs → pick the one to invest in (500 items, chance 1/3)."""
    file = paper_file("tipsheets", path)
    items = [
        Item(
            id=f"tipsheets_{number - 1:04d}",
            context=_field(rec, "prompt_A", f"{file}:{number}"),
            question=_field(rec, "prompt_B", f"{file}:{number}"),
            answers=(str(_field(rec, "label", f"{file}:{number}")),),
        )
        for number, rec in read_jsonl(file)
    ]
    return Task("tipsheets", items, max_new_tokens=10)


@TASKS.register("jsonl")
def jsonl(path: str | Path | None = None, max_new_tokens: int = 32) -> Task:
    """Any JSONL with ``context``, ``question`` and ``answers`` (a list or one string); ``id`` optional."""
    if path is None:
        raise DataError("the jsonl task needs a file: --data PATH")
    file = Path(path)
    items = []
    for number, rec in read_jsonl(file):
        where = f"{file}:{number}"
        answers = _field(rec, "answers", where)
        answers = (answers,) if isinstance(answers, str) else tuple(str(a) for a in answers)
        if not answers:
            raise DataError(f"{where}: 'answers' is empty")
        items.append(Item(
            id=str(rec.get("id", f"{file.stem}_{number - 1:04d}")),
            context=str(_field(rec, "context", where)),
            question=str(_field(rec, "question", where)),
            answers=answers,
        ))
    return Task(file.stem, items, max_new_tokens=max_new_tokens)


_NAMES = (
    "Alice Bruno Chen Dmitri Elena Farah Goran Hana Ivan Jonas Kira Liam Maya Nadia Omar Priya Quinn Rosa "
    "Sven Tariq Uma Viktor Wen Ximena Yusuf Zara Aiko Bela Carmen Dev"
).split()
_CITIES = (
    "Lisbon Cairo Oslo Lima Hanoi Dublin Nairobi Quito Seoul Vienna Havana Athens Madrid Warsaw Toronto "
    "Manila Riga Tunis Prague Bogota Helsinki Jakarta Lagos Santiago Zurich Kyoto Dakar Tbilisi Perth Porto"
).split()


@TASKS.register("facts")
def facts(path: str | Path | None = None, items: int = 100, facts_per_item: int = 4, seed: int = 0) -> Task:
    """Generated look-up: a context lists where ``facts_per_item`` people live; ask for one of them.

    Without the context the answer is a guess among 30 cities, so the task shows at once whether
    context reached the receiver. Longer contexts come from more facts per item. Small models
    answer in a sentence ("Omar lives in Cairo."), so the primary metric is ``contains``.
    """
    if path is not None:
        raise DataError("the facts task is generated; it takes no --data file")
    if not 1 <= facts_per_item <= len(_NAMES):
        raise DataError(f"facts_per_item must be in 1..{len(_NAMES)}")
    rng = random.Random(seed)
    out = []
    for index in range(items):
        people = rng.sample(_NAMES, facts_per_item)
        cities = rng.sample(_CITIES, facts_per_item)
        asked = rng.randrange(facts_per_item)
        context = " ".join(f"{p} lives in {c}." for p, c in zip(people, cities))
        out.append(Item(
            id=f"facts_{seed}_{index:04d}",
            context=context,
            question=f"Which city does {people[asked]} live in? Answer with the city name only.",
            answers=(cities[asked],),
        ))
    return Task("facts", out, max_new_tokens=8, metric="contains")


def load_task(name: str, path: str | Path | None = None, **params: Any) -> Task:
    """Builds a registered task by name (``countries``, ``tipsheets``, ``jsonl``, ``facts``)."""
    return TASKS.get(name)(path=path, **params)
