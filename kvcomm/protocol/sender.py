"""The sender's side: one prefill over its chat-formatted message, keeping every layer's KV.

Also :func:`run_body`, the one forward step every stage uses (sender, receiver, decoding), masked
by an :class:`~kvcomm.protocol.layout.AttentionLayout`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from kvcomm.errors import ConfigError, ProtocolError
from kvcomm.protocol.hidden import only_layers, recording
from kvcomm.protocol.layout import AttentionLayout


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads token id lists into ``ids [B, T]`` and ``valid [B, T]`` (False on padding)."""
    if not sequences:
        raise ConfigError("nothing to pad: a batch needs at least one sequence")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            valid[row, width - len(seq):] = True
    return ids, valid


@dataclass
class SenderKV:
    """Per-layer keys and values of a batch of sender contexts (left-padded).

    Attributes:
        keys: per layer ``[B, Hkv, C, D]``, after RoPE at positions 0..|C|-1 of each row.
        values: per layer ``[B, Hkv, C, D]``.
        positions: ``[B, C]`` RoPE position of each column.
        valid: ``[B, C]`` False on padding columns.
        ids: ``[B, C]`` the token ids the KV was computed from (what recomputing tokens needs).
        hidden: ``{layer: [B, C, H]}`` hidden states entering those layers, where recorded
            (what recomputing layers needs: DroidSpeak's E-cache).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor
    valid: torch.Tensor
    ids: torch.Tensor | None = None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def context_len(self) -> torch.Tensor:
        """``[B]`` number of real context tokens per row (|C|)."""
        return self.valid.sum(dim=1)

    @property
    def first_column(self) -> torch.Tensor:
        """``[B]`` each row's first real (not padding) column: its sink token (padding may be anywhere)."""
        return self.valid.int().argmax(dim=1)

    def row(self, index: int) -> SenderKV:
        """One row with its padding removed (``B`` = 1)."""
        keep = self.valid[index]
        return SenderKV(keys=[k[index:index + 1][:, :, keep] for k in self.keys],
                        values=[v[index:index + 1][:, :, keep] for v in self.values],
                        positions=self.positions[index:index + 1, keep], valid=self.valid[index:index + 1, keep],
                        ids=None if self.ids is None else self.ids[index:index + 1, keep],
                        hidden={layer: h[index:index + 1, keep] for layer, h in self.hidden.items()})

    def rows(self, indices: Sequence[int]) -> SenderKV:
        """The rows ``indices``, in that order, their padding kept."""
        pick = torch.tensor(list(indices), dtype=torch.long)
        return SenderKV(keys=[k[pick] for k in self.keys], values=[v[pick] for v in self.values],
                        positions=self.positions[pick], valid=self.valid[pick],
                        ids=None if self.ids is None else self.ids[pick],
                        hidden={layer: h[pick] for layer, h in self.hidden.items()})

    def last(self, lengths: Sequence[int]) -> SenderKV:
        """Each row's last ``lengths[row]`` columns (its tokens after an opening), left-padded
        again: what a prompt's tail holds, its positions unchanged (see ``rebase`` to move them)."""
        width = max(lengths)
        if width > self.valid.shape[1] or len(lengths) != self.valid.shape[0]:
            raise ProtocolError(f"cannot keep {width} of {self.valid.shape[1]} columns for {len(lengths)} rows")
        columns = torch.arange(width)[None, :]
        valid = self.valid[:, -width:] & (columns >= width - torch.tensor(list(lengths))[:, None])
        return SenderKV(keys=[k[:, :, -width:] for k in self.keys], values=[v[:, :, -width:] for v in self.values],
                        positions=self.positions[:, -width:].masked_fill(~valid, 0), valid=valid,
                        ids=None if self.ids is None else self.ids[:, -width:],
                        hidden={layer: h[:, -width:] for layer, h in self.hidden.items()})

    def leading(self, lengths: Sequence[int]) -> SenderKV:
        """Each row's first ``lengths[row]`` real tokens (at least one each), left-padded again, their
        positions unchanged: the KV of a prompt's opening, where a later prompt begins alike."""
        rows = self.valid.shape[0]
        counts = torch.tensor(list(lengths), dtype=torch.long)
        if counts.shape != (rows,) or bool((counts < 1).any()) or bool((counts > self.context_len).any()):
            raise ProtocolError(f"cannot keep {list(lengths)} tokens of rows holding {self.context_len.tolist()}")
        width = int(counts.max())
        index = torch.zeros(rows, width, dtype=torch.long)  # padding columns read column 0, masked below
        valid = torch.arange(width)[None, :] >= width - counts[:, None]
        for row in range(rows):
            index[row, width - int(counts[row]):] = self.valid[row].nonzero().flatten()[: int(counts[row])]

        def taken(tensor: torch.Tensor) -> torch.Tensor:  # [B, H, C, D] -> [B, H, width, D]
            return tensor.gather(2, index[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[3]))

        return SenderKV(keys=[taken(k) for k in self.keys], values=[taken(v) for v in self.values],
                        positions=self.positions.gather(1, index).masked_fill(~valid, 0), valid=valid,
                        ids=None if self.ids is None else self.ids.gather(1, index),
                        hidden={layer: h.gather(1, index[:, :, None].expand(-1, -1, h.shape[2]))
                                for layer, h in self.hidden.items()})

    def first(self, count: int) -> SenderKV:
        """The first ``count`` columns of every row (of one row without padding: its first tokens)."""
        if count > self.valid.shape[1]:
            raise ProtocolError(f"cannot keep {count} of {self.valid.shape[1]} columns")
        return SenderKV(keys=[k[:, :, :count] for k in self.keys], values=[v[:, :, :count] for v in self.values],
                        positions=self.positions[:, :count], valid=self.valid[:, :count],
                        ids=None if self.ids is None else self.ids[:, :count],
                        hidden={layer: h[:, :count] for layer, h in self.hidden.items()})

    def token_bytes(self, layer: int) -> int:
        """Bytes of one token's key and value at ``layer``."""
        k = self.keys[layer]
        return 2 * k.shape[1] * k.shape[3] * k.element_size()


def check_model_argument(model: object) -> None:
    """The protocol's functions take the transformers model (a :class:`~kvcomm.models.loading.LoadedModel`
    holds it as ``.model``).

    Raises:
        ConfigError: naming what was given.
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_decoder"):
        hint = " (a LoadedModel: pass its .model)" if hasattr(model, "model") and hasattr(model, "fingerprint") else ""
        raise ConfigError(f"the protocol's functions take a transformers model{hint}, not {type(model).__name__}")


def check_rows(model: object, input_ids: object, valid: object, batch: int | None = None) -> None:
    """What the protocol's forwards take, checked before any: the transformers model (a
    :class:`~kvcomm.models.loading.LoadedModel` holds it as ``.model``), token ids ``[B, T]`` (or
    embeddings ``[B, T, H]``) and a boolean ``valid [B, T]`` beside them, ``batch`` rows where a
    receiver input holds that many.

    Raises:
        ConfigError: naming what is not so.
    """
    check_model_argument(model)
    if not isinstance(input_ids, torch.Tensor) or not isinstance(valid, torch.Tensor):
        raise ConfigError(f"input_ids and valid are tensors (pad_left makes both from lists of token ids), not "
                          f"{type(input_ids).__name__} and {type(valid).__name__}")
    if valid.dtype != torch.bool or valid.dim() != 2 or tuple(valid.shape) != tuple(input_ids.shape[:2]):
        raise ConfigError(f"valid is a boolean [B, T] beside input_ids {list(input_ids.shape)}, not {valid.dtype} "
                          f"{list(valid.shape)}")
    if batch is not None and input_ids.shape[0] != batch:
        raise ConfigError(f"{input_ids.shape[0]} prompt rows on a receiver input of {batch} rows")


def run_body(
    model: PreTrainedModel, tokens: torch.Tensor, valid: torch.Tensor, cache: DynamicCache,
    layout: AttentionLayout, head: bool = True, logits_to_keep: int = 0, hidden_states: bool = False,
    positions: torch.Tensor | None = None,
) -> Any:
    """One forward step of ``model`` over new own tokens, masked by ``layout``.

    Args:
        tokens: ids ``[B, T]``, or input embeddings ``[B, T, H]`` (CIPHER's vectors).
        head: run the language-model head (its output has ``logits``, the last ``logits_to_keep``
            positions or all if 0); prefill-only callers skip it.
        hidden_states: also return every layer's hidden states.
        positions: ``[B, T]`` RoPE positions of the tokens (default: after everything seen so far).
    """
    position_ids = layout.append(valid, positions)
    inputs = {"inputs_embeds": tokens} if tokens.is_floating_point() else {"input_ids": tokens}
    kwargs = dict(position_ids=position_ids, use_cache=True, kvcomm_layout=layout,
                  output_hidden_states=hidden_states, **inputs)
    if head:
        return model(logits_to_keep=logits_to_keep, **{cache_argument(type(model)): cache}, **kwargs)
    decoder = model.get_decoder()
    return decoder(**{cache_argument(type(decoder)): cache}, **kwargs)


_CACHE_ARGUMENT: dict[type[torch.nn.Module], str] = {}


def cache_argument(model_class: type[torch.nn.Module]) -> str:
    """The name a model's ``forward`` takes its KV cache under: ``cache`` from transformers 5.24
    (where ``past_key_values`` still works but warns, until its removal in 5.40), or
    ``past_key_values`` before."""
    if model_class not in _CACHE_ARGUMENT:
        parameters = inspect.signature(model_class.forward).parameters  # the deprecation wrapper keeps it
        _CACHE_ARGUMENT[model_class] = "cache" if "cache" in parameters else "past_key_values"
    return _CACHE_ARGUMENT[model_class]


@torch.inference_mode()
def prefill(model: PreTrainedModel, input_ids: torch.Tensor, valid: torch.Tensor,
            hidden: Iterable[int] = (), chunk: int | None = None, check: Callable[[], None] | None = None,
            depth: int | None = None) -> SenderKV:
    """Runs the sender once over its (left-padded) messages and returns every layer's KV, and the
    hidden states entering the ``hidden`` layers (0..L) when asked.

    Args:
        chunk: prefill at most this many tokens per forward (the same KV up to float rounding; a
            long context then gives ``check`` a chance between chunks); not with ``hidden``.
        check: called before each chunk; it raises to stop (a deadline, a client that went away).
        depth: compute layers ``0..depth-1`` only (1 ≤ depth ≤ L): the KV then holds those
            layers, bit for bit what the whole prefill computes there
            (:func:`~kvcomm.protocol.shallow.shallow_share` builds a message from it).
    """
    check_rows(model, input_ids, valid)
    if input_ids.shape[1] == 0:  # before, a SenderKV of no layers, refused later as out of range
        raise ConfigError("nothing to prefill: input_ids has no columns")
    num_layers = model.config.get_text_config().num_hidden_layers
    if depth is not None and not 1 <= depth <= num_layers:
        raise ConfigError(f"a prefill's depth is 1..{num_layers} layers, not {depth}")
    layout = AttentionLayout.empty(num_layers, input_ids.shape[0], input_ids.device)
    cache = DynamicCache()
    hidden = list(hidden)
    if depth is not None and depth < num_layers and any(layer >= depth for layer in hidden):
        raise ConfigError(f"a prefill of depth {depth} records hidden states entering layers 0..{depth - 1} only")
    width = input_ids.shape[1]
    step = max(1, width if chunk is None else chunk)
    if hidden and step < width:
        raise ConfigError("hidden states are recorded in one forward: prefill them without chunks")
    with recording(model, hidden) as states:
        for begin in range(0, width, step):
            if check is not None:
                check()
            with contextlib.nullcontext() if depth is None or depth == num_layers else only_layers(model, 0, depth):
                run_body(model, input_ids[:, begin:begin + step], valid[:, begin:begin + step], cache, layout,
                         head=False)
    keys, values = cache_tensors(cache)
    return SenderKV(keys=keys, values=values, positions=layout.own_pos, valid=layout.own_valid,
                    ids=None if input_ids.is_floating_point() else input_ids, hidden=dict(states))


def cache_tensors(cache: DynamicCache, skip: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every layer's keys and values ``[B, H, T, D]`` held by a filled cache, from layer ``skip`` on."""
    keys, values = [], []
    for index, layer in enumerate(cache.layers):
        if index < skip:
            continue
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            raise ProtocolError(f"cache layer {index} holds no keys and values (a recurrent layer?)")
        keys.append(k)
        values.append(v)
    return keys, values
