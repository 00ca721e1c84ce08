"""What every results JSON a benchmark writes by hand records about its run (not a benchmark itself).

Results files that :func:`kvcomm.evaluate` writes carry their own provenance and environment
(given the command line: :func:`command`); the files a benchmark builds itself take
:func:`run_record`'s two blocks, so that each says which command, code, libraries and threads
made it:

- ``provenance``: the command line (as a shell would take it), the date (UTC) and every option
  the command was given or defaulted to (``args``);
- ``environment``: :func:`kvcomm.eval.results.environment` (kvcomm, its git commit with ``+dirty``
  where the tree differs from it, torch, transformers, Python, the machine, the allocator) and the
  number of torch threads.

Take the record when the run starts (the commit is the code that ran, not the code at the end).

Every script's results go where ``--out`` names (:func:`add_out`), checked before any work
(:func:`check_out`: an existing file is replaced only with ``--overwrite``) and written whole or
not at all (:func:`write_json`), so that a run that fails halfway leaves the last results as they were.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def at_least_one(text: str) -> int:
    """An argparse type: a whole number of at least 1 (repeats, runs: 0 wrote zero speeds, or
    failed after the model had loaded)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def layer_fraction(text: str) -> float:
    """An argparse type: a fraction of the layers, 0 < value <= 1 (2.0 made negative layer indices)."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction of the layers, 0 < value <= 1, not {value:g}")
    return value


def add_out(parser: argparse.ArgumentParser, required: bool = True,
            help: str = "results JSON (a path of your choosing)") -> None:
    """``--out`` (the results JSON) and ``--overwrite`` (replace it where it exists)."""
    parser.add_argument("--out", type=Path, required=required, help=help)
    parser.add_argument("--overwrite", action="store_true", help="replace --out (and the files beside it that "
                        "this script writes) where it exists; without it an existing --out is refused before any work")


def check_out(parser: argparse.ArgumentParser, args: argparse.Namespace, written: Sequence[Path] | None = None,
              option: str = "out") -> None:
    """Refuses (through ``parser``, before any work) an ``--out`` (or the ``option`` that names the
    results file) that is a folder, that exists where ``--overwrite`` was not given, or whose folder
    cannot be made or written in. ``written``: the files the script writes in its stead (e.g. one
    per task, named after it), checked alike."""
    out = getattr(args, option, None)
    if out is None:
        return
    given = f"--{option}"
    for path in [out] if written is None else written:
        if path.is_dir():
            parser.error(f"{given} {out}: {path} is a folder: give the results file's path")
        if path.exists() and not args.overwrite:
            parser.error(f"{given} {out}: {path} exists: pass --overwrite to replace it, or give another {given}")
    from kvcomm.cli.common import check_writable
    from kvcomm.errors import ConfigError

    try:  # the folder it would be made in: a test file made there (os.access says yes to root everywhere)
        check_writable(out, given, out.absolute().parents)
    except ConfigError as err:
        parser.error(str(err))


def write_json(path: Path, data: Any) -> Path:
    """``data`` as indented JSON at ``path`` (its folder made), written atomically: a run that
    fails while writing leaves the file as it was. A :func:`run_record` environment's allocator
    setting is read again now: the record is made before the first model loads, which is when the
    allocator is set (it said ``not set`` in every file). Scripts whose models load in child
    processes (``item_cost.py``, ``sweep_throughput.py``, ``ray_sweep.py``) record each child's own
    setting in its run, and ``not set`` here, the parent's."""
    from kvcomm.files import atomic_write
    from kvcomm.models.allocator import allocator_state

    if isinstance(data, dict) and isinstance(data.get("environment"), dict) and "allocator" in data["environment"]:
        data = {**data, "environment": {**data["environment"], "allocator": allocator_state()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, json.dumps(data, indent=1) + "\n")


def command() -> str:
    """The running script's command line as a shell would take it (``python benchmarks/ttft.py …``)."""
    return shlex.join(["python", *sys.argv])


def arguments(args: argparse.Namespace | None) -> dict[str, Any]:
    """The parsed options, paths as strings (every value JSON can hold as it is, the rest as text)."""
    return {} if args is None else json.loads(json.dumps(vars(args), default=str))


def run_record(args: argparse.Namespace | None = None) -> dict[str, Any]:
    """``{"provenance": …, "environment": …}`` of this run, to merge into a results JSON."""
    import torch

    from kvcomm.eval.provenance import utc_now
    from kvcomm.eval.results import environment

    return {"provenance": {"command": command(), "date": utc_now(), "args": arguments(args)},
            "environment": {**environment(), "torch_threads": torch.get_num_threads()}}
