"""Keeping freed memory in the process: glibc's allocator told not to hand it straight back.

A forward pass allocates and frees tensors of a few to a few tens of megabytes in every layer.
glibc serves such a request from a fresh ``mmap`` (until its adaptive threshold has grown past
that size) and returns freed memory at the top of its heap to the system, so the next layer's
tensors fault the same pages in again and the kernel zeroes them. :func:`keep_freed_memory`
sets two fixed thresholds instead: requests up to 32 MiB (glibc's largest threshold) come from
the heap, and up to 1 GiB of free heap stays in the process. Measured on SmolLM2-135M, one
thread, 199 Countries items at batch 64: 7-8% less time in float32 and in bfloat16 (``docs/results.md``,
"Per-item cost on one thread"). The cost: the process keeps up to that much freed memory for its
next allocations instead of returning it.

:func:`~kvcomm.models.loading.load_model` calls it before the first model loads. ``$KVCOMM_MALLOC``
chooses: ``keep`` (default) or ``system`` (glibc's own adaptive behaviour, untouched). On a
C library other than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os

from kvcomm.errors import ConfigError

MODES = ("keep", "system")
M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's upper bound for this parameter on 64-bit systems
TRIM_THRESHOLD = 2**30

_applied: bool | None = None  # the outcome of the first call; the settings are process-wide


def keep_freed_memory() -> bool:
    """Sets the two thresholds once per process; True where they are in force.

    False with ``KVCOMM_MALLOC=system`` or where the C library is not glibc.

    Raises:
        ConfigError: ``$KVCOMM_MALLOC`` names no mode.
    """
    global _applied
    mode = os.environ.get("KVCOMM_MALLOC") or "keep"
    if mode not in MODES:
        raise ConfigError(f"unknown KVCOMM_MALLOC {mode!r}; valid: {', '.join(MODES)}")
    if _applied is None:
        _applied = mode == "keep" and _set_thresholds()
    return _applied


def _set_thresholds() -> bool:
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # musl, macOS, Windows: their allocators have no such knobs
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Setting either one stops glibc adapting both, so both are set.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
