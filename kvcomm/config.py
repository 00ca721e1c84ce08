"""Typed, frozen option models: one place for defaults and checks, one error for every bad value.

Every configuration kvcomm takes from a user (a method's options, an evaluation, a service) is an
:class:`Options` model: frozen, unknown keys refused, and a bad value raised as one
:class:`~kvcomm.errors.ConfigError` line that names the field and what it must be.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from kvcomm.errors import ConfigError


def describe(err: ValidationError, what: str, fields: list[str] | None = None) -> str:
    """One line from a pydantic error: ``what: field: problem; field: problem`` (and what is taken)."""
    problems = []
    unknown = False
    for entry in err.errors():
        field = ".".join(str(p) for p in entry["loc"])
        message = entry["msg"].removeprefix("Value error, ")
        if entry["type"] == "extra_forbidden":
            unknown = True
            problems.append(f"{field!r} is not an option")
        else:  # a check of the whole model (no field) says what is wrong itself
            problems.append(f"{field}: {message}" if field else message)
    line = f"{what}: " + "; ".join(problems)
    if unknown and fields is not None:
        line += f" (it takes: {', '.join(fields) or 'no options'})"
    return line


_NAMED: ContextVar[str | None] = ContextVar("kvcomm_options_named", default=None)  # the name build() was given


class Options(BaseModel):
    """Base of kvcomm's option models: frozen, strict about unknown keys, errors as ConfigError."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)
    what: ClassVar[str] = "options"  # names the model in error messages

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ConfigError(describe(err, _NAMED.get() or self.what, list(type(self).model_fields))) from None

    @classmethod
    def build(cls, what: str | None = None, **data: Any) -> Self:
        """Like the constructor, naming ``what`` (e.g. a method name) in any error.

        (Not ``model_validate``: pydantic runs an overridden ``__init__`` inside validation, so
        its error would come back wrapped in a second one.)"""
        token = _NAMED.set(what)
        try:
            return cls(**data)
        finally:
            _NAMED.reset(token)

    def changed(self, **data: Any) -> Self:
        """A validated copy with ``data`` replacing fields."""
        return type(self).build(None, **{**self.model_dump(), **data})


def listed(value: Any, what: str) -> list[Any]:
    """``value``, a list, tuple or other iterable of values, as a list: a bare string or number is
    refused (a string would be read character by character: ``"kvcomm"`` as methods k, v, c …).

    Raises:
        ConfigError: naming ``what`` and showing how to give one value.
    """
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        plain = isinstance(value, str | bytes | int | float)
        shown = f"{value!r} (one value: [{value!r}])" if plain else f"one {type(value).__name__} (one value: [it])"
        raise ConfigError(f"{what} is a list of values, not {shown}")
    return list(value)
