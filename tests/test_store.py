"""One contract for every message store, run against memory, disk and a real redis-server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

from kvcomm.errors import ConfigError
from kvcomm.serve.stores import DiskStore, MemoryStore, RedisStore, StoreError, StoreFull, StoreLimits, open_store


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
        s = DiskStore(tmp_path / "tier", 1 << 20)
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


def test_disk_store_survives_a_restart(tmp_path):
    first = DiskStore(tmp_path, max_bytes=1 << 20)
    first.put("kept", b"123456")
    first.put("small", b"12")
    first.close()
    second = DiskStore(tmp_path, max_bytes=1 << 20)  # a restarted agent
    assert second.get("kept") == b"123456" and second.get("small") == b"12"
    assert second.list() == ["kept", "small"] and second.count() == 2


def test_disk_store_is_bounded_and_evicts_the_least_recently_used(tmp_path):
    store = DiskStore(tmp_path, max_bytes=400_000)  # room for three messages beside the index
    for i in range(6):
        store.put(f"m{i}", bytes([i]) * 100_000)
        store.get("m0")  # m0 stays recently used
        assert store.size_bytes() <= 400_000
    assert store.list() == ["m0", "m4", "m5"]
    with pytest.raises(StoreError):
        store.put("big", b"x" * 400_001)


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_messages_expire_after_their_time_to_live(kind, tmp_path):
    store = open_store("memory" if kind == "memory" else f"disk:{tmp_path}", StoreLimits(ttl_s=0.2))
    store.put("a", b"1")
    assert store.get("a") == b"1"
    time.sleep(0.4)
    assert store.get("a") is None and not store.exists("a") and store.list() == []
    assert store.count() == 0  # the disk's index still holds the row until it evicts it


def test_a_disk_store_without_diskcache_names_the_extra(tmp_path, monkeypatch):
    """Where diskcache is not installed, opening a disk store says which extra brings it (before,
    a ModuleNotFoundError from the store's own import came first)."""
    import sys

    from kvcomm.errors import ConfigError
    from kvcomm.serve.stores import disk

    monkeypatch.setitem(sys.modules, "diskcache", None)  # import diskcache raises ImportError
    disk._bytes_only_disk.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"pip install 'kvcomm\[serve\]'"):
            open_store(f"disk:{tmp_path}")
    finally:
        disk._bytes_only_disk.cache_clear()


def test_the_disk_store_never_unpickles(tmp_path):
    """A row a crafted cache file marks as pickled is refused, not loaded."""
    import diskcache

    store = DiskStore(tmp_path, max_bytes=1 << 20)
    store.close()
    raw = diskcache.Cache(str(tmp_path))  # the default disk pickles non-bytes values, and keys but text
    raw.set("evil", {"not": "bytes"})
    raw.set(("pickled", "key"), b"KVCM")
    raw.set("fine", b"KVCM")
    raw.close()
    store = DiskStore(tmp_path, max_bytes=1 << 20)
    with pytest.raises(StoreError, match="refusing to unpickle"):
        store.get("evil")
    assert store.list() == ["evil", "fine"]  # the pickled key is left out, not unpickled (before: no listing)
    assert store.count() == 2  # counted as listed (before: 3, the pickled key too)


def test_a_disk_fault_is_a_store_error_the_service_answers(tmp_path, monkeypatch):
    """A full disk is StoreFull (507); any other fault of the disk or its SQLite index is
    StoreUnavailable (503), not an unhandled error (500)."""
    import errno
    import sqlite3

    from kvcomm.serve.stores import StoreUnavailable

    store = DiskStore(tmp_path, max_bytes=1 << 20)

    def fails(err):
        def call(*args, **kwargs):
            raise err
        return call

    monkeypatch.setattr(store._cache, "set", fails(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(StoreFull, match="No space left"):
        store.put("m", b"x")
    monkeypatch.setattr(store._cache, "set", fails(sqlite3.OperationalError("database or disk is full")))
    with pytest.raises(StoreFull):
        store.put("m", b"x")
    monkeypatch.setattr(store._cache, "set", fails(PermissionError(errno.EACCES, "Permission denied",
                                                                    "/srv/fullstack/cache.db")))
    with pytest.raises(StoreUnavailable, match="Permission denied"):  # "full" in a path is no full disk
        store.put("m", b"x")
    monkeypatch.setattr(store._cache, "get", fails(sqlite3.OperationalError("database is locked")))
    with pytest.raises(StoreUnavailable, match="database is locked"):
        store.get("m")


def test_open_store_specs(tmp_path, redis_url):
    assert isinstance(open_store("memory"), MemoryStore)
    assert open_store(f"disk:{tmp_path}").directory == tmp_path  # type: ignore[attr-defined]
    assert isinstance(open_store(redis_url), RedisStore)
    with pytest.raises(ConfigError, match="unknown store"):
        open_store("ftp://x")


def test_every_redis_fault_is_store_unavailable(monkeypatch):
    """A full Redis (OOM under noeviction) or a read-only replica refuses with errors of its own:
    they are StoreUnavailable (503) like a lost connection, not an unhandled 500."""
    import redis

    from kvcomm.serve.stores import StoreUnavailable

    store = RedisStore("redis://127.0.0.1:1", connect=False)

    def full(*args, **kwargs):
        raise redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'")

    def replica(*args, **kwargs):
        raise redis.exceptions.ReadOnlyError("You can't write against a read only replica.")

    monkeypatch.setattr(store._client, "set", full)
    with pytest.raises(StoreUnavailable, match="OutOfMemoryError"):
        store.put("m", b"x")
    monkeypatch.setattr(store._client, "set", replica)
    with pytest.raises(StoreUnavailable, match="ReadOnlyError"):
        store.put("m", b"x")


def test_redis_errors_never_show_its_password():
    """A store's errors reach ``/healthz``, which is open without the token: the address they name
    has its user and password masked."""
    from kvcomm.serve.stores import StoreUnavailable
    from kvcomm.serve.stores.redis import without_password

    store = RedisStore("redis://admin:hunter2-secret@127.0.0.1:1/0", connect=False, timeout_s=0.2)
    with pytest.raises(StoreUnavailable) as caught:
        store.ping()
    assert "hunter2" not in str(caught.value) and "admin" not in str(caught.value)
    assert "redis://***@127.0.0.1:1/0" in str(caught.value)
    assert without_password("redis://:pw@[::1]:6379/2") == "redis://***@[::1]:6379/2"
    assert without_password("rediss://host/0") == "rediss://host/0"
    assert without_password("redis://h:6379/0?password=s3cret&db=1") == "redis://h:6379/0?password=***&db=1"


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_a_message_that_fits_is_kept_and_one_that_does_not_is_refused_never_stored_then_lost(kind, tmp_path):
    """The disk store's cull deleted ten messages at a time, the one just written among them
    (the write answered, the id then 404): a large message replacing small ones, or one near the
    bound in an empty store, was dropped with everything else."""
    store = MemoryStore(1_000_000) if kind == "memory" else DiskStore(tmp_path / "d", 1_000_000)
    for i in range(5):
        store.put(f"s{i}", bytes([i]) * 60_000)
    store.put("big", b"b" * 700_000)
    assert store.get("big") == b"b" * 700_000  # kept: older messages made room, one at a time
    assert "big" in store.list() and len(store.list()) >= 2 and store.size_bytes() <= 1_000_000
    if kind == "disk":  # the index takes room too: a message that fits only without it is refused
        held = store.list()
        with pytest.raises(StoreFull, match="beside its index"):
            store.put("huge", b"h" * 999_000)
        # refused before anything was evicted (before, room was made for it, every other message
        # deleted, and then it was refused too)
        assert store.get("huge") is None and store.list() == held and store.get("big") == b"b" * 700_000
        held = store.list()
        store.put("big", b"B" * 700_000)  # replacing a message under its own id takes its room: nothing evicted
        assert store.get("big") == b"B" * 700_000 and store.list() == held and store.size_bytes() <= 1_000_000
        empty = DiskStore(tmp_path / "e", 1_000_000)
        with pytest.raises(StoreFull):
            empty.put("near", b"n" * 999_000)
        assert empty.list() == []


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_sized_stores_count_the_bytes_of_the_messages_they_list(kind, tmp_path):
    """The disk store's size_bytes counted its SQLite index (32 kB when empty) and messages past
    their time to live, which count and list leave out; both stores count only what they list."""
    store = MemoryStore(1 << 20, ttl_s=0.3) if kind == "memory" else DiskStore(tmp_path / "d", 1 << 20, ttl_s=0.3)
    assert (store.count(), store.size_bytes()) == (0, 0)
    store.put("small", b"s" * 10)  # diskcache keeps this in its index
    store.put("large", b"L" * 100_000)  # and this in a file
    assert (store.count(), store.size_bytes()) == (2, 100_010)
    time.sleep(0.4)
    assert (store.list(), store.count(), store.size_bytes()) == ([], 0, 0)


def test_the_memory_store_drops_what_expired_before_evicting_a_live_message():
    store = MemoryStore(10, ttl_s=0.2)
    store.put("a", b"aaaa")
    time.sleep(0.1)
    store.put("b", b"bbbb")
    assert store.get("a") == b"aaaa"  # read before it expires: now the most recently used
    time.sleep(0.15)  # a is past its time to live, b is not
    store.put("c", b"cccc")  # before: b, the least recently used, was evicted and a kept its bytes
    assert store.get("b") == b"bbbb" and store.list() == ["b", "c"] and store.size_bytes() == 8


def test_redis_keeps_a_time_to_live_below_a_second_and_lists_only_ids(redis_url):
    import redis

    store = RedisStore(redis_url, prefix=f"test:{time.time_ns()}:", ttl_s=0.3)
    store.put("a", b"1")
    other = redis.Redis.from_url(redis_url)
    other.set(store.prefix + "not an id/x", b"2")
    other.set(store.prefix.encode() + b"\xff\xfe", b"3")
    assert store.list() == ["a"]  # what other writers put under the prefix is no message id
    time.sleep(0.5)
    assert store.get("a") is None  # before: whole seconds, so it lived a second
    with pytest.raises(ConfigError, match="not a Redis address"):
        RedisStore("redis://127.0.0.1:abc/0")
    other.close()
    store.close()


def test_a_value_of_another_type_under_an_id_is_no_message_not_an_unavailable_redis(redis_url):
    """Another program's list under the prefix answered 503 (retry later) where there is simply no message."""
    import redis

    store = RedisStore(redis_url, prefix=f"test:{time.time_ns()}:")
    other = redis.Redis.from_url(redis_url)
    other.rpush(store.prefix + "listed", b"x")
    assert store.get("listed") is None
    # nor does it exist, list or delete as one (before, DELETE /v1/messages removed the other's data)
    other.hset(store.prefix + "hashed", "field", b"y")
    assert not store.exists("listed") and not store.exists("hashed") and store.list() == []
    assert not store.delete("hashed") and other.hget(store.prefix + "hashed", "field") == b"y"
    store.put("listed", b"message")  # a SET replaces it
    assert store.get("listed") == b"message" and store.exists("listed") and store.list() == ["listed"]
    assert store.delete("listed") and not store.exists("listed")
    other.close()
    store.close()


def test_redis_before_6_lists_messages_without_scan_type(redis_url, monkeypatch):
    """SCAN … TYPE is Redis 6.0's: an older server answers a syntax error, and the store asks each key's type."""
    import redis

    store = RedisStore(redis_url, prefix=f"test:{time.time_ns()}:")
    other = redis.Redis.from_url(redis_url)
    store.put("m", b"message")
    other.hset(store.prefix + "hashed", "field", b"y")
    scan = store._client.scan_iter

    def old_scan(*args, **kwargs):
        if "_type" in kwargs:
            raise redis.ResponseError("syntax error")
        return scan(*args, **kwargs)

    monkeypatch.setattr(store._client, "scan_iter", old_scan)
    assert store.list() == ["m"]
    other.delete(store.prefix + "hashed")
    other.close()
    store.close()


def test_a_disk_index_locked_past_the_timeout_is_store_unavailable(tmp_path, monkeypatch):
    import sqlite3

    from kvcomm.serve.stores import StoreUnavailable, disk

    monkeypatch.setattr(disk, "LOCK_TIMEOUT_S", 0.2)
    store = DiskStore(tmp_path, max_bytes=1 << 20)
    store.put("m", b"x")
    holder = sqlite3.connect(str(tmp_path / "cache.db"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            store.delete("m")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.delete("m")
