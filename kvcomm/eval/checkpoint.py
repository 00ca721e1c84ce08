"""Checkpoints: the finished (configuration, batch) work of one task's run, saved as the run goes,
so that an interrupted run continues where it stopped and ends with the same results.

A checkpoint is a folder: ``run.json`` holds what the run is (its identity, see
:func:`~kvcomm.eval.provenance.run_identity`), the command, date and code (kvcomm version and git
commit) that started it, each resumption with its own, every layer ranking and block profile the
run made (by name: a rule, ``rule/pieces``, ``droidspeak@<cap>``) and the id of the codebook its
codecs rotate with; ``batch-00000.json``, ``batch-00001.json`` … (numbered in the order batches were
recorded, which on a cluster is the order they came back) hold, per batch, the sha256 of the
run's identity, the ids of its items and, per configuration label, the item results, the times,
and the method's state after the batch (for methods whose answers depend on earlier batches, e.g.
online calibration). Every file is written whole or not at all (:func:`~kvcomm.files.atomic_write`),
so a run killed at any moment leaves a usable checkpoint.

A resumed run takes the recorded profiles and codebook instead of making them again, so its new
batches use what its recorded ones did. What it reads is checked, and anything that does not fit
is refused with the file named: every configuration's results of a batch are for the batch's
items, no item is in two batches, each item is one of the run's test items, each batch file names
this run, each ranking orders every layer once and belongs to the run's models and task. Resuming
under other code (another kvcomm version or commit) is allowed, with a warning on stderr, and
recorded.

Version 1 checkpoints (before batch files named their run and the header recorded the code, every
profile and the codebook) still resume, unless the run needs a profile or codebook they did not
record after batches were recorded: what those batches used cannot be told then.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from kvcomm.config import describe
from kvcomm.errors import ConfigError, DataError, MissingCodebook
from kvcomm.eval.provenance import code_version, identity_difference, utc_now
from kvcomm.eval.results import ItemResult
from kvcomm.files import atomic_write
from kvcomm.selection.blocks import BlockProfile
from kvcomm.selection.calibrate import Profile
from kvcomm.wire.codebook import Codebook, codebook_dir, load_codebook

CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: before batch files named their run and the header recorded code and profiles
HEADER = "run.json"
BATCH = re.compile(r"batch-(\d{5})\.json")
BLOCKS_PREFIX = "droidspeak@"  # the names of block profiles among a run's profiles
M = TypeVar("M", bound=BaseModel)
P = TypeVar("P", Profile, BlockProfile)


class BatchRun(BaseModel):
    """One configuration's work on one batch."""

    items: list[ItemResult]
    seconds: float
    sender_seconds: float
    state: dict[str, Any] | None = None  # the method's state after the batch (None: it keeps none)


class BatchRecord(BaseModel):
    ids: list[str]
    runs: dict[str, BatchRun] = {}  # by configuration label
    run: str | None = None  # sha256 of the run's identity (None: written by a version 1 checkpoint)


class Header(BaseModel):
    version: int = CHECKPOINT_VERSION
    identity: dict[str, Any]
    command: str | None = None
    date: str
    code: dict[str, str | None] | None = None  # code_version() of the start (None: version 1, not recorded)
    resumed: list[dict[str, Any]] = []  # {"date", "command", "code"[, "warning"]} of each resumption
    profile: dict[str, Any] | None = None  # version 1: the run's own ranking (now among ``profiles``)
    profiles: dict[str, dict[str, Any]] = {}  # every ranking and block profile the run made, by name
    codebook: str | None = None  # the id of the codebook the run's codecs rotate with, once made


class Checkpoint:
    """The checkpoint folder of one task's run.

    Args:
        folder: the checkpoint folder (created when the run first records something: a profile
            or codebook it made, or a finished batch).
        identity: what the run is; a resumed run must have the same.
        command: the command line that runs it (recorded).
        resume: continue the work recorded in ``folder``. Without it, a folder that already
            holds a checkpoint is refused; with it, a missing checkpoint starts a new one.

    Raises:
        ConfigError: ``folder`` holds a checkpoint and ``resume`` is false, or it holds one of a
            run with another identity.
        DataError: the checkpoint's files are damaged or do not fit together (see the module's
            docstring), or ``folder`` holds batch files but no ``run.json``.
    """

    def __init__(self, folder: str | Path, identity: dict[str, Any], command: str | None = None,
                 resume: bool = False) -> None:
        self.folder = Path(folder)
        self.batches: list[BatchRecord] = []
        self.profiles: dict[str, Profile | BlockProfile] = {}  # the header's, read
        self._written = False
        self.continued = False  # whether this continues a run recorded in ``folder``
        if not (self.folder / HEADER).is_file():
            if self.folder.is_dir() and (strays := sorted(p.name for p in self.folder.iterdir()
                                                          if BATCH.fullmatch(p.name))):
                raise DataError(f"{self.folder} holds batch files ({strays[0]} …) but no {HEADER}, so which run "
                                "they belong to is unknown; start again with --overwrite (which deletes them)")
            self.header = Header(identity=identity, command=command, date=utc_now(), code=code_version())
            self.run = self._identity_sha256()
            return
        if not resume:
            raise ConfigError(f"{self.folder} holds the checkpoint of an earlier run; resume it with --resume "
                              f"{self.folder.parent} or start again with --overwrite")
        self.header = _read(self.folder / HEADER, Header)
        if self.header.version not in READABLE_VERSIONS:
            raise DataError(f"{self.folder}: checkpoint version {self.header.version} is not supported "
                            f"(this kvcomm writes {CHECKPOINT_VERSION})")
        if difference := identity_difference(self.header.identity, identity):
            raise ConfigError(f"cannot resume {self.folder}: that run had another configuration ({difference}); "
                              "repeat its options exactly (where the run recorded a value and this one has "
                              "none, a default changed since: give the recorded value as the option), or start "
                              "a new run without --resume")
        self.run = self._identity_sha256()
        self.profiles = self._read_profiles()
        self.batches = self._read_batches()
        self.header.resumed.append(self._resumption(command))
        self.continued = True

    @property
    def identity(self) -> dict[str, Any]:
        return self.header.identity

    @property
    def header_path(self) -> Path:
        return self.folder / HEADER

    def provenance(self) -> dict[str, Any]:
        """The command, date and code that started the run, and its resumptions (each with its own)."""
        return {"command": self.header.command, "date": self.header.date, "code": self.header.code,
                "resumed": self.header.resumed}

    def expect(self, identity: dict[str, Any]) -> None:
        """Refuses to record a run whose identity is not the checkpoint's. A new checkpoint not yet
        written takes the models' weights from ``identity`` (known once they load)."""
        if difference := identity_difference(self.identity, identity):
            raise ConfigError(f"checkpoint {self.folder} is for another run ({difference})")
        if not self.continued and not self._written and "weights" in identity and "weights" not in self.identity:
            self.header.identity = {**self.header.identity, "weights": identity["weights"]}
            self.run = self._identity_sha256()

    def batch_ids(self) -> list[list[str]]:
        """The item ids of each recorded batch, in order."""
        return [record.ids for record in self.batches]

    def check_items(self, test_ids: Sequence[str], ordered: bool) -> None:
        """Refuses recorded batches holding an item that is not one of the run's test items
        ``test_ids`` or (``ordered``: the run keeps the items' order) not the front of them, in order.

        Raises:
            DataError: naming the batch file.
        """
        known = set(test_ids)
        position = 0
        for index, record in enumerate(self.batches):
            if strange := [i for i in record.ids if i not in known]:
                raise DataError(f"checkpoint file {self._batch_path(index)} holds items {strange[:3]} that are not "
                                "test items of this run; start again with --overwrite")
            if ordered and record.ids != list(test_ids[position:position + len(record.ids)]):
                raise DataError(f"checkpoint file {self._batch_path(index)} holds items out of order for a run that "
                                "keeps the items' order; start again with --overwrite")
            position += len(record.ids)

    def done(self, index: int, label: str, former: Sequence[str] = ()) -> BatchRun | None:
        """The recorded work of configuration ``label`` on batch ``index``, if any, or of the labels
        it had before (``former``: a checkpoint written by an earlier kvcomm)."""
        if index >= len(self.batches):
            return None
        runs = self.batches[index].runs
        return next((runs[name] for name in (label, *former) if name in runs), None)

    def save(self, index: int, ids: list[str], label: str, run: BatchRun) -> None:
        """Records ``label``'s work on batch ``index`` (the next batch number, or one recorded before)."""
        if index > len(self.batches):
            raise ConfigError(f"checkpoint {self.folder}: batch {index} recorded before batch {len(self.batches)}")
        if index == len(self.batches):
            self.batches.append(BatchRecord(ids=ids, run=self.run))
        record = self.batches[index]
        if record.ids != ids:
            raise ConfigError(f"checkpoint {self.folder}: batch {index} holds other items than this one")
        record.runs[label] = run
        record.run = self.run  # a version 1 batch taken on by this run, now named by it
        if not self._written:
            self._write_header()
        atomic_write(self._batch_path(index), record.model_dump_json() + "\n")

    def reuse(self, name: str, kind: type[P], make: Callable[[], P], **expected: Any) -> P:
        """The profile ``name`` this run recorded, else ``make()``'s, recorded at once (before any
        batch uses it), so that a resumed run ranks layers (or picks blocks) as its recorded
        batches did. ``expected``: fields the run's own profile has (its depth, calibration
        items, rule …).

        Raises:
            DataError: the recorded profile is not a ``kind`` or differs from ``expected``.
            ConfigError: a version 1 checkpoint with recorded batches did not record it.
        """
        held = self.profiles.get(name)
        if held is None:
            self._refuse_unrecorded(f"profile {name}")
            made = make()
            self.profiles[name] = made
            self.header.profiles[name] = made.model_dump(mode="json")
            self._write_header()
            return made
        if not isinstance(held, kind):
            raise DataError(f"checkpoint file {self.header_path}: its profile {name} is not a {kind.what}; "
                            "start again with --overwrite")
        for field, value in expected.items():
            if getattr(held, field) != value:
                count = len(held.calibration_items) if field == "calibration_items" else None
                how = (f"--calib-size {count} (and the objective it was made with, e.g. --objective likelihood where "
                       "the run predates the auto default) resumes it, or start again with --overwrite"
                       if count is not None and len(value) != count else "start again with --overwrite")
                raise DataError(f"checkpoint file {self.header_path}: its profile {name} has {field} "
                                f"{_short(getattr(held, field))}, this run's would have {_short(value)}; {how}")
        return held

    def reuse_codebook(self, make: Callable[[], Codebook]) -> Codebook:
        """The codebook this run recorded (by id, loaded from :func:`~kvcomm.wire.codebook.codebook_dir`,
        where it was saved when made), else ``make()``'s, its id recorded at once. Where the recorded
        one is not on this machine, ``make()``'s is taken if it is the same (equal ids).

        Raises:
            DataError: the recorded codebook is not here and ``make()`` makes another.
            ConfigError: a version 1 checkpoint with recorded batches did not record it.
        """
        recorded = self.header.codebook
        if recorded is None:
            self._refuse_unrecorded("codebook")
        else:
            try:
                return load_codebook(recorded)
            except MissingCodebook:
                pass
        book = make()
        if recorded is not None and book.id != recorded:
            raise DataError(f"checkpoint file {self.header_path}: the recorded batches used codebook {recorded}, "
                            f"which is not in {codebook_dir()}, and the one made now is {book.id}; copy "
                            f"{recorded}.safetensors there from the machine that made it, or start again with "
                            "--overwrite")
        if recorded is None:
            self.header.codebook = book.id
            self._write_header()
        return book

    def _refuse_unrecorded(self, what: str) -> None:
        if self.header.version == 1 and self.batches:
            raise ConfigError(f"cannot resume {self.folder}: it was written by an earlier kvcomm that did not record "
                              f"the {what} its batches used, so the rest of the run cannot be made to use the same; "
                              "run it again without --resume in a new folder, or here with --overwrite")

    def _resumption(self, command: str | None) -> dict[str, Any]:
        """This resumption's record, with a warning (printed to stderr) where the code that ran the
        recorded batches is not this one, or is not known."""
        now = code_version()
        entry: dict[str, Any] = {"date": utc_now(), "command": command, "code": now}
        earlier = [self.header.code, *(r.get("code") for r in self.header.resumed)]
        before = [code for code in earlier if code is not None]
        if self.header.code is None:
            warning = (f"the run was started by a kvcomm that did not record its version; this is {_code(now)}, and "
                       "whether the code changed since cannot be told")
        elif other := [code for code in before if code != now]:
            warning = (f"its batches so far were run by {', '.join(dict.fromkeys(_code(c) for c in other))}, this "
                       f"is {_code(now)}: where the change alters answers, the batches before and after differ "
                       "(the results' provenance lists each)")
        else:
            return entry
        print(f"kvcomm: warning: resuming {self.folder}: {warning}", file=sys.stderr)
        return entry | {"warning": warning}

    def _identity_sha256(self) -> str:
        """What each batch file names its run by: the sha256 of the identity, as ``run.json`` holds it."""
        identity = self.header.model_dump(mode="json")["identity"]
        return hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()

    def _write_header(self) -> None:
        atomic_write(self.header_path, self.header.model_dump_json(indent=1) + "\n")
        self._written = True

    def _batch_path(self, index: int) -> Path:
        return self.folder / f"batch-{index:05d}.json"

    def _read_profiles(self) -> dict[str, Profile | BlockProfile]:
        """The header's profiles (version 1's own ranking under its rule), each checked to rank the
        run's models' layers on its task."""
        given = dict(self.header.profiles)
        if self.header.profile is not None:
            own = self._profile("profile", Profile, self.header.profile)
            given.setdefault(own.rule, self.header.profile)
        out: dict[str, Profile | BlockProfile] = {}
        for name, data in given.items():
            profile: Profile | BlockProfile = (self._profile(name, BlockProfile, data) if name.startswith(BLOCKS_PREFIX)
                                               else self._profile(name, Profile, data))
            for field in ("sender", "receiver", "task"):
                if getattr(profile, field) != self.identity.get(field):
                    raise DataError(f"checkpoint file {self.header_path}: its profile {name} is for {field} "
                                    f"{getattr(profile, field)!r}, the run's is {self.identity.get(field)!r}; start "
                                    "again with --overwrite")
            # a Profile's ranking is checked by the model itself; a block profile's blocks here
            if isinstance(profile, BlockProfile) and (not profile.blocks or any(
                    not 0 <= b.start < b.stop <= profile.num_layers for b in profile.blocks)):
                raise DataError(f"checkpoint file {self.header_path}: its profile {name}'s blocks "
                                f"{_short(profile.model_dump(mode='json')['blocks'])} do not fit its "
                                f"{profile.num_layers} layers; start again with --overwrite")
            out[name] = profile
        return out

    def _profile(self, name: str, kind: type[P], data: dict[str, Any]) -> P:
        try:
            return kind.model_validate(data)
        except ValidationError as err:
            raise DataError(describe(err, f"checkpoint file {self.header_path}: its profile {name} is not a "
                                          f"{kind.what}")[:400] + "; start again with --overwrite") from None

    def _read_batches(self) -> list[BatchRecord]:
        """The batch files, in order, each checked to be this run's and whole (see the module's docstring)."""
        found = sorted((int(m.group(1)), p) for p in self.folder.iterdir() if (m := BATCH.fullmatch(p.name)))
        if [index for index, _ in found] != list(range(len(found))):
            raise DataError(f"checkpoint {self.folder} is damaged: its batch files are not numbered "
                            f"0..{len(found) - 1}")
        records: list[BatchRecord] = []
        seen: set[str] = set()
        for _, path in found:
            record = _read(path, BatchRecord)
            if record.run is None and self.header.version != 1:
                raise DataError(f"checkpoint file {path} does not name the run it belongs to; start again with "
                                "--overwrite")
            if record.run is not None and record.run != self.run:
                raise DataError(f"checkpoint file {path} belongs to another run than {self.header_path}; start "
                                "again with --overwrite")
            if not record.ids:
                raise DataError(f"checkpoint file {path} holds a batch of no items; start again with --overwrite")
            if repeated := sorted({i for i in record.ids if i in seen or record.ids.count(i) > 1}):
                raise DataError(f"checkpoint file {path} holds items {repeated[:3]} already in this or an earlier "
                                "batch; start again with --overwrite")
            seen.update(record.ids)
            for label, run in record.runs.items():
                if (ids := [item.id for item in run.items]) != record.ids:
                    raise DataError(f"checkpoint file {path}: the results of {label} are for items {_short(ids)}, "
                                    f"the batch's are {_short(record.ids)}; start again with --overwrite")
            records.append(record)
        return records


def remove_checkpoint(folder: str | Path) -> None:
    """Deletes a checkpoint folder's own files (and the folder, once empty); nothing else. The
    batch files go last first and ``run.json`` last of all, so that an interrupted removal
    leaves a checkpoint of the same run (its first batches), never batch files without it."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    batches = sorted((p for p in folder.iterdir() if BATCH.fullmatch(p.name)), reverse=True)
    temporary = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    for path in [*batches, *temporary, folder / HEADER]:
        path.unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()


def _code(code: dict[str, str | None]) -> str:
    commit = code.get("git_commit")
    return f"kvcomm {code.get('kvcomm')}" + (f" (commit {commit})" if commit else "")


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _read(path: Path, model: type[M]) -> M:
    try:
        return model.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, ValidationError) as err:
        raise DataError(f"cannot read checkpoint file {path}: {' '.join(str(err).split())[:200]}") from None
