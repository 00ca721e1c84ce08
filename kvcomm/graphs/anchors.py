"""KVCOMM's anchor-based offset correction for shared text reused across agents.

A question that several agents are asked is prefilled once (its *base* KV, moved to position 0)
and placed after each agent's own text with re-rotated positions. Re-rotation fixes positions, not
context: in an agent's own prefill the question's KV also depends on everything before it. KVCOMM
(Ye et al., NeurIPS '25) estimates that dependence from *anchors*: earlier shared texts that every
agent computed in its own context, for which the offset ``dense − base`` (in the position-0 frame)
was recorded per agent. A new text's offset is the anchors' offsets weighted by how close its base
KV is to each anchor's:

- on the shared text (the question), per token: a softmax over anchors of minus the mean absolute
  difference of the base KV over layers, heads and channels;
- on the template text after it (the chat's closing), per layer, head and channel: a softmax of
  minus the L2 distance of the shared text's base KV over its tokens;
- layer 0 is never changed (its KV depends only on the token and its position).

Keys and values are weighted each by their own distances. Whether a text is reused at all is
KVCOMM's shareability test, made for each agent (graph step) that is asked the text: with fewer
than ``min_anchors`` anchors at least as long that hold offsets for that agent, it is computed in
the agent's context (and the text becomes an anchor, with that agent's offsets); otherwise p =
softmax(−‖V − V_anchor‖) over those anchors, and the text is reused when p's entropy in bits is at
most ``threshold · log2(#anchors)``. The
anchors holding p's top 0.9 count one more use; above ``max_anchors`` the least used of the
``window`` oldest is dropped.

With one anchor that is the text itself (same base, same context) the correction gives back the
dense KV exactly (the tests check this).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from pydantic import Field, model_validator

from kvcomm.config import Options
from kvcomm.errors import ProtocolError
from kvcomm.protocol.sender import SenderKV


class AnchorOptions(Options):
    """KVCOMM's anchor-based offset correction of reused shared text.

    Attributes:
        threshold: γ, the shareability test's entropy bound (a fraction of log2 of the anchors).
        max_anchors: anchors kept; above it one is evicted.
        window: eviction considers the ``window`` oldest anchors and drops the least used.
        min_anchors: below this many anchors a shared text is computed densely and becomes one.
        closing: also reuse the chat's closing after the question (corrected by the anchors), so
            an agent prefills only the last token (KVCOMM's choice); otherwise each agent prefills
            the closing in its own context.
    """

    what = "anchor correction"
    threshold: float = Field(default=0.3, ge=0)
    max_anchors: int = Field(default=20, ge=1)
    window: int = Field(default=5, ge=1)
    min_anchors: int = Field(default=2, ge=1)
    closing: bool = True

    @property
    def label(self) -> str:
        """``anchor``, with γ when it is not the default and ``[question]`` when the closing is not reused."""
        default = type(self).model_fields["threshold"].default
        return ("anchor" + ("" if self.threshold == default else f"γ{self.threshold:g}")
                + ("" if self.closing else "[question]"))

    @model_validator(mode="after")
    def _reachable(self) -> AnchorOptions:
        if self.min_anchors > self.max_anchors:
            raise ValueError(f"min_anchors ({self.min_anchors}) above max_anchors ({self.max_anchors}) would never "
                             "reuse")
        return self


@dataclass(eq=False)
class Segment:
    """A shared text's KV in the position-0 frame: keys and values ``[L, H, T, D]`` (layers stacked)
    of the shared text (its first ``length`` columns) and of the template text after it (``tail``)."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int
    tail: tuple[int, ...]

    @classmethod
    def of(cls, kv: SenderKV, length: int, tail: tuple[int, ...]) -> Segment:
        """One row's KV (``B`` = 1, in the position-0 frame), layers stacked."""
        return cls(torch.cat(kv.keys), torch.cat(kv.values), length, tail)

    @property
    def columns(self) -> int:
        """Tokens held: the shared text's and the template's."""
        return self.keys.shape[2]

    def minus(self, base: Segment) -> tuple[torch.Tensor, torch.Tensor]:
        """This segment's keys and values less ``base``'s (the same tokens' offsets)."""
        if (self.length, self.tail) != (base.length, base.tail) or self.keys.shape != base.keys.shape:
            raise ProtocolError("an offset is taken between the same text's dense and base KV")
        return self.keys - base.keys, self.values - base.values


@dataclass(eq=False)
class Anchor:
    """A shared text computed in every agent's context: its base and, per agent (graph step), the
    offsets ``dense − base`` of its keys and values."""

    base: Segment
    offsets: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    uses: int = 0


class AnchorPool:
    """The anchors of one graph run (see the module docstring)."""

    def __init__(self, options: AnchorOptions) -> None:
        self.options = options
        self.anchors: list[Anchor] = []

    def usable(self, base: Segment) -> list[Anchor]:
        """Anchors at least as long as ``base``'s shared text, with the same template after it."""
        return [a for a in self.anchors if a.base.length >= base.length and a.base.tail == base.tail]

    def shareable(self, base: Segment, step: int) -> bool:
        """KVCOMM's test: whether ``base`` is reused at ``step`` (True) or computed densely there to
        become an anchor; judged over the usable anchors that hold offsets for ``step`` (those its
        correction would use), at least ``min_anchors`` of them. A reuse counts a use of the
        anchors it leans on."""
        usable = [a for a in self.usable(base) if step in a.offsets]
        if len(usable) < self.options.min_anchors:
            return False
        n = base.length
        distance = torch.stack([(base.values[:, :, :n] - a.base.values[:, :, :n]).double().square().sum().sqrt()
                                for a in usable])
        p = torch.softmax(-distance, dim=0)
        entropy = float(-torch.special.xlogy(p, p).sum() / math.log(2))
        if entropy > self.options.threshold * math.log2(len(usable)):
            return False
        order = torch.argsort(p, descending=True)
        mass = torch.cumsum(p[order], dim=0)
        for rank, index in enumerate(order.tolist()):
            usable[index].uses += 1
            if mass[rank] >= 0.9:
                break
        return True

    def correct(self, step: int, base: Segment) -> Segment:
        """``base`` plus the anchors' offsets for ``step``, weighted by closeness (the module
        docstring).

        Raises:
            ProtocolError: no usable anchor holds offsets for ``step`` (:meth:`shareable` said no).
        """
        usable = [a for a in self.usable(base) if step in a.offsets]
        if not usable:
            raise ProtocolError(f"no anchor holds offsets for step {step}: the text is computed in context there")
        lengths = [a.base.length for a in usable]
        keys = _corrected(base.keys, base.length, [a.base.keys for a in usable], [a.offsets[step][0] for a in usable],
                          lengths)
        values = _corrected(base.values, base.length, [a.base.values for a in usable],
                            [a.offsets[step][1] for a in usable], lengths)
        return Segment(keys, values, base.length, base.tail)

    def add(self, anchor: Anchor) -> None:
        """Keeps ``anchor``; above ``max_anchors``, drops the least used of the ``window`` oldest."""
        self.anchors.append(anchor)
        if len(self.anchors) > self.options.max_anchors:
            oldest = self.anchors[:self.options.window]
            self.anchors.remove(min(oldest, key=lambda a: a.uses))


def _corrected(base: torch.Tensor, n: int, anchors: Sequence[torch.Tensor], offsets: Sequence[torch.Tensor],
               lengths: Sequence[int]) -> torch.Tensor:
    """Keys or values (``[L, H, T, D]``) corrected by the anchors' offsets: per token on the shared
    text's ``n`` columns, per layer, head and channel on the template columns after them; layer 0
    is left as it is."""
    rest = base[1:, :, :n]
    per_token = torch.stack([(rest - anchor[1:, :, :n]).abs().mean(dim=(0, 1, 3)) for anchor in anchors])  # [A, n]
    token_weights = torch.softmax(-per_token, dim=0)[:, None, None, :, None]  # [A, 1, 1, n, 1]
    shared = rest.clone()
    for weight, offset in zip(token_weights, offsets):
        shared.addcmul_(weight, offset[1:, :, :n])
    tail = base.shape[2] - n
    if tail:
        per_channel = torch.stack([(rest - anchor[1:, :, length - n:length]).square().sum(2).sqrt()  # L2 over tokens
                                   for anchor, length in zip(anchors, lengths)])  # [A, L-1, H, D]
        channel_weights = torch.softmax(-per_channel, dim=0)[:, :, :, None, :]  # [A, L-1, H, 1, D]
        after = base[1:, :, n:].clone()
        for weight, offset, length in zip(channel_weights, offsets, lengths):
            after.addcmul_(weight, offset[1:, :, length:length + tail])
        shared = torch.cat([shared, after], dim=2)
    return torch.cat([base[:1], shared])
