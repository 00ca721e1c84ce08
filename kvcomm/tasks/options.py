"""A task's own options: the parameters its loader takes besides ``path`` (a generated task's
item count, seed, pieces, filler ...), named, typed and checked before the task is built.

``kvcomm eval -t multihop --task-option items=200 --task-option filler_per_piece=2`` reaches the
loader through :func:`parse_options`; :func:`check_options` (which ``load_task`` calls) refuses a
name the loader does not take with a "did you mean", where calling it would raise a bare
``TypeError``.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Callable, Iterable, Sequence
from numbers import Integral, Real
from typing import Any

from kvcomm.errors import ConfigError


def task_options(load: Callable[..., Any]) -> dict[str, tuple[type, Any]]:
    """``{option: (type, default)}`` of a task's loader (``path`` is ``--data``, not an option)."""
    hints = typing.get_type_hints(load)
    return {p.name: (hints.get(p.name, str), p.default) for p in inspect.signature(load).parameters.values()
            if p.name != "path" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_options(name: str, load: Callable[..., Any], params: dict[str, Any]) -> dict[str, Any]:
    """Refuses an option the task ``name`` (loaded by ``load``) does not take, naming the nearest
    and the valid ones; returns ``params`` with numbers of other types (numpy's) as Python's own
    ``int`` and ``float`` (before, ``np.int64`` items ran a whole evaluation and then failed to save).

    Raises:
        ConfigError: an unknown option, or a value not of the option's type (``items="5"``).
    """
    known = task_options(load)
    _refuse_unknown(name, known, params)
    checked = dict(params)
    for key, value in params.items():
        kind = known[key][0]
        wanted = {int: Integral, float: Real}.get(kind, kind)
        if kind in (int, float, bool, str) and (not isinstance(value, wanted) or
                                                (kind is not bool and isinstance(value, bool))):
            raise ConfigError(f"task {name!r} option {key!r} is {'a whole number' if kind is int else kind.__name__}, "
                              f"not {value!r}")
        if kind in (int, float):
            checked[key] = kind(value)
    return checked


def _refuse_unknown(name: str, known: dict[str, tuple[type, Any]], keys: Iterable[str]) -> None:
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            valid = ", ".join(known) or "none"
            raise ConfigError(f"task {name!r} takes no option {key!r}.{hint} Its options: {valid}")


def parse_options(name: str, load: Callable[..., Any], pairs: Sequence[str]) -> dict[str, Any]:
    """``["items=200", "filler-per-piece=2"]`` as the loader's keyword arguments, each converted
    to the parameter's type (a dash stands for an underscore). A pair ``TASK:KEY=VALUE`` is for
    that task only: another task's pairs are passed over.

    Raises:
        ConfigError: a pair without ``=``, an option the task does not take, a value of the wrong
            type, or one option given twice.
    """
    known = task_options(load)
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        task, colon, key = key.rpartition(":")
        if colon and task.strip() != name:
            continue
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--task-option {pair!r} is not KEY=VALUE (e.g. items=200)")
        _refuse_unknown(name, known, [key])
        if key in out:
            raise ConfigError(f"--task-option gives {key!r} twice")
        kind = known[key][0]
        if kind not in (int, float, str):
            raise ConfigError(f"option {key!r} of task {name!r} ({kind}) cannot be given on the command line")
        try:
            out[key] = kind(text.strip())
        except ValueError:
            raise ConfigError(f"option {key!r} of task {name!r} takes {kind.__name__}, not {text!r}") from None
    return out


def option_task(pair: str) -> str | None:
    """The task a ``TASK:KEY=VALUE`` pair is for; None when it is for every task of the run."""
    task, colon, _ = pair.partition("=")[0].rpartition(":")
    return task.strip() if colon else None
