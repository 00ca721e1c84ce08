"""Task loaders: the paper's Countries and Tipsheets, generic JSONL, and a generated task.

The paper's files are fetched once from the KVComm repository and cached; pass ``path`` to use a
local copy instead (offline machines).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

from kvcomm.cache import cache_root
from kvcomm.errors import ConfigError, DataError
from kvcomm.files import atomic_write
from kvcomm.registry import Registry
from kvcomm.tasks.base import Item, Task
from kvcomm.tasks.options import check_options, task_options

# The paper's files, pinned: the commit they are downloaded from and the sha256 they must have.
PAPER_DATA_COMMIT = "1fa086edb17d6e00d80953cb06f391bc0a85268c"
PAPER_DATA_URL = f"https://raw.githubusercontent.com/Zephyroam/KVComm/{PAPER_DATA_COMMIT}/dataloader/data/{{name}}.jsonl"
PAPER_DATA_SHA256 = {
    "countries": "da12fadb233e27ce64ac48829a1369e391d11b1e3e41141c0abd7de8170a9dc2",
    "tipsheets": "4ba11d4ba37b16abbbac3c3c6e440603d08b4e28ab83e29b7b10c99e5c084829",
}
# The reference appends this to every Countries question with no separating space; kept for parity.
COUNTRIES_SUFFIX = "You are required to extrapolate the country from the context."

TaskFactory = Callable[..., Task]


@dataclass(frozen=True)
class TaskInfo:
    """A registered task: how its items are made and what it is scored with, known without loading it.

    Attributes:
        load: the loader (``path`` is the ``--data`` file, if any); it builds the task with :meth:`make`.
        max_new_tokens: the answer budget in tokens (the paper's, for its tasks).
        metric: the primary metric (a key of ``METRICS``).
        source: where the items come from, in words (for ``kvcomm tasks``).
    """

    name: str
    load: TaskFactory
    max_new_tokens: int
    metric: str = "paper_f1"
    source: str = "--data"

    @property
    def options(self) -> dict[str, tuple[type, Any]]:
        """``{option: (type, default)}``: what ``--task-option`` may set (:mod:`kvcomm.tasks.options`)."""
        return task_options(self.load)

    @property
    def description(self) -> str:
        """The first paragraph of the loader's docstring, on one line."""
        first = (self.load.__doc__ or "").strip().split("\n\n")[0]
        return " ".join(line.strip() for line in first.splitlines())

    def make(self, items: list[Item], name: str | None = None, data: Path | None = None,
             seed: int | None = None) -> Task:
        """The task of ``items`` with this task's budget and metric.

        Raises:
            DataError: no items (an empty file, or a generated task asked for fewer than one).
        """
        if not items:
            raise DataError(f"task {self.name!r} has no items" + (" (items must be at least 1)"
                                                                  if self.source == "generated" else ""))
        if seed is not None and seed < 0:  # random.Random(-5) draws what random.Random(5) does
            raise DataError(f"task {self.name!r}: the seed is 0 or more, not {seed} (a negative seed would repeat "
                            f"seed {-seed}'s items under other ids)")
        return Task(name or self.name, items, self.max_new_tokens, metric=self.metric,
                    data=None if data is None else str(data), seed=seed)


TASKS: Registry[TaskInfo] = Registry("task")


def task(name: str, max_new_tokens: int, metric: str = "paper_f1",
         source: str = "--data") -> Callable[[TaskFactory], TaskFactory]:
    """Registers a loader as the task ``name`` with its answer budget and primary metric."""

    def add(load: TaskFactory) -> TaskFactory:
        TASKS.add(name, TaskInfo(name, load, max_new_tokens, metric, source))
        return load

    return add


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields ``(line number, record)``; a malformed line raises :class:`DataError` naming it. A
    UTF-8 byte order mark at the start (as Windows editors write) is dropped."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}") from err
    # lines end at "\n" only: JSON strings may hold U+2028 or U+0085 raw, where splitlines would cut
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                record = json.loads(line, parse_constant=_no_constant)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            except (ValueError, RecursionError) as err:  # a 5,000-digit number, arrays nested 10,000 deep, NaN
                raise DataError(f"{path}:{number}: not a record kvcomm reads ({type(err).__name__}: "
                                f"{str(err)[:120]})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object")
            try:  # "\ud800" is valid JSON but no text: the tokenizer and the files written later refuse it
                json.dumps(record, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{path}:{number}: holds a lone surrogate (an escape such as \\ud800 that is no "
                                "character)") from None
            yield number, record


def _no_constant(name: str) -> Any:
    """JSON's non-standard constants (NaN, Infinity) are refused: no field kvcomm reads is one."""
    raise ValueError(f"{name} is not a number a record may hold")


def _id(record: dict[str, Any], default: str, where: str) -> str:
    """An item's ``id``: a non-empty string or an integer, or ``default`` where it has none."""
    if "id" not in record:
        return default
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise DataError(f"{where}: 'id' must be a non-empty string or an integer, got {value!r}"[:200])
    return str(value)


def _field(record: dict[str, Any], key: str, where: str) -> Any:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r} (has {', '.join(sorted(record))})")
    return record[key]


def _text(record: dict[str, Any], key: str, where: str, scalar: bool = False, empty: bool = False) -> str:
    """``record[key]`` as text: a string (``scalar``: or a number, as a label may be), not blank
    (``empty``: blank allowed, e.g. a closed-book item's context).

    Raises:
        DataError: the field is missing, of another type, or blank.
    """
    value = _field(record, key, where)
    if not (_scalar(value, where, key) if scalar else isinstance(value, str)):
        raise DataError(f"{where}: {key!r} must be {'a string or a whole number' if scalar else 'a string'}, "
                        f"got {type(value).__name__}")
    if not empty and not str(value).strip():
        raise DataError(f"{where}: {key!r} is empty")
    return str(value)


def _answer(record: dict[str, Any], key: str, where: str) -> str:
    """``record[key]``, a gold answer: a string or a number, not empty.

    Raises:
        DataError: the field is missing, of another type, or empty.
    """
    answer = _text(record, key, where, scalar=True)
    if not answer.strip():
        raise DataError(f"{where}: {key!r} is empty")
    return answer


def _scalar(value: Any, where: str, key: str) -> bool:
    """Whether ``value`` is a string or a whole number (not a bool): what a gold answer or an
    option may be written as (a number as its digits).

    Raises:
        DataError: a number with a fraction or an exponent: read, it would not be the text the file
            wrote (``2.50`` is the float ``2.5``, ``1e400`` infinity), so it must be quoted.
    """
    if isinstance(value, float):
        raise DataError(f"{where}: {key!r} holds the number {value!r}, which is not a whole number: write it "
                        "as a string (e.g. \"2.50\"), as the answer should read")
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def _texts(record: dict[str, Any], key: str, where: str, one: bool = False) -> tuple[str, ...]:
    """``record[key]`` as a tuple of non-empty strings: a list of strings or whole numbers (as
    their digits, as the paper files' labels are read; ``one``: or one of them); absent: ``()``.

    Raises:
        DataError: another type, a number that is not whole, or an empty string among them.
    """
    value = record.get(key, [])
    values = [value] if one and _scalar(value, where, key) else value
    if not isinstance(values, list) or not all(_scalar(v, where, key) for v in values):
        raise DataError(f"{where}: {key!r} must be a list of strings or whole numbers{', or one' if one else ''}")
    texts = tuple(str(v) for v in values)
    if not all(text.strip() for text in texts):
        raise DataError(f"{where}: {key!r} holds an empty string")
    return texts


def paper_file(name: str, path: str | Path | None) -> Path:
    """A local path to the paper's ``name``.jsonl: ``path`` if given (its sha256 is recorded in the
    results), else a download from the pinned commit, checked against its sha256 and then cached.

    Raises:
        DataError: the download fails, or its content (or the cached file's) is not the pinned one.
    """
    if path is not None:
        return Path(path)
    target = cache_root() / "data" / f"{name}.jsonl"
    if target.is_file() and _sha256(target.read_bytes()) == PAPER_DATA_SHA256[name]:
        return target
    url = PAPER_DATA_URL.format(name=name)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            data = response.read()
    except OSError as err:
        raise DataError(f"cannot download {name} from {url} ({err}); pass a local copy with --data PATH") from err
    if (digest := _sha256(data)) != PAPER_DATA_SHA256[name]:
        raise DataError(f"{url} has sha256 {digest}, not the pinned {PAPER_DATA_SHA256[name]}; refusing it")
    atomic_write(target, data)
    return target


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


PAPER_FILE = "the paper's (fetched once) or --data"


@task("countries", max_new_tokens=5, source=PAPER_FILE)
def countries(path: str | Path | None = None) -> Task:
    """Countries: "X is at landmark L" → "Which country is X located in?" (200 items)."""
    file = paper_file("countries", path)
    items = []
    for number, rec in read_jsonl(file):
        where = f"{file}:{number}"
        items.append(Item(
            id=_id(rec, f"countries_{number - 1:04d}", where),
            context=_text(rec, "prompt_A", where),
            question=_text(rec, "prompt_B", where) + COUNTRIES_SUFFIX,
            answers=(_answer(rec, "y", where),),
        ))
    return TASKS.get("countries").make(items, data=file)


@task("tipsheets", max_new_tokens=10, source=PAPER_FILE)
def tipsheets(path: str | Path | None = None) -> Task:
    """Tipsheets: three firms' blurbs → pick the one to invest in (500 items, chance 1/3)."""
    file = paper_file("tipsheets", path)
    items = [
        Item(
            id=f"tipsheets_{number - 1:04d}",
            context=_text(rec, "prompt_A", f"{file}:{number}"),
            question=_text(rec, "prompt_B", f"{file}:{number}"),
            answers=(_answer(rec, "label", f"{file}:{number}"),),
            choices=_texts(rec, "options", f"{file}:{number}"),
        )
        for number, rec in read_jsonl(file)
    ]
    return TASKS.get("tipsheets").make(items, data=file)


@task("jsonl", max_new_tokens=32, source="--data (required)")
def jsonl(path: str | Path | None = None) -> Task:
    """Any JSONL with ``context``, ``question`` and ``answers`` (a list or one; strings, or whole
    numbers read as their digits); ``id`` and ``choices`` (the options a multiple-choice question
    offers, the first answer among them) optional."""
    if path is None:
        raise DataError("the jsonl task needs a file: --data PATH (load_task's path)")
    file = Path(path)
    items = []
    for number, rec in read_jsonl(file):
        where = f"{file}:{number}"
        _field(rec, "answers", where)
        answers = _texts(rec, "answers", where, one=True)
        if not answers:
            raise DataError(f"{where}: 'answers' is empty")
        items.append(Item(
            id=_id(rec, f"{file.stem}_{number - 1:04d}", where),
            context=_text(rec, "context", where, empty=True),
            question=_text(rec, "question", where),
            answers=answers,
            choices=_texts(rec, "choices", where),
        ))
    return TASKS.get("jsonl").make(items, name=file.stem, data=file)


_NAMES = (
    "Alice Bruno Chen Dmitri Elena Farah Goran Hana Ivan Jonas Kira Liam Maya Nadia Omar Priya Quinn Rosa "
    "Sven Tariq Uma Viktor Wen Ximena Yusuf Zara Aiko Bela Carmen Dev"
).split()
_CITIES = (
    "Lisbon Cairo Oslo Lima Hanoi Dublin Nairobi Quito Seoul Vienna Havana Athens Madrid Warsaw Toronto "
    "Manila Riga Tunis Prague Bogota Helsinki Jakarta Lagos Santiago Zurich Kyoto Dakar Tbilisi Perth Porto"
).split()


@task("facts", max_new_tokens=8, metric="contains", source="generated")
def facts(path: str | Path | None = None, items: int = 100, facts_per_item: int = 4, seed: int = 0) -> Task:
    """Generated look-up: a context lists where ``facts_per_item`` people live; ask for one of them.

    Without the context the answer is a guess among 30 cities, so the task shows at once whether
    context reached the receiver. Longer contexts come from more facts per item. Small models
    answer in a sentence ("Omar lives in Cairo."), so the primary metric is ``contains``.
    """
    if path is not None:
        raise DataError("the facts task is generated; it takes no --data file (path)")
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
    return TASKS.get("facts").make(out, seed=seed)


def load_task(name: str, path: str | Path | None = None, max_new_tokens: int | None = None,
              metric: str | None = None, **params: Any) -> Task:
    """Builds a registered task by name: ``countries``, ``tipsheets`` and ``jsonl`` (read from
    ``path``), or the generated ``facts``, ``multihop`` and ``relay`` (``kvcomm tasks``).

    ``max_new_tokens`` and ``metric`` replace the task's answer budget and primary metric; other
    ``params`` go to the task's loader (e.g. ``items`` and ``seed`` of ``facts``).

    Raises:
        ConfigError: an unknown task, option or metric, or a budget below 1.
        DataError: the data is missing or malformed, or an option's value cannot make items (e.g.
            ``items`` below 1, a relay of fewer than 2 hops).
    """
    info = TASKS.get(name)
    if max_new_tokens is not None:  # before: 2.5, True or numpy's int passed, and the last failed at save
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens is a whole number of at least 1, not {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)
    params = check_options(name, info.load, params)
    task = info.load(path=path, **params)
    options = {key: default for key, (_, default) in info.options.items()} | params
    return dataclasses.replace(task, max_new_tokens=task.max_new_tokens if max_new_tokens is None else max_new_tokens,
                               metric=task.metric if metric is None else metric, options=options)
