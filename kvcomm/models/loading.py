"""Loading causal LMs (embedded name, local directory, GGUF file or hub id) and pairing them.

GGUF weights are dequantised by transformers on first load (slow), then saved once as
safetensors under the kvcomm cache, so later loads read plain tensors. Loads are memoised per
process: a sender and receiver naming the same checkpoint share one copy in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import jinja2
import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kvcomm.cache import cache_root
from kvcomm.errors import ConfigError, KvcommError, ModelError
from kvcomm.files import atomic_file, produce_once, staged_folder
from kvcomm.models.allocator import keep_freed_memory
from kvcomm.models.fingerprint import Fingerprint, check_fingerprint, make_fingerprint
from kvcomm.models.lean_mlp import lean_mlp
from kvcomm.models.native import warn_if_emulated
from kvcomm.models.packing import LINEARS, pack_linears, require_packing
from kvcomm.models.pins import PINS
from kvcomm.models.registry import EMBEDDED
from kvcomm.models.source import DTYPES, resolve_model
from kvcomm.protocol import ATTENTION_NAME

# End-of-turn tokens of common chat templates; generation stops at any that the vocabulary has.
_END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")

Turn = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}


@dataclass
class LoadedModel:
    """A model, its tokenizer and the facts about it that communication depends on.

    Making one hooks the model's language-model head to take contiguous inputs
    (:func:`contiguous_head`) and has its MLPs compute in place outside training
    (:func:`~kvcomm.models.lean_mlp.lean_mlp`): the values are unchanged, batched prompts get faster.
    """

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    linear: str = "dense"
    """How its linear layers compute: ``dense`` (torch's own) or ``packed`` (see ``models/packing.py``)."""

    def __post_init__(self) -> None:
        contiguous_head(self.model)
        lean_mlp(self.model)

    @property
    def config(self) -> Any:
        return self.model.config.get_text_config()

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights (and of the KV it makes)."""
        return next(self.model.parameters()).dtype

    @property
    def max_positions(self) -> int | None:
        """The most positions the model takes (``max_position_embeddings``; None where it says none)."""
        return int(getattr(self.config, "max_position_embeddings", 0) or 0) or None

    @property
    def dtype_name(self) -> str:
        """``float32``, ``bfloat16`` …: the weights' dtype as the command line names it."""
        return str(self.dtype).removeprefix("torch.")

    @cached_property
    def fingerprint(self) -> Fingerprint:
        """KV layout plus a hash of the vocabulary: what a pair and a KV message are checked against."""
        return make_fingerprint(self.config, self.tokenizer.get_vocab())

    @cached_property
    def weights_digest(self) -> str:
        """A hash of every parameter's name, shape and a sample of its values: at least 4 values
        of every row of a matrix (an embedding's too), up to 65,536 spread over the rest, each as
        bfloat16 (so a float32 and a bfloat16 copy of one checkpoint agree; a float16 copy, rounded
        twice, does not, and has a digest of its own). Two checkpoints of
        one architecture, whose fingerprints agree, differ here: what a store shared by several
        agents keys their KV by, and what ties a profile to the weights it was calibrated on.
        Before, only each parameter's first 4,096 values were hashed, and a fine-tune that changed
        only later rows kept its base's digest."""
        digest = hashlib.sha256()
        for name, parameter in self.model.named_parameters():
            values = parameter.detach()
            if values.dim() == 2:  # every row, a few of its columns
                rows, columns = values.shape
                sample = values[:, ::max(1, columns // max(4, 65536 // max(rows, 1)))]
            else:
                flat = values.reshape(-1)
                sample = flat[::max(1, -(-flat.numel() // 65536))]
            digest.update(f"{name}{tuple(parameter.shape)}".encode())
            digest.update(sample.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
        return digest.hexdigest()[:32]

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode_message(self, text: str) -> list[int]:
        """Token ids of ``text`` as one user turn with the generation prompt (see :meth:`chat_ids`)."""
        return self.chat_ids([{"role": "user", "content": text}])

    def chat_ids(self, turns: list[Turn], generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation: the harness's prompts and the service's chats alike."""
        return self._chat_pieces(turns, generation_prompt, [])[0]

    def follow_up_ids(self, text: str) -> list[int]:
        """Token ids that continue a conversation after an assistant reply with one more user turn
        ``text`` and the generation prompt: the reply's closing tokens, the user turn, the prompt.
        A reply's KV followed by these reads as a multi-turn chat (agent graphs' KV edges)."""
        reply, asked = "\x00kvcomm-reply\x00", "\x00kvcomm-user\x00"
        pieces = self._chat_pieces([{"role": "user", "content": asked}, {"role": "assistant", "content": reply},
                                    {"role": "user", "content": text}], True, [reply])
        return pieces[1]

    def encode_message_parts(self, text: str, markers: list[str]) -> list[list[int]]:
        """Like :meth:`encode_message`, but cut at each marker in ``text`` (markers removed), so
        vectors or other tokens can be spliced in between the pieces."""
        return self._chat_pieces([{"role": "user", "content": text}], True, markers)

    def passage_parts(self, text: str) -> tuple[list[int], list[int]]:
        """A stored passage's tokens: the chat opening it is prefilled behind (everything before a
        user turn's text) and ``text`` read as one line at the start of that turn (``text\\n``).
        Lines tokenise apart, so passages joined one after another read like their text joined.
        Trailing whitespace is dropped (a passage read from a file ends in a newline): the line's
        own newline would merge with it into another token (``.\\n\\n``, `` \\n``)."""
        begin, end = "\x00kvcomm-passage\x00", "\x00kvcomm-passage-end\x00"
        line = text.rstrip()
        opening, own, _ = self._chat_pieces([{"role": "user", "content": f"{begin}{line}\n{end}"}], True, [begin, end])
        return opening, own

    def turn_opening(self) -> list[int]:
        """The tokens a chat begins with before its first user turn's text (template, system prompt)."""
        return self.passage_parts("")[0]

    def chat_after_passages(self, turns: list[Turn]) -> tuple[list[int], list[int]]:
        """A chat cut where stored passages go: before the last user turn's text. Returns the
        opening (tokens before the passages) and the rest (the turn's text and what follows)."""
        users = [i for i, turn in enumerate(turns) if turn["role"] == "user"]
        if not users:
            raise ConfigError("passages are read at the start of a user turn: the chat has none")
        here = "\x00kvcomm-passages\x00"
        cut = [dict(turn) for turn in turns]
        cut[users[-1]]["content"] = here + str(cut[users[-1]]["content"])
        opening, rest = self._chat_pieces(cut, True, [here])
        return opening, rest

    def _chat_pieces(self, turns: list[Turn], generation_prompt: bool, markers: list[str]) -> list[list[int]]:
        """Renders ``turns`` with the chat template (or the plain fallback), cuts the text at
        ``markers`` and tokenises each piece; the first piece starts with BOS where the fallback needs it.

        The fallback for models without a chat template (base models) writes system text on its
        own line, each user turn as ``text\nAnswer:`` when an answer follows, and each assistant
        turn after it, so one user turn with the generation prompt is ``text\nAnswer:``.
        """
        if self.has_chat_template:
            try:
                prompt = self.tokenizer.apply_chat_template(turns, tokenize=False,
                                                            add_generation_prompt=generation_prompt)
            except jinja2.TemplateSyntaxError:  # the template itself is broken: the model's fault, not the chat's
                raise
            except jinja2.TemplateError as err:  # a template that refuses the turns (roles that do not alternate, a
                # system turn it has no place for): the caller's chat, not a fault of kvcomm (the service said 500)
                raise ConfigError(f"{self.name}'s chat template refuses these turns: {err}") from None
            start: list[int] = []
        else:
            prompt = _plain_chat(turns, generation_prompt)
            start = list(self.tokenizer("", add_special_tokens=True)["input_ids"])  # BOS, if any
        pieces = [str(prompt)]
        for marker in markers:
            if str(prompt).count(marker) > 1:  # the caller's text holds it too: the cut would go there
                raise ConfigError(f"the chat's text contains {marker!r}, which kvcomm reserves to mark where "
                                  "its pieces go: remove it")
            head, found, tail = pieces.pop().partition(marker)
            if not found:
                raise ConfigError(f"marker {marker!r} not in the message")
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
        return str(self.tokenizer.decode(ids, skip_special_tokens=True)).strip()


_LOADED: dict[tuple[str, str, str], LoadedModel] = {}


def forget_loaded(name_or_path: str, folder: Path | None = None) -> None:
    """Drops the copies :func:`load_model` keeps of ``name_or_path`` (in every dtype and linear),
    and of any path that leads to ``folder`` (the same model loaded by its path): its next load
    reads the files again (a derived model saved again under its name)."""
    def same(given: str) -> bool:
        if given == name_or_path:
            return True
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            return folder is not None and Path(given).expanduser().resolve() == folder.resolve()
        return False

    for key in [key for key in _LOADED if same(key[0])]:
        del _LOADED[key]


def load_model(name_or_path: str, dtype: str = "float32", linear: str | None = None) -> LoadedModel:
    """Loads a causal LM set up for kvcomm attention (memoised by name, dtype and linear).

    Args:
        name_or_path: an embedded name (``kvcomm models list``), a local model directory, a
            ``.gguf`` file, or a Hugging Face hub id (needs a reachable hub).
        dtype: ``float32`` (default; exact on CPU), ``bfloat16`` or ``float16`` (faster only on a
            CPU that computes them natively; elsewhere several times slower, and a warning says so:
            ``models/native.py``).
        linear: ``dense`` (torch's own products) or ``packed`` (a second copy of every float32
            linear weight of at least 2^20 values, packed by oneDNN and used for calls of at most
            128 rows: decoding steps and short prompts run faster on CPU, e.g. Qwen2.5-Coder-1.5B's
            decoding step at batch 16 2.2× and a 45-token prefill 1.25×; those layers' memory
            doubles; ``models/packing.py``). Default: ``$KVCOMM_LINEAR``, else ``dense``.

    The first call in a process also sets glibc's allocator to keep freed memory (a process-wide
    setting; ``$KVCOMM_MALLOC=system``, or the user's own glibc thresholds, leave it alone;
    ``models/allocator.py``).

    Raises:
        ModelError: the model cannot be found or loaded; the message says why.
        ConfigError: an unknown dtype, linear or ``$KVCOMM_MALLOC``, or ``packed`` without oneDNN.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if linear is None:
        linear = os.environ.get("KVCOMM_LINEAR") or "dense"
    if linear not in LINEARS:
        raise ConfigError(f"unknown linear {linear!r} (from the argument or $KVCOMM_LINEAR); "
                          f"valid: {', '.join(LINEARS)}")
    if linear == "packed":
        require_packing()  # before any weight loads
    keep_freed_memory()
    key = (name_or_path, dtype, linear)
    if key not in _LOADED:
        warn_if_emulated(getattr(torch, dtype))
        loaded = _load(name_or_path, getattr(torch, dtype))
        if linear == "packed" and pack_linears(loaded.model) == 0:  # (packing replaces the head: see below)
            # nothing to pack (another dtype, small layers): this is the dense model, not a second one
            _LOADED[key] = _LOADED.setdefault((name_or_path, dtype, "dense"), loaded)
        else:
            loaded.linear = linear
            contiguous_head(loaded.model)  # (the MLPs' in-place forward, set when loaded, calls the packed layers)
            _LOADED[key] = loaded
    return _LOADED[key]


def contiguous_head(model: PreTrainedModel) -> None:
    """Hands the language-model head a contiguous copy of its input (a forward pre-hook, added once).

    For ``logits_to_keep=k`` transformers gives the head ``hidden[:, -k:]``, which is not
    contiguous when a batch has more than one row; ``F.linear`` then takes torch's batched-matmul
    path with the weight expanded per row instead of one matrix product: 3-4x slower on
    Qwen2.5-Coder-1.5B's head in float32, and over 100x on SmolLM2-135M's in bfloat16
    (``docs/results.md``, "A slow language-model head on batched prompts"). The copy is of the
    kept rows only, ``[B, k, H]``.
    """
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Module) and _contiguous_input not in head._forward_pre_hooks.values():
        head.register_forward_pre_hook(_contiguous_input)


def _contiguous_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def model_source(name_or_path: str) -> str:
    """What ``from_pretrained`` loads for a model name: a directory of plain weights (GGUF files,
    embedded or not, are dequantised into the cache once) or a hub id.

    Raises:
        ModelError: what :func:`resolve_model` refuses, or an embedded model not installed. A GGUF
            that cannot be converted raises the reader's own error (:func:`load_pretrained`, which
            callers use, turns it into a ModelError).
    """
    found = resolve_model(name_or_path)
    if found.kind == "embedded":
        directory = cache_root() / "models" / name_or_path

        def from_parts() -> None:  # assembled only where the converted folder is not there yet
            gguf = _assemble(name_or_path)
            _convert(gguf, directory)
            if gguf.parent == cache_root() / "gguf":  # split parts assembled: the converted folder replaces it
                gguf.unlink(missing_ok=True)

        return str(_converted(from_parts, directory))
    if found.kind == "gguf":
        path = found.path
        assert path is not None
        stat = path.stat()
        tag = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        directory = cache_root() / "models" / f"{path.stem}-{tag}"
        return str(_converted(lambda: _convert(path, directory), directory))
    return str(found.path) if found.path is not None else name_or_path


def load_pretrained(name_or_path: str, dtype: torch.dtype,
                    attention: str) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The tokenizer and model a name points to (:func:`model_source`; a GGUF file is converted
    first), the model's weights in ``dtype`` with attention implementation ``attention``.

    Raises:
        ModelError: ``cannot load <name> (from <source>): <cause>`` when the files are missing,
            unreadable or not a model (a folder without a tokenizer, a file that is not GGUF or is
            cut short); and what :func:`model_source` refuses (an unknown or empty name, an
            embedded model not installed).
    """
    source = name_or_path
    try:
        source = model_source(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(source)
        loaded: Any = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attention,
                                                           output_loading_info=True)
        model, info = cast(tuple[PreTrainedModel, dict[str, Any]], loaded)
        if lacking := sorted({*info.get("missing_keys", ()), *(str(k[0]) if isinstance(k, tuple) else str(k)
                                                                for k in info.get("mismatched_keys", ()))}):
            # before: loaded anyway, those weights random (transformers only logs it, and -q hid that)
            raise ValueError(f"the weights do not fit the config: {len(lacking)} are missing or of another shape "
                             f"(e.g. {', '.join(lacking[:3])}), and would be random")
    except KvcommError:
        raise
    except (OSError, ValueError, TypeError, RuntimeError, struct.error, SafetensorError) as err:
        # struct.error: a truncated GGUF file; SafetensorError: a truncated safetensors file;
        # TypeError: a config.json that is not an object; RuntimeError: weights of another shape
        at = "" if source == name_or_path else f" (from {source})"
        read_as = (f" (no folder {str(Path(name_or_path).expanduser().resolve())!r} here, so the name was read "
                   "as a Hugging Face hub id)" if resolve_model(name_or_path).kind == "hub" else "")
        cause = (f"weights of another shape than the config's ({err})" if isinstance(err, RuntimeError) and any(
            sign in str(err) for sign in ("size mismatch", "ignore_mismatched_sizes")) else err)
        converted = Path(source).parent == cache_root() / "models" and Path(source).is_dir()
        again = (f"; the converted copy may be damaged: delete {source} and it is converted again"
                 if converted and isinstance(err, SafetensorError | struct.error) else "")  # a cut or garbled file
        raise ModelError(f"cannot load {name_or_path!r}{at}{read_as}: {cause}{again}") from err
    return tokenizer, model


def _load(name_or_path: str, dtype: torch.dtype) -> LoadedModel:
    tokenizer, model = load_pretrained(name_or_path, dtype, ATTENTION_NAME)
    model.eval()
    model.requires_grad_(False)  # loaded for inference: no forward records autograd (derive.py trains its own)
    return LoadedModel(name=name_or_path, model=model, tokenizer=tokenizer)


def _assemble(name: str) -> Path:
    """Path of an embedded model's GGUF, concatenating split parts into the cache once."""
    parts = EMBEDDED.get(name).part_paths()
    if len(parts) == 1:
        return parts[0]
    target = cache_root() / "gguf" / f"{name}.gguf"
    expected = sum(p.stat().st_size for p in parts)

    def concatenate() -> None:
        with atomic_file(target) as out:  # a crash never leaves a truncated GGUF in place
            for part in parts:
                with part.open("rb") as piece:
                    shutil.copyfileobj(piece, out, length=16 << 20)

    produce_once(target, lambda: target.is_file() and target.stat().st_size == expected, concatenate,
                 f"assembling {target.name}")
    return target


def _converted(convert: Callable[[], object], directory: Path) -> Path:
    """``directory``, made by ``convert`` (which dequantises a GGUF into it) unless it holds a
    converted model already; a second process asking meanwhile waits for the first's result
    instead of converting it again. A folder that lost its weights is converted again."""
    produce_once(directory, lambda: _complete(directory), convert, f"converting {directory.name}")
    return directory


def _complete(directory: Path) -> bool:
    """Whether a converted model folder holds its config and its weights."""
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def _convert(gguf: Path, directory: Path) -> Path:
    """Dequantises ``gguf`` into the model directory ``directory``, written atomically
    (:func:`~kvcomm.files.staged_folder`: a failed or interrupted conversion leaves nothing)."""
    print(f"kvcomm: converting {gguf.name} to {directory} (once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on GGUF-loaded models; the weights are plain tensors
    # after dequantisation, so dropping the quantizer marker makes them savable as usual.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with staged_folder(directory, replace=directory.exists()) as staging:  # replaces one that lost its weights
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    except OSError:
        if not _complete(directory):  # else another process converted it meanwhile
            raise
    return directory


def check_compatible(sender: LoadedModel, receiver: LoadedModel) -> None:
    """Raises :class:`~kvcomm.errors.FingerprintMismatch` (an :class:`IncompatibleModelsError`)
    unless the two models share one KV layout and vocabulary: the check a KV message gets too."""
    check_fingerprint(sender.fingerprint, receiver.fingerprint, source=f"sender {sender.name!r} (receiver "
                      f"{receiver.name!r})", label="sender")


def load_pair(
    sender: str, receiver: str | None = None, dtype: str = "float32", linear: str | None = None,
) -> tuple[LoadedModel, LoadedModel]:
    """Loads sender and receiver (one copy when they are the same) and checks they can communicate."""
    a = load_model(sender, dtype, linear)
    b = a if receiver in (None, sender) else load_model(receiver, dtype, linear)
    check_compatible(a, b)
    return a, b


def install(name: str) -> None:
    """Installs an embedded model's wheels with pip: the pinned versions, checked against their
    sha256 (``--require-hashes``), without their unrelated dependencies."""
    spec = EMBEDDED.get(name)
    lines = [f"{package}=={PINS[package][0]} --hash=sha256:{PINS[package][1]}" for package in spec.packages]
    with tempfile.TemporaryDirectory() as folder:
        requirements = Path(folder) / "requirements.txt"
        requirements.write_text("\n".join(lines) + "\n")
        command = [sys.executable, "-m", "pip", "install", "--no-deps", "--require-hashes", "-r", str(requirements)]
        print(f"kvcomm: installing {', '.join(f'{p}=={PINS[p][0]}' for p in spec.packages)} (hashes checked)",
              file=sys.stderr)
        if subprocess.call(command) != 0:
            raise ModelError(f"pip could not install {name!r} ({', '.join(spec.packages)})")


def _plain_chat(turns: list[Turn], generation_prompt: bool) -> str:
    """A conversation as plain text for models without a chat template (see ``_chat_pieces``)."""
    text = ""
    for index, turn in enumerate(turns):
        role, content = turn["role"], turn["content"]
        if role == "user":
            answered = index + 1 < len(turns) or generation_prompt
            text += content + ("\nAnswer:" if answered else "\n")
        elif role == "assistant":
            text += f" {content}\n"
        else:
            text += content + "\n"
    return text
