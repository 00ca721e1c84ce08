"""The samples file: every configuration's every item with its prompts as text, like lm-eval's
``--log_samples``: one JSON object per line, in the order of the results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO

from kvcomm.agents import Agents
from kvcomm.eval.results import Report
from kvcomm.files import atomic_write
from kvcomm.models.loading import LoadedModel


def prompt_text(model: LoadedModel, ids: list[int] | None) -> str | None:
    """The text of a prompt's token ids, special tokens (the chat template's) included."""
    return None if ids is None else str(model.tokenizer.decode(ids, skip_special_tokens=False))


def write_samples(report: Report, agents: Agents, path: str | Path) -> Path:
    """Writes ``path`` (JSONL): per configuration and item, its label, the sender's and the
    receiver's prompt as text and as token ids, what was sent in readable form (if any), the
    answer, the gold answers, the scores and the bytes sent."""
    task = report.config["task"]

    def write(out: BinaryIO) -> None:
        for run in report.runs:
            for item in run.items:
                line = {
                    "task": task, "label": run.label, "method": run.method, "id": item.id,
                    "sender_prompt": prompt_text(agents.sender, item.sender_ids),
                    "receiver_prompt": prompt_text(agents.receiver, item.receiver_ids),
                    "message": item.message, "answer": item.answer, "gold": item.gold, "scores": item.scores,
                    "kv_bytes": item.kv_bytes, "sender_ids": item.sender_ids, "receiver_ids": item.receiver_ids,
                }
                out.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))

    return atomic_write(path, write)
