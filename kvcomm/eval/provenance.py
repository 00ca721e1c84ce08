"""What a results file records so that a run can be reproduced and compared: data hashes, the
code's commit, the time, and the identity a resumed run must match.

Nothing here needs a model: the command line computes a run's identity before any model loads,
so resuming with another configuration is refused at once.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from kvcomm.errors import DataError
from kvcomm.methods.base import Method
from kvcomm.methods.kvcomm import SharingOptions
from kvcomm.tasks.base import Task


def utc_now() -> str:
    """The current time, ISO 8601 in UTC to the second (e.g. ``2026-01-31T12:00:00+00:00``)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}") from err
    return digest.hexdigest()


def data_record(task: Task) -> dict[str, str] | None:
    """The task's data file and its sha256 (None for a generated task)."""
    if task.data is None:
        return None
    return {"path": str(Path(task.data).resolve()), "sha256": file_sha256(task.data)}


def items_sha256(task: Task) -> str:
    """Hex sha256 of the task's items (ids, contexts, questions, answers, and the pieces and choices
    of the items that have them) in order. Pieces and choices are added only where an item has
    some, so that the identities of tasks without them, and their checkpoints, stay as they were."""
    rows = []
    for i in task.items:
        row: list[Any] = [i.id, i.context, i.question, list(i.answers)]
        if extra := {name: list(value) for name, value in (("pieces", i.pieces), ("choices", i.choices)) if value}:
            row.append(extra)
        rows.append(row)
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()


@cache
def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the repository kvcomm is imported from, if it is one (else None),
    with ``+dirty`` appended where tracked files differ from that commit (``git status --porcelain
    --untracked-files=no`` lists any) or that cannot be told: the code that runs is then not the
    commit's."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    if done.returncode != 0 or len(commit) != 40:
        return None
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return commit + "+dirty"
    return commit if status.returncode == 0 and not status.stdout.strip() else commit + "+dirty"


def code_version() -> dict[str, str | None]:
    """The code running now: the kvcomm version and :func:`git_commit` (None outside a repository)."""
    from kvcomm import __version__

    return {"kvcomm": __version__, "git_commit": git_commit()}


def method_seeds(methods: Sequence[Method]) -> dict[str, int]:
    """The seed of each configuration that takes one (e.g. ``random`` layer draws), by label."""
    return {m.label: int(m.options.model_dump()["seed"]) for m in methods if "seed" in m.option_names()}


def profiles_identity(profile: BaseModel | None, blocks: BaseModel | None) -> dict[str, Any] | None:
    """What a run's given profiles contribute to its identity (a ranking's alone as before blocks)."""
    ranking = None if profile is None else profile.model_dump(mode="json")
    if blocks is None:
        return ranking
    made = blocks.model_dump(mode="json")
    if made.get("data") is None:  # recorded since 2026-11-26: a checkpoint made before it resumes
        made.pop("data", None)
    return {"ranking": ranking, "blocks": made}


def run_identity(task: Task, methods: Sequence[Method], config: dict[str, Any], sender: str, receiver: str,
                 dtype: str, profile: dict[str, Any] | None, linear: str = "dense",
                 calibration: dict[str, Any] | None = None, weights: Sequence[str] | None = None) -> dict[str, Any]:
    """Everything that determines a run's answers: what a resumed run must repeat exactly.

    The data is identified by its content (``items``), not its path, so a moved file resumes;
    timing, the date and the code version are not part of it. ``calibration`` is what the
    calibration options come to (``calibration_identity`` in :mod:`kvcomm.eval.harness`: the items
    and each calibrated rule's objective), so that a default changed later is a difference a
    resumed run can repeat by giving the recorded value (:func:`identity_difference`).
    ``weights`` are the models' weights digests, known once they load: a model derived again
    under its name is another run.
    """
    return {
        **({"weights": list(weights)} if weights is not None else {}),
        **({"calibration": calibration} if calibration is not None else {}),
        "sender": sender, "receiver": receiver, "dtype": dtype, "task": task.name, "items": items_sha256(task),
        "max_new_tokens": task.max_new_tokens, "metric": task.metric, "instruction": task.instruction,
        # kvcomm's layouts other than the paper's chats, and test items that do not start at the
        # front, are named only when used, so the checkpoints written before those options existed
        # still resume (blend and prefix always took pieces)
        "evaluation": _without_defaults(config),
        "methods": [{"method": m.name, "options": _without_defaults(m.options.model_dump(mode="json"))
                     if isinstance(m.options, SharingOptions) else m.options.model_dump(mode="json")}
                    for m in methods],
        "profile": profile,
        # packed linear layers round differently (models/packing.py); named only when used, so
        # the checkpoints of dense runs written before the option existed still resume
        **({"linear": linear} if linear != "dense" else {}),
    }


LATER_DEFAULTS: dict[str, Any] = {"pieces": "chats", "skip": 0}  # options added after runs were checkpointed


def _without_defaults(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}


CALIBRATION_OPTIONS = ("calib_size", "objective")  # what ``calibration`` records the effect of


def identity_difference(recorded: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first difference (:func:`first_difference`) between a checkpoint's ``recorded``
    identity and a resumed run's ``new`` one, comparing the calibration by what its options come
    to: the ``calibration`` both record, not whether each option was given or left to its
    default. An identity recorded before ``calibration`` was (it has none) compares the options as
    given, where an option it left to its default matches the same value given now: any
    ``calib_size`` (the recorded profile's items are checked when it is reused) and the
    ``likelihood``, every rule's objective then. The models' ``weights`` are compared where both
    record them (not before the models load, nor against a checkpoint written before weights were).
    Where both record weights, the models' names are not compared (``-m tiny`` and ``-m ./tiny``
    are one model: the weights say which); before the models load, two names of one folder are
    one model."""
    if "weights" in recorded and "weights" in new:  # the weights say which models: a name may be spelled otherwise
        recorded, new = ({k: v for k, v in identity.items() if k not in ("sender", "receiver")}
                         for identity in (recorded, new))
    else:
        new = {**new, **{key: recorded[key] for key in ("sender", "receiver")
                         if key in recorded and key in new and _one_folder(recorded[key], new[key])}}
    if ("weights" in recorded) != ("weights" in new):
        recorded, new = ({k: v for k, v in identity.items() if k != "weights"} for identity in (recorded, new))
    if "calibration" in recorded and "calibration" in new:
        return first_difference(_without_calibration_options(recorded), _without_calibration_options(new))
    new = {key: value for key, value in new.items() if key != "calibration"}
    then, now = recorded.get("evaluation", {}), dict(new.get("evaluation", {}))
    if then.get("calib_size") is None:
        now["calib_size"] = None
    if then.get("objective") is None and now.get("objective") == "likelihood":
        now["objective"] = None
    return first_difference(recorded, {**new, "evaluation": now})


def _one_folder(a: Any, b: Any) -> bool:
    """Whether two model names are paths of one existing folder or file (``tiny`` and ``./tiny``)."""
    if not isinstance(a, str) or not isinstance(b, str) or a == b:
        return False
    first, second = Path(a).expanduser(), Path(b).expanduser()
    return first.exists() and second.exists() and first.resolve() == second.resolve()


def _without_calibration_options(identity: dict[str, Any]) -> dict[str, Any]:
    evaluation = {k: v for k, v in identity.get("evaluation", {}).items() if k not in CALIBRATION_OPTIONS}
    return {**identity, "evaluation": evaluation}


def first_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """``key: old → new`` for the first key whose values differ, into nested dicts and lists of
    the same length at any depth (``evaluation.batch_size: 2 → 3``,
    ``methods[1].options.ratio: 0.5 → 0.3``)."""
    for key in sorted(set(old) | set(new)):
        if (inner := _difference(old.get(key), new.get(key))) is not None:
            return f"{key}{inner}"
    return None


def _difference(a: Any, b: Any) -> str | None:
    """Where ``a`` and ``b`` first differ, as the path's rest (``.key``, ``[index]``) and
    ``: a → b`` (None: equal)."""
    if a == b:
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        inner = first_difference(a, b)
        return f".{inner}" if inner else ""
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        index, (x, y) = next((i, pair) for i, pair in enumerate(zip(a, b)) if pair[0] != pair[1])
        return f"[{index}]{_difference(x, y)}"
    return f": {_short(a)} → {_short(b)}"


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"
