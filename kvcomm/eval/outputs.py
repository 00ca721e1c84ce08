"""Where a run's files go: a timestamped folder by default, safe file names, nothing replaced unasked.

A run folder holds, per task, ``<task>.json`` (the results), ``<task>-samples.jsonl`` (every
item's prompts as text), ``<task>.png`` and ``<task>-bytes.png`` (sweeps) and
``<task>.checkpoint/`` (finished work, for resuming). File names never contain spaces, slashes or
shell glob characters: model and task names are reduced to letters, digits and ``._@+-``.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

RESULTS_ROOT = Path("results")
_UNSAFE = re.compile(r"[^A-Za-z0-9._@+-]+")


def safe_name(text: str) -> str:
    """``text`` as a file name: each run of other characters (spaces, ``*?[]``, ``/`` …) becomes ``-``."""
    return _UNSAFE.sub("-", text).strip("-.") or "run"


def run_stamp(now: datetime | None = None) -> str:
    """``YYYYmmdd-HHMMSS`` in UTC."""
    return (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")


def new_run_folder(model: str, root: Path = RESULTS_ROOT, claim: bool = False) -> Path:
    """``root/<YYYYmmdd-HHMMSS>-<model>`` (UTC), with ``-2``, ``-3`` … appended while that name is
    taken. Not created here, unless ``claim`` (for a caller about to write into it): then it is
    made at once, atomically, so that two runs finishing in the same second never share one."""
    base = f"{run_stamp()}-{safe_name(Path(model).name or model)}"
    if claim:
        root.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        folder = root / (base if n == 1 else f"{base}-{n}")
        if claim:
            with contextlib.suppress(FileExistsError):  # taken meanwhile: the next name
                folder.mkdir()
                return folder
        elif not folder.exists():
            return folder
    raise AssertionError("unreachable: the names never run out")


@dataclass(frozen=True)
class TaskFiles:
    """The files of one task's run: ``folder/stem…``; ``results`` may be given a name of its own."""

    folder: Path
    stem: str
    results_file: Path | None = None

    @classmethod
    def for_task(cls, folder: Path, task: str) -> TaskFiles:
        return cls(folder, safe_name(task))

    @classmethod
    def beside(cls, results: Path) -> TaskFiles:
        """The files of a run whose results file is ``results`` (the others sit beside it)."""
        return cls(results.parent, safe_name(results.stem if results.suffix == ".json" else results.name), results)

    @property
    def results(self) -> Path:
        return self.results_file or self.folder / f"{self.stem}.json"

    @property
    def samples(self) -> Path:
        return self.folder / f"{self.stem}-samples.jsonl"

    @property
    def plots(self) -> tuple[Path, Path]:
        """Score against the fraction of layers shared, and against bytes sent."""
        return self.folder / f"{self.stem}.png", self.folder / f"{self.stem}-bytes.png"

    @property
    def checkpoint(self) -> Path:
        return self.folder / f"{self.stem}.checkpoint"

    def existing(self, plots: bool) -> list[Path]:
        """Which of these files (plots only if ``plots``) exist already."""
        paths = [self.results, self.samples, self.checkpoint, *(self.plots if plots else ())]
        return [path for path in paths if path.exists()]
