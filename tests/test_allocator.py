"""The allocator thresholds (kvcomm/models/allocator.py): freed memory stays in the process."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from kvcomm.errors import ConfigError
from kvcomm.models import allocator

GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")  # glibc >= 2.33

# Allocates and frees a 20 MiB block: how much of it was a new mapping (returned at once when
# freed) and how much free heap the process holds afterwards.
PROBE = """
import ctypes, json, sys
from kvcomm.models.allocator import allocator_state, keep_freed_memory, release_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
applied = keep_freed_memory()
before = libc.mallinfo2().hblkhd
block = libc.malloc(20 * 2**20)
mapped = libc.mallinfo2().hblkhd - before
libc.free(block)
kept = libc.mallinfo2().fordblks
release_freed_memory()
print(json.dumps({"applied": applied, "state": allocator_state(), "mapped": mapped, "kept": kept,
                  "released": libc.mallinfo2().fordblks}))
"""


def _probe(mode: str, **settings: str) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env |= {"KVCOMM_MALLOC": mode, **settings}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only (mallinfo2, glibc >= 2.33)")
def test_keep_serves_a_20_mib_block_from_the_heap_and_keeps_it_when_freed():
    kept = _probe("keep")
    assert kept["applied"] is True
    assert kept["mapped"] < 2**20  # not an mmap of its own
    assert kept["kept"] >= 20 * 2**20  # still the process's after free
    assert kept["state"] == "keep"
    assert kept["released"] < 20 * 2**20  # release_freed_memory hands it back


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only (mallinfo2, glibc >= 2.33)")
def test_system_leaves_glibc_as_it_is():
    system = _probe("system")
    assert system["applied"] is False
    assert system["mapped"] >= 20 * 2**20  # glibc's own first choice for a block this size
    assert system["kept"] < 20 * 2**20
    assert system["state"] == "system"


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only (mallinfo2, glibc >= 2.33)")
def test_the_users_own_glibc_thresholds_are_left_alone():
    mine = _probe("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1048576")
    assert mine["applied"] is False and mine["state"] == "user settings"


def test_an_unknown_mode_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("KVCOMM_MALLOC", "jemalloc")
    with pytest.raises(ConfigError, match="unknown KVCOMM_MALLOC 'jemalloc'; valid: keep, system"):
        allocator.keep_freed_memory()


def test_a_run_with_an_unknown_mode_claims_no_folder(monkeypatch, tmp_path, tiny_dir):
    """Found at the model's load, the mistake left an empty results/<time>-<model>/ folder behind."""
    from typer.testing import CliRunner

    from kvcomm.cli import app

    monkeypatch.setenv("KVCOMM_MALLOC", "jemalloc")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["eval", "-m", str(tiny_dir), "--method", "baseline", "--limit", "1", "-q"])
    assert result.exit_code == 2 and "unknown KVCOMM_MALLOC" in result.output and not (tmp_path / "results").exists()


def test_the_settings_are_made_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "_state", None)
    monkeypatch.setattr(allocator, "_settle", lambda mode: calls.append(mode) or "keep")
    monkeypatch.delenv("KVCOMM_MALLOC", raising=False)
    assert allocator.keep_freed_memory() and allocator.keep_freed_memory()
    assert calls == ["keep"] and allocator.allocator_state() == "keep"


def test_load_model_sets_the_allocator_before_loading(monkeypatch, tiny_dir):
    from kvcomm.models import loading

    calls = []
    monkeypatch.setattr(loading, "keep_freed_memory", lambda: calls.append(len(loading._LOADED)) or True)
    monkeypatch.setattr(loading, "_LOADED", {})
    loading.load_model(str(tiny_dir))
    assert calls == [0]  # called, and before the model was loaded
