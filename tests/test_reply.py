"""An agent's turn as KV (groundwork for multi-agent graphs): the KV of a prompt and the reply
generated after it equals a prefill of the two together, and a receiver given it computes what it
would on the concatenated sequence."""

from __future__ import annotations

import pytest
import torch

from kvcomm.protocol import empty_input, greedy_generate, pad_left, prefill_logits, receiver_input, share
from kvcomm.protocol.reply import generate_turn
from tests.conftest import tiny_model


def prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 99, (n,), generator=g).tolist() for n in (9, 5)]


@pytest.mark.parametrize("stop_first", [False, True])
def test_a_turn_sent_as_kv_reads_as_the_concatenated_sequence(family, stop_first):
    model = tiny_model(family)
    ids, valid = pad_left(prompts(), 0)
    plain = greedy_generate(model, empty_input(model, 2), ids, valid, 6, [], 0)
    stops = [plain[0][0]] if stop_first else []  # row 0 stops at once, row 1 may run on: ragged rows
    turn = generate_turn(model, empty_input(model, 2), ids, valid, 6, stops, 0)
    assert turn.replies == greedy_generate(model, empty_input(model, 2), ids, valid, 6, stops, 0)
    question = torch.randint(0, 99, (1, 4))
    for row, (prompt, reply) in enumerate(zip(prompts(), turn.replies)):
        kv = turn.kv[row]
        assert kv.ids[0].tolist() == prompt + reply and kv.positions[0].tolist() == list(range(len(prompt + reply)))
        start = receiver_input(share(model, kv, range(model.config.num_hidden_layers)))
        received = prefill_logits(model, start, question, torch.ones_like(question, dtype=torch.bool))
        whole = torch.cat([torch.tensor([prompt + reply]), question], dim=1)
        direct = prefill_logits(model, empty_input(model, 1), whole, torch.ones_like(whole, dtype=torch.bool))
        assert (received - direct[:, -question.shape[1]:]).abs().max() < 1e-4
