"""The no-argument path: a small sweep on the embedded default model and a generated task."""

from __future__ import annotations

import contextlib

from kvcomm.agents import Agents
from kvcomm.cli.common import console
from kvcomm.cli.group import command_line
from kvcomm.errors import ConfigError, ModelError
from kvcomm.eval import EvalConfig, evaluate, plot_sweep, print_table
from kvcomm.eval.outputs import TaskFiles, new_run_folder
from kvcomm.eval.samples import write_samples
from kvcomm.methods import build_methods
from kvcomm.models import DEFAULT_MODEL, EMBEDDED
from kvcomm.models.allocator import malloc_mode
from kvcomm.tasks import load_task

DEMO_ITEMS = 16


def demo() -> None:
    """Baseline, skyline and KVComm at 0.5 and 1.0 on 16 generated look-up items, one batch;
    files in a new ``results/<YYYYmmdd-HHMMSS>-<model>/`` folder."""
    if not EMBEDDED.get(DEFAULT_MODEL).is_installed():
        raise ModelError(f"the default model is not installed; run: kvcomm models install {DEFAULT_MODEL}")
    console.print(f"kvcomm demo: {DEFAULT_MODEL}, {DEMO_ITEMS} generated fact look-ups "
                  "(the sender reads who lives where; the receiver is asked one of them)")
    task = load_task("facts", items=DEMO_ITEMS + 2)
    methods = build_methods(["baseline", "skyline", "kvcomm"], [0.5, 1.0])
    config = EvalConfig(limit=DEMO_ITEMS, batch_size=DEMO_ITEMS, calib_size=2)
    malloc_mode()  # a bad KVCOMM_MALLOC, before a folder is claimed
    try:  # claimed before the work, as eval's and sweep's (before, a ./results it could not write failed after it)
        folder = new_run_folder(DEFAULT_MODEL, claim=True)
    except OSError as err:
        raise ConfigError(f"cannot make a run folder here ({type(err).__name__}: {err}); run the demo from a "
                          "folder you can write in") from None
    files = TaskFiles.for_task(folder, task.name)
    try:
        agents = Agents.load(DEFAULT_MODEL)
    except BaseException:
        with contextlib.suppress(OSError):
            folder.rmdir()  # still empty: no folder left for a run that never began
        raise
    report = evaluate(agents, task, methods, config, command=command_line())
    print_table(report)
    plot, samples = plot_sweep(report, files.plots[0]), write_samples(report, agents, files.samples)
    report.save(files.results)
    console.print(f"results: {files.results}\nsamples: {samples}\nplot: {plot}", markup=False, soft_wrap=True)
    console.print("Next: `kvcomm sweep --help`, `kvcomm eval --help`.")
