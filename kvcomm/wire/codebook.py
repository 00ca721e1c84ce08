"""Codebooks: per-model bases that decorrelate each head's KV channels before quantisation.

One head's keys (or values) are strongly correlated across channels: on Qwen2.5-Coder-1.5B a
128-channel head has an effective rank of 10-20, and rotating into its principal axes (the
Karhunen-Loeve transform) leaves components whose variances differ by orders of magnitude, so a
uniform step spends bits only where the energy is. The basis (``D x D`` per head, layer, keys and
values) is too large to send with every message, so, like a zstd dictionary, it is built once per
model from calibration text, stored under its content hash, and named by that hash in each
message: the receiver must hold the same file (``kvcomm codebook`` builds one and prints its path).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from kvcomm.cache import cache_root, folder_from_env
from kvcomm.errors import DataError, MissingCodebook, WireError
from kvcomm.files import atomic_write
from kvcomm.protocol.sender import SenderKV

FORMAT = "kvcomm-codebook-1"
_LOADED: dict[str, Codebook] = {}


@dataclass
class Codebook:
    """Per layer, orthonormal bases ``[H, D, D]`` (columns = components, largest variance first)
    and the means ``[H, D]`` they were measured around.

    Attributes:
        keys, values: the bases for keys and for values.
        key_means, value_means: the calibration means (mostly the projections' biases), which
            codecs subtract so that messages need not carry their own.
        meta: what it was built from (model fingerprint, token count), for people and results.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_means: list[torch.Tensor]
    value_means: list[torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def _tensors(self) -> dict[str, torch.Tensor]:
        parts = {"k": self.keys, "v": self.values, "km": self.key_means, "vm": self.value_means}
        return {f"{kind}.{i}": t.float().contiguous().clone() for kind, ts in parts.items() for i, t in enumerate(ts)}

    @cached_property
    def id(self) -> str:
        """Content hash of the bases and means (16 hex digits): equal ids decode alike."""
        digest = hashlib.sha256()
        for name, tensor in self._tensors().items():
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()[:16]

    def to_bytes(self) -> bytes:
        return save_tensors(self._tensors(), {"format": FORMAT, "meta": json.dumps(self.meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> Codebook:
        """Raises:
            WireError: not a codebook file.
        """
        try:
            tensors = load_tensors(data)
        except (SafetensorError, ValueError) as err:
            raise WireError(f"not a codebook file: {err}") from None
        layers = len(tensors) // 4
        try:
            keys, values, key_means, value_means = (
                [tensors[f"{kind}.{i}"] for i in range(layers)] for kind in ("k", "v", "km", "vm"))
        except KeyError as err:
            raise WireError(f"codebook lacks tensor {err}") from None
        return cls(list(keys), list(values), list(key_means), list(value_means), meta=_metadata(data))


def _metadata(data: bytes) -> dict[str, Any]:
    try:
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        meta = header.get("__metadata__", {})
        if meta.get("format") != FORMAT:
            raise WireError("not a kvcomm codebook (format tag missing)")
        notes = json.loads(meta.get("meta", "{}"))
    except (ValueError, AttributeError, RecursionError) as err:
        raise WireError(f"not a kvcomm codebook: {err}") from None
    if not isinstance(notes, dict):
        raise WireError("a codebook's notes must be a JSON object")
    return notes


def build_codebook(kvs: Iterable[SenderKV], fingerprint: dict[str, Any]) -> Codebook:
    """Principal axes of every head's keys and values over the real tokens of ``kvs`` (batches).

    Each row's first token is left out: it is the attention sink, an outlier that codecs send
    verbatim anyway.
    """
    moments: dict[tuple[str, int], list[torch.Tensor]] = {}  # (kind, layer) -> [count, sum, sum of outer products]
    for kv in kvs:
        tokens = kv.valid & (kv.valid.cumsum(dim=1) > 1)
        for kind, tensors in (("k", kv.keys), ("v", kv.values)):
            for layer, tensor in enumerate(tensors):
                x = tensor.transpose(1, 2)[tokens].double()  # [N, H, D]
                update = [torch.tensor(float(x.shape[0])), x.sum(0), torch.einsum("nhd,nhe->hde", x, x)]
                moments[kind, layer] = [a + b for a, b in zip(moments[kind, layer], update)] \
                    if (kind, layer) in moments else update
    if not moments or float(moments["k", 0][0]) < 2:
        raise DataError("a codebook needs at least two context tokens besides the first")

    def mean(kind: str, layer: int) -> torch.Tensor:
        count, total, _ = moments[kind, layer]
        return total / count

    def bases(kind: str, layer: int) -> torch.Tensor:
        count, _, outer = moments[kind, layer]
        centre = mean(kind, layer)
        covariance = outer / count - centre[:, :, None] * centre[:, None, :]
        return torch.linalg.eigh(covariance)[1].flip(-1).float()  # eigh sorts ascending

    layers = range(len({layer for _, layer in moments}))
    return Codebook([bases("k", i) for i in layers], [bases("v", i) for i in layers],
                    [mean("k", i).float() for i in layers], [mean("v", i).float() for i in layers],
                    {"fingerprint": fingerprint, "tokens": int(moments["k", 0][0])})


def codebook_dir() -> Path:
    """Where codebooks live: ``KVCOMM_CODEBOOKS``, or ``codebooks/`` under the kvcomm cache."""
    return folder_from_env("KVCOMM_CODEBOOKS", cache_root() / "codebooks")


def save_codebook(book: Codebook, default: bool = False, weights: str | None = None) -> Path:
    """Stores ``book`` as ``<id>.safetensors``; with ``default``, also as its model's default (the
    model told by its fingerprint and, given, its weights digest: fine-tunes of one base share a
    fingerprint, not their KV's statistics)."""
    directory = codebook_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{book.id}.safetensors"
    if not _intact(path, book.id):  # absent, or damaged since (before, a damaged file stayed for good)
        atomic_write(path, book.to_bytes())
    _LOADED[book.id] = book
    if default:
        atomic_write(_default_file(book.meta["fingerprint"], weights), book.id + "\n")
        if weights is not None:  # the fingerprint's last default too (``default_codebook_id`` without weights)
            atomic_write(_default_file(book.meta["fingerprint"]), book.id + "\n")
    return path


def _intact(path: Path, book_id: str) -> bool:
    """Whether ``path`` holds the codebook ``book_id`` (it reads as one, and hashes to its id)."""
    try:
        return path.is_file() and Codebook.from_bytes(path.read_bytes()).id == book_id
    except (OSError, WireError):
        return False


def load_codebook(book_id: str) -> Codebook:
    """The codebook with this id, from memory or :func:`codebook_dir`.

    Raises:
        MissingCodebook: no such file here; it must be copied from the sender's machine.
        WireError: the file is damaged (its content no longer hashes to its name).
    """
    if book_id in _LOADED:
        return _LOADED[book_id]
    path = codebook_dir() / f"{book_id}.safetensors"
    if not path.is_file():
        raise MissingCodebook(f"codebook {book_id} is not in {codebook_dir()}: copy {book_id}.safetensors from "
                              f"the sender's machine (kvcomm codebook prints where it is)")
    book = Codebook.from_bytes(path.read_bytes())
    if book.id != book_id:
        raise WireError(f"codebook file {path} is damaged: its content hashes to {book.id}")
    _LOADED[book_id] = book
    return book


def carried(book_id: str) -> bytes | None:
    """The bytes of codebook ``book_id`` for a codec pickled to another machine (a cluster's
    worker has no codebook of its own), or None where this machine has none to send either."""
    try:
        return load_codebook(book_id).to_bytes()
    except MissingCodebook:
        return None


def arrived(data: bytes, book_id: str) -> None:
    """A carried codebook, saved here (:func:`save_codebook`) for codecs naming ``book_id``.

    Raises:
        WireError: the bytes are no codebook, or their content does not hash to ``book_id``.
    """
    if book_id in _LOADED:
        return
    book = Codebook.from_bytes(data)
    if book.id != book_id:
        raise WireError(f"a carried codebook hashes to {book.id}, not the {book_id} its codec names")
    save_codebook(book)


def default_codebook_id(fingerprint: dict[str, Any], weights: str | None = None) -> str | None:
    """The id of the codebook last saved as default for this model (its fingerprint and, given,
    its weights digest), if any."""
    path = _default_file(fingerprint, weights)
    return path.read_text().strip() if path.is_file() else None


def _default_file(fingerprint: dict[str, Any], weights: str | None = None) -> Path:
    told = json.dumps(fingerprint, sort_keys=True) + ("" if weights is None else f"/{weights}")
    key = hashlib.sha256(told.encode()).hexdigest()[:16]
    directory = codebook_dir() / "defaults"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / key
