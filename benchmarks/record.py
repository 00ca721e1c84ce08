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
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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
