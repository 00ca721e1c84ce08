"""Where a sender's codebook comes from: built from a task's contexts, or on first use from generated text."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from kvcomm.errors import MissingCodebook, WireError
from kvcomm.models.loading import LoadedModel
from kvcomm.protocol.sender import SenderKV, pad_left, prefill
from kvcomm.tasks.base import Item, Task
from kvcomm.tasks.loaders import load_task
from kvcomm.wire.codebook import Codebook, build_codebook, default_codebook_id, load_codebook, save_codebook

BOOTSTRAP_CONTEXTS = 32  # generated facts contexts of 20 facts each: about 7,000 tokens


def codebook_from_items(sender: LoadedModel, task: Task, items: Sequence[Item], batch_size: int = 8,
                        default: bool = False) -> Codebook:
    """A codebook from the sender's KV over ``items``' contexts, saved (as the model's default if
    ``default``) so that receivers on this machine can decode with it."""

    def batches() -> Iterator[SenderKV]:
        for start in range(0, len(items), batch_size):
            ids = [sender.encode_message(task.sender_message(item)) for item in items[start:start + batch_size]]
            yield prefill(sender.model, *pad_left(ids, sender.pad_id))

    book = build_codebook(batches(), sender.fingerprint)
    book.meta["weights"] = sender.weights_digest  # whose KV it was measured on
    save_codebook(book, default=default, weights=sender.weights_digest)
    return book


def model_codebook(sender: LoadedModel) -> Codebook:
    """The model's default codebook (the model told by its fingerprint and its weights: a variant
    does not take its base's): the one last saved as its default; or a default saved before
    defaults were told by weights (it records none), kept as this model's from now on; or else one
    built now from generated facts contexts and saved as its default."""
    if (book_id := default_codebook_id(sender.fingerprint, sender.weights_digest)) is not None:
        with contextlib.suppress(MissingCodebook, WireError):  # its file deleted or damaged: built again below
            return load_codebook(book_id)
    if (book_id := default_codebook_id(sender.fingerprint)) is not None:  # this shape's last default
        with contextlib.suppress(MissingCodebook, WireError):
            book = load_codebook(book_id)
            if book.meta.get("weights") is None:  # saved before defaults were told by weights: kept as this model's
                save_codebook(book, default=True, weights=sender.weights_digest)
                return book
    task = load_task("facts", items=BOOTSTRAP_CONTEXTS, facts_per_item=20)
    return codebook_from_items(sender, task, task.items, default=True)
