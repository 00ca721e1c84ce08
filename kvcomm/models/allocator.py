"""Keeping freed memory in the process: glibc's allocator told not to hand it straight back.

A forward pass allocates and frees tensors of a few to a few tens of megabytes in every layer.
glibc serves a request at or above its adaptive mmap threshold (128 KiB at first, growing to the
largest block freed so far, at most 32 MiB) from a fresh ``mmap``, and trims the free top of its
heap back to the system, so the next layer's tensors fault the same pages in again and the
kernel zeroes them. :func:`keep_freed_memory` fixes two thresholds instead: requests below 32 MiB
(glibc's largest mmap threshold) come from the heap, and the heap's free top is trimmed only
beyond 1 GiB. Measured on SmolLM2-135M, one thread, 199 Countries items at batch 64: 4-7% less
time in bfloat16, and 9% in float32 in two rounds of three (``docs/results.md``, "The decoding
step's attention in bfloat16, and the allocator"). The cost: freed memory stays with the process
for its next allocations, so its resident size stays nearer its peak (the peak itself did not
change; :func:`release_freed_memory` hands the rest back on demand).

:func:`~kvcomm.models.loading.load_model` calls :func:`keep_freed_memory` before the first model
loads. ``$KVCOMM_MALLOC`` chooses: ``keep`` (default) or ``system`` (glibc's own behaviour).
Thresholds the user set for glibc (``GLIBC_TUNABLES`` naming them, ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``) are left as they are, and so is any C library other than glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

from kvcomm.errors import ConfigError

MODES = ("keep", "system")
M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's upper bound for this parameter on 64-bit systems
TRIM_THRESHOLD = 2**30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_state: str | None = None  # what the first call did; the settings are process-wide


def keep_freed_memory() -> bool:
    """Sets the two thresholds once per process; True where they are in force.

    False with ``KVCOMM_MALLOC=system``, where the user set glibc's thresholds, and where the C
    library is not glibc (:func:`allocator_state` says which).

    Raises:
        ConfigError: ``$KVCOMM_MALLOC`` names no mode.
    """
    global _state
    mode = malloc_mode()
    if _state is None:
        _state = _settle(mode)
    return _state == "keep"


def malloc_mode() -> str:
    """``$KVCOMM_MALLOC`` (``keep`` where unset or empty); commands check it before a run folder is
    made or a model loads.

    Raises:
        ConfigError: it names no mode.
    """
    mode = os.environ.get("KVCOMM_MALLOC") or "keep"
    if mode not in MODES:
        raise ConfigError(f"unknown KVCOMM_MALLOC {mode!r}; valid: {', '.join(MODES)}")
    return mode


def allocator_state() -> str:
    """What :func:`keep_freed_memory` did in this process, for reports: ``keep``, ``system``,
    ``user settings``, ``not glibc``, ``refused by glibc``, or ``not set`` (no model loaded yet)."""
    return _state or "not set"


def release_freed_memory() -> None:
    """Hands the free memory glibc holds back to the system (``malloc_trim(0)``), e.g. before the
    process's resident size is measured against a budget. Nothing happens off glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.malloc_trim(0)


def _settle(mode: str) -> str:
    if mode == "system":
        return "system"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(os.environ.get(name) for name in USER_SETTINGS) or "mmap_threshold" in tunables \
            or "trim_threshold" in tunables:
        return "user settings"
    libc = _glibc()
    if libc is None:
        return "not glibc"
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Setting either threshold stops glibc adapting both, so both are set. glibc refuses a value
    # beyond its limits (a 32-bit build's mmap threshold): then only speed differs, and reports say so.
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return "refused by glibc"
    return "keep"


def _glibc() -> ctypes.CDLL | None:
    """This process's C library where it is glibc (Linux only; musl and other systems: None)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") else None
