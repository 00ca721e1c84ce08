"""NLD and CIPHER: two rounds of debate, in tokens or in expected-embedding vectors.

Round 1: the sender summarises its context for the other agent ("sender-aware"), and the
receiver answers its own question; both within ``round_one_tokens``. Round 2: the receiver reads
the paper's refine template with both round-1 outputs spliced in and answers within the task's
budget. NLD splices the sender's tokens; CIPHER (Pham et al.) never samples: each step's
"token" is the expected embedding under the next-token distribution at ``temperature``, and a
message stops where its nearest token (cosine) is an end token.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, ClassVar, cast

import torch
from pydantic import Field

from kvcomm.methods.base import METHODS, Method, MethodOptions, Output
from kvcomm.models.loading import LoadedModel
from kvcomm.protocol import empty_input, greedy_generate, pad_left
from kvcomm.protocol.sender import run_body

if TYPE_CHECKING:
    from kvcomm.eval.batch import Batch

SENDER_AWARE = ("Summarize the context passage in a concise way, as it will be used by another agent to answer "
                "the question.")
SELF, OTHERS = "\x00SELF\x00", "\x00OTHERS\x00"
REFINE = ("{prompt}\nYour previous answer:\n" + SELF + "\nOther agents' answers (for your consideration):\n"
          + OTHERS + "\nIf needed, revise your answer. Your new answer is:")


def embedding_matrix(model: LoadedModel) -> torch.Tensor:
    """What an id embeds to: the input embedding weights, with any scale the module applies (Gemma)."""
    module = model.model.get_input_embeddings()
    return cast(torch.Tensor, module.weight) * cast(float, getattr(module, "embed_scale", 1.0))


Spoken = tuple[torch.Tensor, list[int] | None]  # round-1 output: embeddings [n, H], and ids if tokens


class DebateOptions(MethodOptions):
    round_one_tokens: int = Field(default=256, ge=1, le=4096)  # round-1 budget in tokens (or vectors)


class CipherOptions(DebateOptions):
    temperature: float = Field(default=1.0, ge=1e-3, le=1e3)  # below ~1e-30 the softmax of logits/T was NaN


class Debate(Method):
    """The shared two-round exchange; subclasses choose what a round-1 message is made of."""

    options_model: ClassVar[type[DebateOptions]] = DebateOptions
    options: DebateOptions

    @property
    def round_one_tokens(self) -> int:
        return self.options.round_one_tokens

    @abstractmethod
    def speak(self, model: LoadedModel, messages: list[list[int]]) -> list[Spoken]:
        """Round-1 outputs, one per message."""

    @abstractmethod
    def cost(self, model: LoadedModel, spoken: Spoken) -> tuple[int, str]:
        """Bytes a round-1 message takes on the wire, and a readable description of it."""

    def run(self, batch: Batch) -> Output:
        sender, receiver = batch.agents.sender, batch.agents.receiver
        summary_prompts = [sender.encode_message(f"Instruction: {SENDER_AWARE} Context: {item.context}")
                           for item in batch.items]
        own_prompt = batch.prompt("receiver", batch.task.receiver_message)
        with batch.sender_work():
            summaries = self.speak(sender, summary_prompts)
        own = self.speak(receiver, own_prompt.ids)
        pieces = [receiver.encode_message_parts(REFINE.format(prompt=batch.task.receiver_message(item)),
                                                [SELF, OTHERS]) for item in batch.items]
        table = embedding_matrix(receiver)

        def heard(spoken: Spoken) -> torch.Tensor:  # words the receiver reads with its own embeddings
            vectors, ids = spoken
            return vectors if ids is None else table[torch.tensor(ids, dtype=torch.long)]

        rows = [torch.cat([table[p[0]], mine[0], table[p[1]], heard(theirs), table[p[2]]])
                for p, mine, theirs in zip(pieces, own, summaries)]
        embeds, valid = _pad_embeddings(rows)
        answers = greedy_generate(receiver.model, empty_input(receiver.model, len(rows)), embeds, valid,
                                  batch.task.max_new_tokens, receiver.stop_ids, receiver.pad_id)
        return Output(
            answers=[receiver.decode(ids) for ids in answers],
            receiver_ids=[p[0] + p[1] + p[2] for p in pieces],
            sender_ids=summary_prompts,
            kv_bytes=[self.cost(sender, s)[0] for s in summaries],
            messages=[self.cost(sender, s)[1] for s in summaries],
        )


def _pad_embeddings(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads ``[n_i, H]`` sequences to ``[B, N, H]`` with a validity mask ``[B, N]``."""
    width = max(r.shape[0] for r in rows)
    embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[1])
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        embeds[i, width - r.shape[0]:] = r
        valid[i, width - r.shape[0]:] = True
    return embeds, valid


@METHODS.register("nld")
class NaturalLanguageDebate(Debate):
    """The sender's summary travels as text (bytes = its UTF-8 size)."""

    name = "nld"

    def speak(self, model: LoadedModel, messages: list[list[int]]) -> list[Spoken]:
        ids, valid = pad_left(messages, model.pad_id)
        out = greedy_generate(model.model, empty_input(model.model, len(messages)), ids, valid,
                              self.round_one_tokens, model.stop_ids, model.pad_id)
        table = embedding_matrix(model)
        return [(table[torch.tensor(o, dtype=torch.long)], o) for o in out]

    def cost(self, model: LoadedModel, spoken: Spoken) -> tuple[int, str]:
        text = model.decode(spoken[1] or [])
        return len(text.encode("utf-8")), text


@METHODS.register("cipher")
class Cipher(Debate):
    """Round-1 messages are expected-embedding vectors (bytes = vectors × hidden × element size)."""

    name = "cipher"
    options_model: ClassVar[type[DebateOptions]] = CipherOptions
    options: CipherOptions

    def speak(self, model: LoadedModel, messages: list[list[int]]) -> list[Spoken]:
        return [(v, None) for v in expected_embeddings(model, messages, self.round_one_tokens,
                                                       self.options.temperature)]

    def cost(self, model: LoadedModel, spoken: Spoken) -> tuple[int, str]:
        vectors = spoken[0]
        return vectors.numel() * vectors.element_size(), f"{vectors.shape[0]} vectors of {vectors.shape[1]}"


@torch.inference_mode()
def expected_embeddings(model: LoadedModel, messages: list[list[int]], budget: int,
                        temperature: float) -> list[torch.Tensor]:
    """CIPHER generation with a KV cache: per row, up to ``budget`` vectors ``p · E``.

    A row stops before the first vector whose cosine-nearest token is a stop token, so a message
    may be empty (an end token at the first step).
    """
    table = embedding_matrix(model)  # [V, H]
    unit = torch.nn.functional.normalize(table, dim=-1)
    stops = torch.tensor(model.stop_ids)
    ids, valid = pad_left(messages, model.pad_id)
    start = empty_input(model.model, len(messages))
    logits = run_body(model.model, ids, valid, start.cache, start.layout, logits_to_keep=1).logits
    done = torch.zeros(len(messages), dtype=torch.bool)
    out: list[list[torch.Tensor]] = [[] for _ in messages]
    for step in range(budget):
        probs = torch.softmax(logits[:, -1].float() / temperature, dim=-1).to(table.dtype)
        vector = probs @ table  # [B, H]
        nearest = (torch.nn.functional.normalize(vector, dim=-1) @ unit.T).argmax(-1)
        done |= torch.isin(nearest, stops)
        for row in (~done).nonzero().flatten().tolist():
            out[row].append(vector[row])
        if bool(done.all()) or step == budget - 1:
            break
        logits = run_body(model.model, vector[:, None], ~done[:, None], start.cache, start.layout).logits
    return [torch.stack(v) if v else table.new_zeros(0, table.shape[1]) for v in out]
