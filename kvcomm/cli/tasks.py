"""``kvcomm tasks``: the registered tasks with their primary metric, answer budget, data and options."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kvcomm.tasks import TASKS


def tasks_command() -> None:
    """List the tasks: metric, answer budget, source, and a generated task's options.

    Options are given with --task-option KEY=VALUE.
    """
    table = Table(title="tasks (--metric and --max-new-tokens replace a task's own)")
    for column in ("task", "metric", "max new tokens", "data", "options (--task-option)", "description"):
        table.add_column(column, justify="right" if column == "max new tokens" else "left")
    for name in TASKS:
        info = TASKS.get(name)
        options = " ".join(f"{key}={default}" for key, (_, default) in info.options.items()) or "-"
        cells = (name, info.metric, str(info.max_new_tokens), info.source, options,
                 info.description.replace("``", ""))
        table.add_row(*(Text(cell) for cell in cells))
    Console(width=None if sys.stdout.isatty() else 120).print(table)
