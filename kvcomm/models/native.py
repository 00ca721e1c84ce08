"""Whether this CPU multiplies 16-bit floats natively, and a warning where it does not.

torch runs bfloat16 products fast on CPUs with AVX512-BF16 or AMX, and float16 products on CPUs
with AVX512-FP16 or AMX-FP16; elsewhere it converts to float32 element by element, and a 16-bit
model runs several times *slower* than in float32. Measured on this project's machine
(``docs/results.md``, "A host without AVX-512"): on 2026-11-24, a host with AVX512-BF16, a
layer-shaped product ran at 204-217 GFLOP/s in bfloat16 against 88-91 in float32 (one thread);
on 2026-11-26 the same VM, on a host with AVX2 only, ran it at 8.2 GFLOP/s in bfloat16 and 10.1
in float16 against 58 in float32.
"""

from __future__ import annotations

import functools
import platform
import warnings
from pathlib import Path

import torch


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere, or when unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def _judged() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and bool(_cpu_flags())


def native(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` natively (float32 and float64 always do). Only an x86
    CPU whose flags Linux lists is judged; elsewhere (ARM, macOS) the answer is yes, so that nothing
    warns where it cannot tell."""
    if dtype not in (torch.bfloat16, torch.float16):
        return True
    if not _judged():
        return True
    wanted = {"avx512_bf16", "amx_bf16"} if dtype == torch.bfloat16 else {"avx512_fp16", "amx_fp16"}
    return bool(wanted & _cpu_flags())


def describe_cpu() -> str:
    """What results record about the CPU: torch's vector capability and whether bfloat16 and float16
    are native, e.g. ``AVX2; bfloat16 emulated, float16 emulated``."""
    if not _judged():
        return f"{torch.backends.cpu.get_cpu_capability()}; 16-bit arithmetic not judged (not an x86 CPU whose flags "\
               "Linux lists)"
    halves = ", ".join(f"{name} {'native' if native(dtype) else 'emulated'}"
                       for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)))
    return f"{torch.backends.cpu.get_cpu_capability()}; {halves}"


def warn_if_emulated(dtype: torch.dtype) -> None:
    """Warns that a model in ``dtype`` will run slower than in float32 on this CPU (Python's
    warning filters say it once per place that loads one)."""
    if not native(dtype):
        name = str(dtype).removeprefix("torch.")
        warnings.warn(f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native {name} arithmetic: a "
                      f"{name} model runs several times slower here than in float32 (give float32, the default)",
                      stacklevel=3)
