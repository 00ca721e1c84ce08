"""Tiny randomly initialised models of the three attention layouts, and a byte-level tokenizer.

Nothing is downloaded: configs are built in code (like transformers' ``LlamaModelTester``), and the
tokenizer is a byte-level BPE with no merges, so any text encodes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

import kvcomm  # noqa: F401  (registers the "kvcomm" attention)
from kvcomm.models import LoadedModel

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FAMILIES = ("llama", "qwen2", "gemma3")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>", pad_token="<|pad|>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(family: str, vocab_size: int = 262, layers: int = 4, kv_heads: int = 2):
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=1024)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    # Gemma3 mixes sliding-window and global layers with two RoPE bases; a window of 6 tokens
    # makes the sliding mask matter even for short test sequences.
    types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"][:layers]
    return Gemma3TextConfig(**common, head_dim=8, sliding_window=6, layer_types=types, query_pre_attn_scalar=8)


def tiny_model(family: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(family, **kwargs)
    config._attn_implementation = "kvcomm"
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_loaded(family: str = "llama", seed: int = 0, **kwargs) -> LoadedModel:
    tok = tiny_tokenizer()
    model = tiny_model(family, seed, vocab_size=len(tok), **kwargs)
    model.generation_config.eos_token_id = tok.eos_token_id
    return LoadedModel(name=f"tiny-{family}", model=model, tokenizer=tok)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """A tiny Llama saved as a model directory (as a user's local checkpoint would be)."""
    loaded = tiny_loaded("llama")
    loaded.model.save_pretrained(tmp_path / "tiny")
    loaded.tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def shared_file(name: str) -> Path:
    """A file of the paper's data beside the checkout; CI (``KVCOMM_REQUIRE_SHARED_DATA=1``) fails
    loudly without it instead of skipping the tests that read it."""
    path = SHARED_DATA / name
    if not path.is_file():
        if os.environ.get("KVCOMM_REQUIRE_SHARED_DATA"):
            pytest.fail(f"{path} is missing, and KVCOMM_REQUIRE_SHARED_DATA is set: the paper's data must be there")
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(autouse=True, scope="session")
def codebooks_in_a_temporary_folder(tmp_path_factory):
    """Codebooks that tests build or save never land in the user's kvcomm cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("KVCOMM_CODEBOOKS", str(tmp_path_factory.mktemp("codebooks")))
    yield
    patch.undo()


def random_codebook(heads: int, dim: int, layers: int, seed: int = 0):
    """A saved codebook of random orthonormal bases (for codec tests on synthetic KV)."""
    from kvcomm.wire import Codebook, save_codebook

    g = torch.Generator().manual_seed(seed)
    basis = lambda: torch.linalg.qr(torch.randn(heads, dim, dim, generator=g))[0]  # noqa: E731
    zeros = [torch.zeros(heads, dim) for _ in range(layers)]
    book = Codebook([basis() for _ in range(layers)], [basis() for _ in range(layers)], zeros, zeros,
                    {"fingerprint": {}})
    save_codebook(book)
    return book


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """``app`` served by uvicorn on a real loopback socket (for clients that open their own connections)."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def craft(header: dict | bytes, payloads: list[bytes], version: int = 2) -> bytes:
    """A KV message with any header, whose checksums and digest are all valid (what an attacker can
    make): the digest of every byte (versions 1–5) or of the header part and each frame's length
    and CRC (6 on)."""
    import hashlib
    import json
    import struct
    import zlib

    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = b"KVCM" + struct.pack("<HI", version, len(blob)) + blob + struct.pack("<I", zlib.crc32(blob))
    digest = hashlib.blake2b(body, digest_size=16)
    for payload in payloads:
        length, crc = struct.pack("<I", len(payload)), struct.pack("<I", zlib.crc32(payload))
        body += length + payload + crc
        digest.update(length + payload + crc if version < 6 else length + crc)
    return body + b"KEND" + digest.digest()
