"""A small named registry shared by models, tasks, methods and selectors.

Every built-in is registered once, by name, in the module that defines it; a bad name raises
:class:`ConfigError` listing the valid ones with a "did you mean" hint.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
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
        if not isinstance(name, str):  # before: a bare TypeError from difflib (make_codec(None), load_task(3))
            raise ConfigError(f"a {self.what} is named by a string, not {type(name).__name__} {name!r}; valid: "
                              f"{', '.join(sorted(self._items))}")
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown {self.what} {name!r}.{hint} Valid: {', '.join(sorted(self._items))}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return list(self._items)
