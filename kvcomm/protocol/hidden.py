"""Hidden states between decoder layers: recording them during a forward, and running a span of
layers from a given one.

The hidden state *entering* layer ``l`` is the residual stream before that layer: the embeddings
for ``l = 0``, the output of layer ``l - 1`` otherwise; ``l = L`` is the last layer's output
(before the final norm). DroidSpeak's E-cache is the sender's hidden state entering a block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from transformers import PreTrainedModel

from kvcomm.errors import ConfigError


def _layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    return model.get_decoder().layers


def _first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


@contextlib.contextmanager
def recording(model: PreTrainedModel, layers: Iterable[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Inside, every forward of ``model`` records the hidden state entering each of ``layers``
    (``[B, T, H]``, 0..L) into the yielded dict (a later forward replaces an earlier one's)."""
    stack = _layers(model)
    count = len(stack)
    wanted = sorted(set(layers))
    if wanted and not (0 <= wanted[0] and wanted[-1] <= count):
        raise ConfigError(f"hidden states enter layers 0..{count}, not {wanted}")
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for index in wanted:
        if index < count:
            def before(module: torch.nn.Module, args: tuple, kwargs: dict, index: int = index) -> None:
                seen[index] = (args[0] if args else kwargs["hidden_states"]).detach()
            handles.append(stack[index].register_forward_pre_hook(before, with_kwargs=True))
        else:
            def after(module: torch.nn.Module, args: tuple, output: Any, index: int = index) -> None:
                seen[index] = _first(output).detach()
            handles.append(stack[count - 1].register_forward_hook(after))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


class _PassThrough(torch.nn.Module):
    """Stands in for a decoder layer that a span skips: hands the hidden state on unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _Stop(Exception):
    """Raised after the last layer of a span has run, to end the forward there."""


class Span:
    """What :func:`only_layers` yields: ``leaving``, the hidden state leaving the span's last layer
    (``[B, T, H]``, the state entering ``stop``) in the latest forward inside, ``None`` before one."""

    def __init__(self) -> None:
        self.leaving: torch.Tensor | None = None


@contextlib.contextmanager
def only_layers(model: PreTrainedModel, start: int, stop: int) -> Iterator[Span]:
    """Inside, a forward of ``model`` given input embeddings ``h`` runs only layers ``start..stop-1``
    on ``h`` (the hidden state entering ``start``): earlier layers pass it through untouched and
    write no cache, and the forward ends after layer ``stop - 1`` (catch nothing: the context
    manager swallows the stop), or, when ``stop`` is the number of layers, runs on to the model's
    output (final norm, and the head if called with it). Each layer keeps its index, so its cache
    slot, mask type and RoPE are its own. The yielded :class:`Span` holds the hidden state leaving
    layer ``stop - 1`` (a forward that ends early returns none: that state is what it computed).

    The model's layer list is patched while inside: callers that share a model across threads
    must not run it concurrently (the service runs one request at a time).
    """
    stack = _layers(model)
    if not 0 <= start < stop <= len(stack):
        raise ConfigError(f"a span of layers must satisfy 0 <= start < stop <= {len(stack)}, got {start}:{stop}")
    originals = [stack[index] for index in range(start)]
    span = Span()

    def leave(module: torch.nn.Module, args: tuple, output: Any) -> None:
        span.leaving = _first(output).detach()
        if stop < len(stack):
            raise _Stop

    handle = stack[stop - 1].register_forward_hook(leave)
    for index in range(start):
        stack[index] = _PassThrough()
    try:
        yield span
    except _Stop:
        pass
    finally:
        handle.remove()
        for index, layer in enumerate(originals):
            stack[index] = layer
