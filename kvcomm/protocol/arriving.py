"""A receiver that starts before the message is in: layer l of its prefill waits only for layer l.

Receiving a whole message and then prefilling the question serialises two things that need not
wait for each other. The question's layer l reads only layer l of the received KV, and a message
arrives layer by layer (:mod:`kvcomm.wire.streaming`). :class:`ArrivingCache` is a
``DynamicCache`` whose received part of layer l is put in the first time the model's attention at
layer l updates it: it asks ``fetch(l)``, which blocks until that layer has arrived. The question's
layer l then runs while layer l+1 is still on the wire, and the time to the first token approaches
the larger of the transfer and the prefill instead of their sum.

The layout is made from what is known before any KV (each layer's token count, the context's
length, the sink's position), and the tensors put in are the ones :func:`receiver_input` would
have put in, so the logits are the same (tested). Whether a check still pending (a message's
final digest) must pass before the last layer is handed out is ``fetch``'s concern: a failure
raised there abandons the forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from kvcomm.errors import ProtocolError
from kvcomm.protocol.layout import AttentionLayout, MaskMode
from kvcomm.protocol.padded import PADDED_MODES
from kvcomm.protocol.receiver import ReceiverInput

Fetch = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # layer -> keys, values [1, Hkv, P_l, D]


class ArrivingCache(DynamicCache):
    """A receiver cache whose received KV is fetched layer by layer, when the forward first needs it.

    Args:
        fetch: ``fetch(l)`` → layer l's received keys and values ``[1, Hkv, P_l, D]``; it may
            block until they have arrived, and raises to abandon the forward.
        lengths: ``P_l`` of every layer, known before the KV (positions and masks need it).
    """

    def __init__(self, fetch: Fetch, lengths: Sequence[int]) -> None:
        super().__init__()
        self._fetch: Fetch | None = fetch
        self._lengths = list(lengths)
        self.arrived = 0  # layers 0..arrived-1 hold their received KV

    def fill(self, upto: int) -> None:
        """Puts in the received KV of every layer up to ``upto`` (inclusive), in order."""
        while self.arrived <= min(upto, len(self._lengths) - 1):
            assert self._fetch is not None
            keys, values = self._fetch(self.arrived)
            if keys.shape[2] != self._lengths[self.arrived]:
                raise ProtocolError(f"layer {self.arrived} arrived with {keys.shape[2]} keys, "
                                 f"{self._lengths[self.arrived]} were declared")
            super().update(keys, values, self.arrived)
            self.arrived += 1
            if self.arrived == len(self._lengths):
                self._fetch = None  # all in: let go of the source (an arriving message, its threads)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.fill(layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= self.arrived and layer_idx < len(self._lengths):
            return self._lengths[layer_idx]  # what the layer will hold once its KV is in
        return super().get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if layer_idx >= self.arrived and layer_idx < len(self._lengths):
            return self._lengths[layer_idx] + query_length, 0
        return super().get_mask_sizes(query_length, layer_idx)


def arriving_input(fetch: Fetch, positions: Sequence[torch.Tensor], context_len: int,
                   mode: MaskMode, element_size: int, kv_heads: int, head_dim: int) -> ReceiverInput:
    """A one-row receiver whose received KV arrives while the forward runs (see the module).

    Args:
        fetch: see :class:`ArrivingCache`.
        positions: per layer, ``[1, P_l]`` RoPE positions of the received keys (as
            :meth:`~kvcomm.wire.KVMessage.to_shared` gives them).
        element_size: bytes per value of what ``fetch`` returns (for ``kv_bytes``).

    Raises:
        ProtocolError: a padded mask mode (its sink-only layers are widened before the forward,
            which KV that has not arrived cannot be).
    """
    if mode in PADDED_MODES:
        raise ProtocolError(f"KV that arrives during the forward is read in causal, shift-back or legacy mode, "
                            f"not {mode} (its sink-only layers are widened beforehand: read the whole message)")
    lengths = [int(p.shape[1]) for p in positions]
    layout = AttentionLayout(
        prefix_pos=list(positions), prefix_valid=[torch.ones(1, n, dtype=torch.bool) for n in lengths],
        context_len=torch.tensor([context_len]), own_pos=torch.zeros(1, 0, dtype=torch.long),
        own_valid=torch.zeros(1, 0, dtype=torch.bool), mode=mode,
    )
    received = torch.tensor([sum(lengths) * 2 * kv_heads * head_dim * element_size])
    return ReceiverInput(cache=ArrivingCache(fetch, lengths), layout=layout, kv_bytes=received)
