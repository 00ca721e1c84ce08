"""Checkpoints: the finished (configuration, batch) work of one task's run, saved as the run goes,
so that an interrupted run continues where it stopped and ends with the same results.

A checkpoint is a folder: ``run.json`` holds what the run is (its identity, see
:func:`~kvcomm.eval.provenance.run_identity`), the command and date that started it, each
resumption, and the layer ranking calibrated for it; ``batch-00000.json``, ``batch-00001.json`` …
hold, per batch, the ids of its items and, per configuration label, the item results, the
times, and the method's state after the batch (for methods whose answers depend on earlier
batches, e.g. online calibration). Every file is written whole or not at all
(:func:`~kvcomm.files.atomic_write`), so a run killed at any moment leaves a usable checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from kvcomm.errors import ConfigError, DataError
from kvcomm.eval.provenance import first_difference, utc_now
from kvcomm.eval.results import ItemResult
from kvcomm.files import atomic_write

CHECKPOINT_VERSION = 1
HEADER = "run.json"
BATCH = re.compile(r"batch-(\d{5})\.json")
M = TypeVar("M", bound=BaseModel)


class BatchRun(BaseModel):
    """One configuration's work on one batch."""

    items: list[ItemResult]
    seconds: float
    sender_seconds: float
    state: dict[str, Any] | None = None  # the method's state after the batch (None: it keeps none)


class BatchRecord(BaseModel):
    ids: list[str]
    runs: dict[str, BatchRun] = {}  # by configuration label


class Header(BaseModel):
    version: int = CHECKPOINT_VERSION
    identity: dict[str, Any]
    command: str | None = None
    date: str
    resumed: list[dict[str, str | None]] = []  # {"date", "command"} of each resumption
    profile: dict[str, Any] | None = None  # the ranking calibrated for this run, reused on resuming


class Checkpoint:
    """The checkpoint folder of one task's run.

    Args:
        folder: the checkpoint folder (created on the first finished batch).
        identity: what the run is; a resumed run must have the same.
        command: the command line that runs it (recorded).
        resume: continue the work recorded in ``folder``. Without it, a folder that already
            holds a checkpoint is refused; with it, a missing checkpoint starts a new one.

    Raises:
        ConfigError: ``folder`` holds a checkpoint and ``resume`` is false, or it holds one of a
            run with another identity.
        DataError: the checkpoint's files are damaged.
    """

    def __init__(self, folder: str | Path, identity: dict[str, Any], command: str | None = None,
                 resume: bool = False) -> None:
        self.folder = Path(folder)
        self.batches: list[BatchRecord] = []
        self._written = False
        self.continued = False  # whether this continues a run recorded in ``folder``
        if not (self.folder / HEADER).is_file():
            self.header = Header(identity=identity, command=command, date=utc_now())
            return
        if not resume:
            raise ConfigError(f"{self.folder} holds the checkpoint of an earlier run; resume it with --resume "
                              f"{self.folder.parent} or start again with --overwrite")
        self.header = _read(self.folder / HEADER, Header)
        if self.header.version != CHECKPOINT_VERSION:
            raise DataError(f"{self.folder}: checkpoint version {self.header.version} is not supported "
                            f"(this kvcomm writes {CHECKPOINT_VERSION})")
        if difference := first_difference(self.header.identity, identity):
            raise ConfigError(f"cannot resume {self.folder}: that run had another configuration ({difference}); "
                              "repeat its options exactly, or start a new run without --resume")
        self.header.resumed.append({"date": utc_now(), "command": command})
        self.batches = self._read_batches()
        self.continued = True

    @property
    def identity(self) -> dict[str, Any]:
        return self.header.identity

    @property
    def profile(self) -> dict[str, Any] | None:
        return self.header.profile

    def provenance(self) -> dict[str, Any]:
        """The command and date that started the run, and its resumptions."""
        return {"command": self.header.command, "date": self.header.date, "resumed": self.header.resumed}

    def expect(self, identity: dict[str, Any]) -> None:
        """Refuses to record a run whose identity is not the checkpoint's."""
        if difference := first_difference(self.identity, identity):
            raise ConfigError(f"checkpoint {self.folder} is for another run ({difference})")

    def batch_ids(self) -> list[list[str]]:
        """The item ids of each recorded batch, in order."""
        return [record.ids for record in self.batches]

    def done(self, index: int, label: str) -> BatchRun | None:
        """The recorded work of configuration ``label`` on batch ``index``, if any."""
        return self.batches[index].runs.get(label) if index < len(self.batches) else None

    def save(self, index: int, ids: list[str], label: str, run: BatchRun) -> None:
        """Records ``label``'s work on batch ``index`` (batches are recorded in order)."""
        if index > len(self.batches):
            raise ConfigError(f"checkpoint {self.folder}: batch {index} recorded before batch {len(self.batches)}")
        if index == len(self.batches):
            self.batches.append(BatchRecord(ids=ids))
        record = self.batches[index]
        if record.ids != ids:
            raise ConfigError(f"checkpoint {self.folder}: batch {index} holds other items than this one")
        record.runs[label] = run
        self._write_header()
        atomic_write(self.folder / f"batch-{index:05d}.json", record.model_dump_json() + "\n")

    def save_profile(self, profile: dict[str, Any]) -> None:
        """Keeps the ranking calibrated for this run, so a resumption need not calibrate again."""
        self.header.profile = profile
        self._written = False
        self._write_header()

    def _write_header(self) -> None:
        if not self._written:
            atomic_write(self.folder / HEADER, self.header.model_dump_json(indent=1) + "\n")
            self._written = True

    def _read_batches(self) -> list[BatchRecord]:
        found = sorted((int(m.group(1)), p) for p in self.folder.iterdir() if (m := BATCH.fullmatch(p.name)))
        if [index for index, _ in found] != list(range(len(found))):
            raise DataError(f"checkpoint {self.folder} is damaged: its batch files are not numbered "
                            f"0..{len(found) - 1}")
        return [_read(path, BatchRecord) for _, path in found]


def remove_checkpoint(folder: str | Path) -> None:
    """Deletes a checkpoint folder's own files (and the folder, once empty); nothing else."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name == HEADER or BATCH.fullmatch(path.name) or (path.name.startswith(".") and
                                                                   path.name.endswith(".tmp")):
            path.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()


def _read(path: Path, model: type[M]) -> M:
    try:
        return model.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, ValidationError) as err:
        raise DataError(f"cannot read checkpoint file {path}: {' '.join(str(err).split())[:200]}") from None
