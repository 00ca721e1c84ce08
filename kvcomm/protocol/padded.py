"""What a paged serving engine would make of a KVComm message: every layer the same token slots.

vLLM-style engines give all layers of a request one block table, so the |C| context slots exist at
every layer and every query attends to all of them. A layer that was sent only its sink cannot be
masked down to that one token there: its slots must hold something. Two fillings:

- ``padded-sink``: every slot holds a copy of the sink's (already rotated) key and value. The
  sink's softmax weight is multiplied by |C|, its output is the sink's value as before.
- ``padded-zero``: the sink in the slot of position 0, zeros elsewhere. Each zero key scores 0, so
  |C| − 1 zero values dilute the attention output.

The exact layout (``causal``) needs per-layer lengths, which such an engine cannot express. These
modes measure how much that costs (``kvcomm eval --mode padded-sink``), before anyone builds an
engine connector on the approximation; ``docs/design.md`` records the finding.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kvcomm.protocol.shared import SharedKV

PADDED_MODES = ("padded-sink", "padded-zero")


def pad_sink_layers(shared: SharedKV) -> SharedKV:
    """``shared`` with every sink-only layer widened to the whole context, unmasked (see the module).

    Rows are left-padded to the longest context, as every other layer of a batch; the added slots
    are valid keys at positions 0..|C|-1, so the causal mask lets every receiver token see them.
    Layers shared in full, and KV of any other mode, are returned as they are.
    """
    if shared.mode not in PADDED_MODES:
        return shared
    width = int(shared.context_len.max()) if shared.context_len.numel() else 0
    start = width - shared.context_len  # [B] the slot of position 0 in each row
    slots = torch.arange(width)
    positions = (slots[None, :] - start[:, None]).clamp(min=0)
    valid = slots[None, :] >= start[:, None]
    sink_slot = (slots[None, :] == start[:, None])[:, None, :, None]  # [B, 1, W, 1]
    keys, values = list(shared.keys), list(shared.values)
    all_positions, all_valid = list(shared.positions), list(shared.valid)
    for layer, (k, v) in enumerate(zip(shared.keys, shared.values)):
        if shared.full[layer] or k.shape[2] != 1:
            continue
        wide = (k.shape[0], k.shape[1], width, k.shape[3])
        if shared.mode == "padded-sink":
            keys[layer], values[layer] = k.expand(wide).contiguous(), v.expand(wide).contiguous()
        else:
            keys[layer] = torch.where(sink_slot, k, k.new_zeros(()))
            values[layer] = torch.where(sink_slot, v, v.new_zeros(()))
        all_positions[layer], all_valid[layer] = positions, valid
    return replace(shared, keys=keys, values=values, positions=all_positions, valid=all_valid)
