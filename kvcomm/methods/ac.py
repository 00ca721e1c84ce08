"""AC (activation communication, Ramesh & Li 2025): one hidden vector from sender to receiver.

The sender's last-token hidden state after ``layer_k`` layers (0 = the embeddings) is fused into
the receiver's last-token hidden state just before its decoder layer ``layer_j``, during the
receiver's prefill: ``replace``, ``sum`` or ``mean``. Negative indices count from the end (the
reference code silently skips the graft for them). The sender's state is transformers'
``hidden_states[layer_k]``, as the reference code takes it: so ``layer_k`` = the depth (or -1) is
the last layer's output *after the model's final norm*, where a smaller ``layer_k`` is a layer's
raw output (the residual stream).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch

from kvcomm.errors import ConfigError
from kvcomm.methods.base import METHODS, Method, MethodOptions, Output, Setup
from kvcomm.protocol import empty_input, greedy_generate
from kvcomm.protocol.sender import run_body

if TYPE_CHECKING:
    from kvcomm.eval.batch import Batch

FUSIONS = {
    "replace": lambda mine, theirs: theirs,
    "sum": lambda mine, theirs: mine + theirs,
    "mean": lambda mine, theirs: (mine + theirs) / 2,
}


class ACOptions(MethodOptions):
    """``fuse``: ``replace``, ``sum`` or ``mean``; ``layer_k``, ``layer_j``: layer indices, negative
    counting from the end, default ~3/4 of the depth (``layer_k`` = the depth: after the final
    norm, as the module's docstring says)."""

    fuse: Literal["replace", "sum", "mean"] = "mean"
    layer_k: int | None = None
    layer_j: int | None = None


@METHODS.register("ac")
class ActivationCommunication(Method):
    """Fuse the sender's last hidden state at depth ``layer_k`` into the receiver before layer ``layer_j``."""

    name = "ac"
    options_model = ACOptions
    options: ACOptions

    def __init__(self, options: ACOptions | None = None, **given: Any) -> None:
        super().__init__(options, **given)
        self.fuse, self.layer_k, self.layer_j = self.options.fuse, self.options.layer_k, self.options.layer_j
        self._k: int | None = None
        self._j: int | None = None

    @property
    def label(self) -> str:
        k = self._k if self._k is not None else self.layer_k
        j = self._j if self._j is not None else self.layer_j
        given = ("" if k is None else f"k{k}") + ("" if j is None else f"j{j}")  # before setup: those given
        return f"ac-{self.fuse}@{given}" if given else f"ac-{self.fuse}"

    def check_depth(self, num_layers: int) -> None:
        self._positions(num_layers)

    def setup(self, setup: Setup) -> None:
        self._k, self._j = self._positions(setup.num_layers)

    def _positions(self, depth: int) -> tuple[int, int]:
        """``layer_k`` and ``layer_j`` for a model of ``depth`` layers, negative ones counted from the end."""
        default = round(0.75 * depth)
        return (_normalise(self.layer_k if self.layer_k is not None else default, depth + 1, "layer_k (--ac-k)"),
                _normalise(self.layer_j if self.layer_j is not None else default, depth, "layer_j (--ac-j)"))

    def run(self, batch: Batch) -> Output:
        if self._k is None or self._j is None:
            raise ConfigError("ac: setup() must run before run()")
        sender, receiver = batch.agents.sender, batch.agents.receiver
        sent = batch.prompt("sender", batch.task.sender_message)
        start = empty_input(sender.model, len(batch.items))
        with batch.sender_work(), torch.inference_mode():
            states = run_body(sender.model, sent.input_ids, sent.valid, start.cache, start.layout, head=False,
                              hidden_states=True).hidden_states
            vector = states[self._k][:, -1]  # [B, H]: left padding puts every row's last token at -1
        prompt = batch.prompt("receiver", batch.task.receiver_message)
        layer = receiver.model.get_decoder().layers[self._j]
        handle = layer.register_forward_pre_hook(_graft_once(vector, FUSIONS[self.fuse]), with_kwargs=True)
        try:
            answers = greedy_generate(receiver.model, empty_input(receiver.model, len(batch.items)),
                                      prompt.input_ids, prompt.valid, batch.task.max_new_tokens,
                                      receiver.stop_ids, receiver.pad_id)
        finally:
            handle.remove()
        return Output(
            answers=[receiver.decode(ids) for ids in answers], receiver_ids=prompt.ids, sender_ids=sent.ids,
            kv_bytes=[vector.shape[1] * vector.element_size()] * len(batch.items),
        )


def _normalise(index: int, size: int, what: str) -> int:
    if not -size <= index < size:
        raise ConfigError(f"ac: {what} {index} is out of range: the model has {size} positions there "
                          f"({-size}..{size - 1})")
    return index % size


def _graft_once(vector: torch.Tensor, fuse: Any) -> Any:
    """A pre-hook that fuses ``vector`` into the last position on the first (prefill) call only."""
    used = False

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        nonlocal used
        if used:
            return args, kwargs
        used = True
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = hidden.clone()
        hidden[:, -1] = fuse(hidden[:, -1], vector.to(hidden.dtype))
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    return hook
