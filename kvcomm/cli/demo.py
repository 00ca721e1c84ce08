"""The no-argument path: a small sweep on the embedded default model and a generated task."""

from __future__ import annotations

from pathlib import Path

from kvcomm.cli.common import console, run_eval
from kvcomm.eval import EvalConfig, plot_sweep
from kvcomm.methods import build_methods
from kvcomm.models import DEFAULT_MODEL, EMBEDDED
from kvcomm.tasks import load_task

DEMO_ITEMS = 16


def demo() -> None:
    """Baseline, skyline and KVComm at 0.5 and 1.0 on 16 generated look-up items, one batch."""
    if not EMBEDDED.get(DEFAULT_MODEL).is_installed():
        console.print(f"[red]The default model is not installed.[/red] Run: kvcomm models install {DEFAULT_MODEL}")
        raise SystemExit(1)
    console.print(f"kvcomm demo: {DEFAULT_MODEL}, {DEMO_ITEMS} generated fact look-ups "
                  "(the sender reads who lives where; the receiver is asked one of them)")
    task = load_task("facts", items=DEMO_ITEMS + 2)
    methods = build_methods(["baseline", "skyline", "kvcomm"], [0.5, 1.0])
    config = EvalConfig(limit=DEMO_ITEMS, batch_size=DEMO_ITEMS, calib_size=2)
    report = run_eval(DEFAULT_MODEL, None, task, methods, config, None, "float32", False, Path("results") / "demo.json")
    console.print(f"plot: {plot_sweep(report, Path('results') / 'demo.png')}")
    console.print("Next: `kvcomm sweep --help`, `kvcomm eval --help`.")
