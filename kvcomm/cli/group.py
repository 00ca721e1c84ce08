"""The command group every ``kvcomm`` command runs in: every mistake is one line and exit code 2.

The parser's own usage errors (a bad choice, a number out of range, a missing file) and every
:class:`~kvcomm.errors.KvcommError` a command raises end the same way: ``error: …`` on standard
error, exit code 2, no traceback, whether the CLI runs as ``kvcomm`` or under a test runner.
The group also keeps the command line it runs (:func:`command_line`), for results to record.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

import typer
from typer.core import TyperGroup

from kvcomm.errors import KvcommError

USAGE_ERROR = 2
_COMMAND_LINE: ContextVar[str | None] = ContextVar("kvcomm_command_line", default=None)


def command_line() -> str | None:
    """The running command as a shell would take it (``kvcomm sweep -t facts …``); None outside the CLI."""
    return _COMMAND_LINE.get()


def fail(message: str, code: int = USAGE_ERROR) -> None:
    """Prints ``error: message`` as one line on standard error and exits with ``code``."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(code)


ONCE = frozenset({"task"})
"""Options a repeat of which is refused rather than taken last-wins: ``-t facts -t multihop`` reads
as two tasks (``--data`` repeats), and ran multihop alone. Others keep the parser's rule, the last
given wins, which scripts use to override a common command line."""


def repeated_option(command: Any, args: Sequence[str], once: frozenset[str] = ONCE) -> str | None:
    """Where ``args`` give one of ``command``'s single-value options named in ``once`` twice, what to
    say; None where none is. (``command`` is a command of typer's own click: its classes are
    typer's private module, so they are told by their attributes.)"""
    takes_value: dict[str, Any] = {}
    for param in command.params:
        if getattr(param, "param_type_name", None) == "option" and not param.is_flag and not param.count:
            takes_value.update(dict.fromkeys(param.opts, param))
    seen: dict[str, str] = {}
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            continue
        if arg.startswith("--"):
            name, inline = (arg.split("=", 1)[0], True) if "=" in arg else (arg, False)
        else:  # a cluster of short options ("-qt facts"): the first that takes a value takes the rest
            name, inline = "", False
            for at, letter in enumerate(arg[1:], start=1):
                if f"-{letter}" in takes_value:
                    name, inline = f"-{letter}", at < len(arg) - 1
                    break
        if (param := takes_value.get(name)) is None:
            continue
        index += 0 if inline else 1  # its value, whatever it looks like
        if param.multiple or param.nargs != 1 or param.name not in once:
            continue
        if param.name in seen:
            hint = " (several tasks: one --task, comma-separated: -t facts,multihop)" if param.name == "task" else ""
            return f"{param.opts[0]} given twice ({seen[param.name]} and {name}): give it once{hint}"
        seen[str(param.name)] = name
    return None


class KvcommGroup(TyperGroup):
    """A Typer group whose errors are single lines with exit code 2, and which refuses ``--task``
    given twice (:func:`repeated_option`)."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not hasattr(command, "commands") and \
                (problem := repeated_option(command, rest)) is not None:
            ctx.fail(problem)  # the parser's own usage error: one line, exit code 2
        return name, command, rest

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, windows_expand_args: bool = True,
             **extra: Any) -> Any:
        given = list(args) if args is not None else sys.argv[1:]
        token = _COMMAND_LINE.set(shlex.join(["kvcomm", *given]))
        try:
            result = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                  standalone_mode=False, windows_expand_args=windows_expand_args, **extra)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        except typer.TyperException as err:  # the parser's errors (typer's own click)
            context = getattr(err, "ctx", None)
            if type(err).__name__ == "NoArgsIsHelpError" and context is not None:  # a group without a command
                typer.echo(context.get_help(), err=True)
                sys.exit(USAGE_ERROR)
            hint = f" (see `{context.command_path} --help`)" if context is not None else ""
            fail(err.format_message() + hint)
        except KvcommError as err:
            fail(str(err))
        finally:
            _COMMAND_LINE.reset(token)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)
