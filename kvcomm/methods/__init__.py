"""Communication methods behind one interface (:class:`Method`), looked up by name in ``METHODS``.

Each method declares its options (:attr:`Method.options_model`); :func:`build_methods` expands a
sweep's axes (ratios, codecs, mask modes) over the methods that take them and refuses an option
that none of the named methods takes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from kvcomm.config import listed
from kvcomm.errors import ConfigError
from kvcomm.methods.ac import ACOptions, ActivationCommunication
from kvcomm.methods.adaptive import AdaptiveKVComm, AdaptiveOptions
from kvcomm.methods.base import METHODS, Calibration, Method, MethodOptions, Output, Setup
from kvcomm.methods.blend import BlendMethod, BlendOptions, PrefixOptions, PrefixReuse
from kvcomm.methods.debate import Cipher, CipherOptions, Debate, DebateOptions, NaturalLanguageDebate
from kvcomm.methods.droidspeak import DroidSpeak, DroidSpeakOptions
from kvcomm.methods.kvcomm import (
    ContiguousLayers,
    KVCommMethod,
    KVCommOptions,
    RandomLayers,
    RandomOptions,
    SharingOptions,
)
from kvcomm.methods.online import OnlineKVComm, OnlineOptions
from kvcomm.methods.prompt import Baseline, Skyline

__all__ = [
    "METHODS", "ACOptions", "ActivationCommunication", "AdaptiveKVComm", "AdaptiveOptions",
    "Baseline", "BlendMethod", "BlendOptions", "Calibration",
    "Cipher", "CipherOptions", "DroidSpeak", "DroidSpeakOptions", "PrefixOptions", "PrefixReuse",
    "ContiguousLayers", "Debate", "DebateOptions", "KVCommMethod", "KVCommOptions", "Method", "MethodOptions",
    "NaturalLanguageDebate", "OnlineKVComm", "OnlineOptions", "Output", "RandomLayers", "RandomOptions", "Setup",
    "SharingOptions", "Skyline", "base_name", "build_methods", "make_method", "takers",
]


def make_method(name: str, **options: Any) -> Method:
    """One method by name with its options, validated (an option it does not take is refused)."""
    return METHODS.get(name)(**options)


def takers(option: str) -> list[str]:
    """The registered methods that take ``option``."""
    return [name for name in METHODS if option in METHODS.get(name).option_names()]


def build_methods(
    names: Sequence[str], ratios: Sequence[float] | None = None, codecs: Sequence[str | None] | None = None,
    modes: Sequence[str] | None = None, layer_ratios_only: bool = False, **options: Any,
) -> list[Method]:
    """Method configurations for ``names`` × ``ratios`` × ``codecs`` × ``modes``.

    A name may carry its own ratio (``random@0.5``), which replaces ``ratios`` for that method, and
    ``kvcomm`` its own selection rule (``kvcomm~paper``, ``kvcomm~answer@0.3``).

    ``ratios``, ``codecs`` and ``modes`` are sweep axes: each method that takes ``ratio``
    (``codec``, ``mode``) gets one configuration per value (a codec of ``None`` means in process,
    no wire); methods that do not take them run once (with ``layer_ratios_only``, a command's
    default ratios, ``ratios`` go only to methods whose ratio is a fraction of layers: ``blend``
    keeps its own). ``modes`` and a ``mode`` option exclude
    each other. Every other keyword is an option given to each named method that takes
    it (``None`` means "not given"). An option, ratio list or codec list that none of the named
    methods takes is refused, naming the methods that do take it.

    Raises:
        ConfigError: an unknown method, an option no named method takes, or an invalid value.
    """
    names = listed(names, "names")
    ratios, codecs, modes = (None if axis is None else listed(axis, what)
                             for axis, what in ((ratios, "ratios"), (codecs, "codecs"), (modes, "modes")))
    if not names:
        raise ConfigError("name at least one method")
    given = {key: value for key, value in options.items() if value is not None}
    if modes and "mode" in given:
        raise ConfigError("give one mask mode (--mode) or a list of them (--modes), not both")
    in_process_only = all(codec is None for codec in codecs or [])  # the default: no wire
    axes: dict[str, list[Any]] = {"ratio": list(ratios or []),
                                  "codec": [] if in_process_only else list(codecs or []), "mode": list(modes or [])}
    plans = [(token, METHODS.get(base_name(token))) for token in names]
    for token, cls in plans:
        if "@" in token:
            _ratio_of(token, token.partition("@")[2], "ratio" in cls.option_names())
    if len(plans) == 1 and "layers" in given and axes["ratio"]:
        raise ConfigError(f"{names[0]}: give a ratio or a layer list, not both")
    _refuse_unused(plans, given, axes)
    built: list[Method] = []
    for token, cls in plans:
        _, at, only = token.partition("@")
        fields = set(cls.option_names())
        mine = {key: value for key, value in given.items() if key in fields}
        if rule := _rule_of(token, "selection" in fields):  # "kvcomm~answer": this method's ranking rule
            mine["selection"] = rule
        ratio_axis: list[Any] = [None]
        if at:  # "kvcomm@0.5": this method at this ratio only
            ratio_axis = [_ratio_of(token, only, "ratio" in fields)]
        elif "ratio" in fields and "layers" not in mine and axes["ratio"] and (
                cls.ratio_of_layers or not layer_ratios_only):  # a layer list replaces ratios
            ratio_axis = axes["ratio"]
        codec_axis: list[Any] = axes["codec"] if "codec" in fields and axes["codec"] else ["unset"]
        mode_axis: list[Any] = axes["mode"] if "mode" in fields and axes["mode"] else ["unset"]
        for ratio, codec, mode in itertools.product(ratio_axis, codec_axis, mode_axis):
            chosen = dict(mine)
            if ratio is not None:
                chosen["ratio"] = ratio
            chosen.update({key: value for key, value in (("codec", codec), ("mode", mode)) if value != "unset"})
            built.append(cls(**chosen))
    return built


def _refuse_unused(plans: list[tuple[str, type[Method]]], given: dict[str, Any], axes: dict[str, list[Any]]) -> None:
    """Refuses an option (or a ratio or codec axis) that none of the planned methods takes."""
    unused = set(given) | {axis for axis, values in axes.items() if values}
    for token, cls in plans:
        fields = set(cls.option_names())
        unused -= fields - {"ratio"}
        if "ratio" in fields and "@" not in token and ("layers" not in given or "layers" not in fields):
            unused.discard("ratio")
    if not unused:
        return
    option = sorted(unused)[0]
    names = [base_name(token) for token, _ in plans]
    if option == "ratio" and (fixed := [token for token, cls in plans if "@" in token and "ratio" in
                                        cls.option_names()]):  # a method that takes one, its own given
        raise ConfigError(f"the ratios given are used by no method: {', '.join(fixed)} fix their own ratio "
                          "(leave out the ratios, or name the method without '@')")
    if len(names) == 1:
        takes = ", ".join(plans[0][1].option_names()) or "no options"
        raise ConfigError(f"method {names[0]!r} does not take {option!r}; it takes: {takes}")
    raise ConfigError(f"none of the methods {', '.join(names)} takes {option!r}; it is taken by: "
                      f"{', '.join(takers(option)) or 'no method'}")


def base_name(token: str) -> str:
    """The method name in a sweep token ``name[~rule][@ratio]``."""
    return token.partition("@")[0].partition("~")[0]


def _rule_of(token: str, takes_rule: bool) -> str | None:
    rule = token.partition("@")[0].partition("~")[2]
    if rule and not takes_rule:
        raise ConfigError(f"{token!r}: method {base_name(token)!r} has no selection rule")
    return rule or None


def _ratio_of(token: str, text: str, takes_ratio: bool) -> float:
    if not takes_ratio:
        raise ConfigError(f"{token!r}: method {base_name(token)!r} takes no ratio")
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{token!r}: {text!r} is not a ratio (e.g. kvcomm@0.5)") from None
