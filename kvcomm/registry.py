"""A small named registry shared by models, tasks, methods and selectors.

Every built-in is registered once, by name, in the module that defines it; a bad name raises
:class:`ConfigError` listing the valid ones with a "did you mean" hint.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from kvcomm.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects of one kind (``what`` names that kind in error messages)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name`` (each name once)."""

        def add(obj: T) -> T:
            self.add(name, obj)
            return obj

        return add

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise ConfigError(f"{self.what} {name!r} is registered twice")
        self._items[name] = obj

    def get(self, name: str) -> T:
        if not isinstance(name, str) or name not in self._items:
            raise unknown_name(self.what, name, self._items)
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return list(self._items)


def unknown_name(what: str, name: object, valid: Iterable[str]) -> ConfigError:
    """The error for a ``name`` that names no ``what``: one that is not a string (before: a bare
    TypeError from difflib, e.g. ``make_codec(None)``, ``load_task(3)``), or an unknown one, with
    the nearest valid name; the valid names listed, sorted. Registries and lookups over several of
    them (codec presets and codec classes) raise it alike."""
    names = sorted(valid)
    if not isinstance(name, str):
        return ConfigError(f"a {what} is named by a string, not {type(name).__name__} {name!r}; valid: "
                           f"{', '.join(names)}")
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown {what} {name!r}.{hint} Valid: {', '.join(names)}")
