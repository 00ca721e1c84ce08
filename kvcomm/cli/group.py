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


class KvcommGroup(TyperGroup):
    """A Typer group whose errors are single lines with exit code 2."""

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
