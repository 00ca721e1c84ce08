"""Where a model name points: an embedded checkpoint, a derived variant, a local directory, a GGUF
file or a hub id.

Resolving a name reads no weights, so the command line can refuse a mistyped name (with the
nearest embedded name) and check layer indices against the model's depth before anything loads.
"""

from __future__ import annotations

import difflib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from kvcomm.errors import ModelError
from kvcomm.models.derived import derived_names, derived_path
from kvcomm.models.registry import EMBEDDED

DType = Literal["float32", "bfloat16", "float16"]
"""The dtypes a model loads in, by their command-line names (``LoadedModel.dtype_name``)."""
DTYPES: tuple[str, ...] = get_args(DType)


@dataclass(frozen=True)
class ModelSource:
    """A resolved model name."""

    name: str
    kind: Literal["embedded", "derived", "directory", "gguf", "hub"]
    path: Path | None = None

    @property
    def num_layers(self) -> int | None:
        """The model's depth when it is known without loading it (embedded, or a directory's config)."""
        if self.kind == "embedded":
            return EMBEDDED.get(self.name).layers
        if self.kind in ("directory", "derived") and self.path is not None:
            try:
                config = json.loads((self.path / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            config = config.get("text_config", config) if isinstance(config, dict) else {}
            layers = config.get("num_hidden_layers") if isinstance(config, dict) else None
            return layers if isinstance(layers, int) else None
        return None


def _shadows(name: str, kind: str) -> None:
    """Warns where a registered name is also a model folder here: the name wins (Python's warning
    filters say it once per place that resolves the name)."""
    if (Path(name) / "config.json").is_file():
        warnings.warn(f"{name!r} names the {kind} model; the model folder {name} here is not used (give "
                      f"./{name} for it)", stacklevel=3)


def same_model_name(first: str, second: str) -> bool:
    """Whether two names give the same model: equal, or two spellings of one local folder or GGUF
    file (``tiny`` and ``./tiny``; a relative name is read from the current folder)."""
    if first == second:
        return True
    if {first, second} & {*EMBEDDED.names(), *derived_names()}:
        return False  # a registered name wins over a folder of that name (resolve_model)
    try:
        one, other = (Path(name).expanduser() for name in (first, second))
        return one.exists() and other.exists() and one.resolve() == other.resolve()
    except (OSError, RuntimeError, ValueError):
        return False


def resolve_model(name: str) -> ModelSource:
    """The source a model name points to.

    Raises:
        ModelError: an empty name, nothing by that name (with the nearest embedded name), a
            folder without a ``config.json``, or a missing GGUF file.
    """
    if not isinstance(name, str):
        raise ModelError(f"a model is named by a string (an embedded or derived name, a folder, a .gguf file or a "
                         f"hub id), not {type(name).__name__}")
    if not name.strip():  # "" would otherwise be the current folder, read as a model directory
        raise ModelError(f"the model name is empty ({name!r}); give an embedded or derived name, a model "
                         "directory, a .gguf file or a hub id (owner/name)")
    if name in EMBEDDED:
        _shadows(name, "embedded")
        return ModelSource(name, "embedded")
    if (derived := derived_path(name)) is not None:
        _shadows(name, "derived")
        return ModelSource(name, "derived", derived)
    if name.lower().endswith(".gguf"):
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist")
        return ModelSource(name, "gguf", path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():  # before, its tokenizer's error named sentencepiece
            raise ModelError(f"{path} is a folder but not a model directory (no config.json); give a model "
                             "directory saved by transformers, an embedded or derived name, a .gguf file or a "
                             "hub id (owner/name)")
        return ModelSource(name, "directory", path)
    if "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1:
        return ModelSource(name, "hub")
    known = [*EMBEDDED.names(), *derived_names()]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ModelError(f"{name!r} is not a known model (embedded or derived: {', '.join(known)}), "
                     f"a model directory, a .gguf file or a hub id (owner/name).{hint}")
