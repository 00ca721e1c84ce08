"""The no-argument path: a small sweep on the embedded default model and a generated task."""

from __future__ import annotations

from pathlib import Path

from kvcomm.agents import Agents
from kvcomm.cli.common import console
from kvcomm.errors import ModelError
from kvcomm.eval import EvalConfig, evaluate, plot_sweep, print_table
from kvcomm.methods import build_methods
from kvcomm.models import DEFAULT_MODEL, EMBEDDED
from kvcomm.tasks import load_task

DEMO_ITEMS = 16


def demo() -> None:
    """Baseline, skyline and KVComm at 0.5 and 1.0 on 16 generated look-up items, one batch."""
    if not EMBEDDED.get(DEFAULT_MODEL).is_installed():
        raise ModelError(f"the default model is not installed; run: kvcomm models install {DEFAULT_MODEL}")
    console.print(f"kvcomm demo: {DEFAULT_MODEL}, {DEMO_ITEMS} generated fact look-ups "
                  "(the sender reads who lives where; the receiver is asked one of them)")
    task = load_task("facts", items=DEMO_ITEMS + 2)
    methods = build_methods(["baseline", "skyline", "kvcomm"], [0.5, 1.0])
    config = EvalConfig(limit=DEMO_ITEMS, batch_size=DEMO_ITEMS, calib_size=2)
    report = evaluate(Agents.load(DEFAULT_MODEL), task, methods, config)
    print_table(report)
    out = Path("results") / "demo.json"
    report.save(out)
    console.print(f"results: {out}\nplot: {plot_sweep(report, Path('results') / 'demo.png')}", markup=False)
    console.print("Next: `kvcomm sweep --help`, `kvcomm eval --help`.")
