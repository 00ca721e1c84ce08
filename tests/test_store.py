"""One contract for every message store, run against memory, disk and a real redis-server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

from kvcomm.errors import ConfigError
from kvcomm.serve.store import MemoryStore, RedisStore, StoreError, open_store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """KVCOMM_TEST_REDIS if set (CI starts a server); otherwise a redis-server started here."""
    if os.environ.get("KVCOMM_TEST_REDIS"):
        yield os.environ["KVCOMM_TEST_REDIS"]
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed (CI installs it)")
    port = _free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no",
                                "--dir", str(tmp_path_factory.mktemp("redis"))], stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(params=["memory", "disk", "redis"])
def store(request, tmp_path):
    if request.param == "memory":
        s = MemoryStore(1 << 20)
    elif request.param == "disk":
        s = MemoryStore(1 << 20, disk=tmp_path / "tier")
    else:
        s = RedisStore(request.getfixturevalue("redis_url"), prefix=f"test:{time.time_ns()}:")
    yield s
    s.close()


def test_contract(store):
    assert store.get("a") is None and not store.exists("a")
    store.put("a", b"one")
    store.put("b", b"two")
    store.put("a", b"ONE")  # overwrite
    assert store.get("a") == b"ONE" and store.exists("b") and store.list() == ["a", "b"]
    assert store.delete("a") and not store.delete("a") and store.list() == ["b"]
    for bad in ("../etc", "", "a b", ".hidden", "x" * 200, "abc\n", "torn.partial", "x.tmp"):
        with pytest.raises(StoreError):
            store.put(bad, b"x")


def test_memory_store_evicts_least_recently_used_by_bytes():
    store = MemoryStore(max_bytes=10)
    store.put("a", b"1234")
    store.put("b", b"1234")
    store.get("a")  # a is now more recent than b
    store.put("c", b"1234")
    assert store.list() == ["a", "c"]
    with pytest.raises(StoreError):
        store.put("big", b"x" * 11)


def test_disk_tier_survives_a_restart_and_ignores_partial_writes(tmp_path):
    first = MemoryStore(max_bytes=4, disk=tmp_path)
    first.put("kept", b"123456")  # larger than memory: disk only
    first.put("small", b"12")
    (tmp_path / ".torn.x1y2.tmp").write_bytes(b"half")  # what a write interrupted by a crash leaves
    second = MemoryStore(max_bytes=4, disk=tmp_path)  # a restarted agent
    assert second.get("kept") == b"123456" and second.get("small") == b"12"
    assert second.list() == ["kept", "small"] and not (tmp_path / ".torn.x1y2.tmp").exists()


def test_open_store_specs(tmp_path, redis_url):
    assert isinstance(open_store("memory"), MemoryStore)
    assert open_store(f"disk:{tmp_path}").disk == tmp_path
    assert isinstance(open_store(redis_url), RedisStore)
    with pytest.raises(ConfigError, match="unknown store"):
        open_store("ftp://x")
