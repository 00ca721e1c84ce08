"""The evaluation harness, its results schema and plots."""

from kvcomm.eval.checkpoint import Checkpoint
from kvcomm.eval.harness import EvalConfig, evaluate, split_items
from kvcomm.eval.plot import plot_sweep
from kvcomm.eval.results import Report, RunResult, bootstrap_ci, print_table

__all__ = [
    "Checkpoint", "EvalConfig", "Report", "RunResult", "bootstrap_ci", "evaluate", "plot_sweep", "print_table",
    "split_items",
]
