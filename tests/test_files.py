"""One atomic write: a file appears whole or not at all, and concurrent writers never interleave; one lock."""

from __future__ import annotations

import threading

import pytest

from kvcomm.files import atomic_file, atomic_write, exclusive, is_temporary


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as out:
            out.write(b"half of the new")
            raise RuntimeError("crash mid-write")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_concurrent_writers_of_one_file_never_interleave(tmp_path):
    path = tmp_path / "shared.bin"
    payloads = [bytes([i]) * 200_000 for i in range(8)]

    def write(data: bytes) -> None:
        for _ in range(5):
            atomic_write(path, data)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_bytes() in payloads  # one writer's whole payload, never a mix
    assert not [p for p in tmp_path.iterdir() if is_temporary(p)]


def test_text_and_writer_functions(tmp_path):
    assert atomic_write(tmp_path / "a" / "t.txt", "héllo").read_text(encoding="utf-8") == "héllo"
    atomic_write(tmp_path / "w.bin", lambda out: out.write(b"xyz"))
    assert (tmp_path / "w.bin").read_bytes() == b"xyz"


def test_a_written_file_has_the_permissions_open_would_give_or_keeps_the_replaced_ones(tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        fresh = atomic_write(tmp_path / "new.json", "{}")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o640  # 0666 less the umask, not mkstemp's 0600
        (tmp_path / "private.json").write_text("x")
        os.chmod(tmp_path / "private.json", 0o600)
        atomic_write(tmp_path / "private.json", "y")
        assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_exclusive_makes_a_second_holder_wait_and_says_why(tmp_path, capfd):
    import threading
    import time

    lock, order = tmp_path / "job.lock", []
    entered, release = threading.Event(), threading.Event()

    def first():
        with exclusive(lock):
            order.append("first in")
            entered.set()
            release.wait(10)
            order.append("first out")

    def second():
        with exclusive(lock, "waiting for the first"):
            order.append("second in")

    one = threading.Thread(target=first)
    one.start()
    assert entered.wait(10)
    two = threading.Thread(target=second)
    two.start()
    time.sleep(0.3)
    assert order == ["first in"]  # the second holder is still waiting
    release.set()
    one.join(10)
    two.join(10)
    assert order == ["first in", "first out", "second in"]
    assert "waiting for the first" in capfd.readouterr().err
    with exclusive(lock):  # released: taken again at once
        pass
    with pytest.raises(ValueError, match="inside") as raised, exclusive(lock):
        raise ValueError("inside")
    assert raised.value.__context__ is None  # the body's error, not chained to anything in the lock
    with exclusive(lock, "must not wait"):  # an error in the body released the lock too
        pass
    assert "must not wait" not in capfd.readouterr().err


def test_two_loaders_of_one_new_model_convert_it_once(tmp_path, monkeypatch):
    """A second process (here a thread) asking for a model being converted waits for that
    conversion instead of dequantising the GGUF again beside it."""
    import threading
    import time

    from kvcomm.models import loading

    converted = []

    def slow_convert(directory):
        converted.append(directory)
        time.sleep(0.3)
        directory.mkdir(parents=True)
        (directory / "config.json").write_text("{}")
        (directory / "model.safetensors").write_bytes(b"weights")
        return directory

    target, results = tmp_path / "models" / "m", []
    threads = [threading.Thread(target=lambda: results.append(loading._converted(lambda: slow_convert(target), target)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == [target, target] and converted == [target]


def test_exclusive_goes_on_without_a_lock_it_cannot_take(tmp_path, capfd):
    folder = tmp_path / "locks"
    folder.mkdir()
    (folder / "job.lock").mkdir()  # a folder where the lock file should be: it cannot be opened
    ran = []
    with exclusive(folder / "job.lock"):
        ran.append(True)
    assert ran == [True] and "going on without the lock" in capfd.readouterr().err


def test_run_folders_claimed_in_the_same_second_are_distinct(tmp_path, monkeypatch):
    """A caller about to write (the demo) claims its folder at once: two in the same second, or in
    threads at once, get two folders (before, both were handed the same unmade name)."""
    from kvcomm.eval import outputs

    monkeypatch.setattr(outputs, "run_stamp", lambda: "20260101-000000")
    assert outputs.new_run_folder("m", tmp_path) == outputs.new_run_folder("m", tmp_path)  # unclaimed: a name
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(outputs.new_run_folder("m", tmp_path, claim=True)))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(got)) == 8 and all(folder.is_dir() for folder in got)
    assert outputs.new_run_folder("m", tmp_path).name == "20260101-000000-m-9"  # the next free name


def _killed_staging(tmp_path, script: str) -> None:
    """Runs ``script`` in a process that enters ``staged_folder`` and is killed inside it (SIGKILL:
    no ``finally`` runs)."""
    import subprocess
    import sys
    code = ("import os, signal, sys\nfrom pathlib import Path\nfrom kvcomm.files import staged_folder\n"
            f"target = Path({str(tmp_path / 'model')!r})\n" + script)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr


def test_a_killed_processs_staging_folder_is_swept_and_a_live_ones_kept(tmp_path):
    from kvcomm.files import staged_folder
    _killed_staging(tmp_path, "with staged_folder(target) as s:\n    (s / 'weights').write_bytes(b'x' * 1000)\n"
                              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    left = [p for p in tmp_path.iterdir() if is_temporary(p)]
    assert len(left) == 1 and left[0].name.startswith(".model.pid")  # what a killed derive leaves
    with staged_folder(tmp_path / "model") as staging:
        assert left[0].exists() is False  # swept when the same target is staged again
        (staging / "weights").write_bytes(b"y")
        with staged_folder(tmp_path / "other") as mine:  # another target's live staging is not touched
            assert staging.exists() and mine.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "other"]


def test_a_process_killed_while_replacing_gets_the_old_folder_back(tmp_path):
    from kvcomm.files import sweep_staging
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights").write_bytes(b"old")
    # killed after moving the old folder aside, before the new one is renamed into place
    _killed_staging(tmp_path, "import shutil\nreal = Path.rename\n"
                              "def rename(self, to):\n    real(self, to)\n"
                              "    if '.old.' in str(to): os.kill(os.getpid(), signal.SIGKILL)\n"
                              "Path.rename = rename\n"
                              "with staged_folder(target, replace=True) as s:\n"
                              "    (s / 'weights').write_bytes(b'new')\n")
    assert not (tmp_path / "model").exists()  # neither in place: the old one is inside a hidden folder
    removed = sweep_staging(tmp_path)
    assert len(removed) == 2  # the new staging and the old one's holder
    assert (tmp_path / "model" / "weights").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_staging_folders_of_other_machines_namespaces_or_names_are_left_alone(tmp_path):
    from kvcomm.files import _host, _pid_namespace, sweep_staging
    dead = 2**22 + 12_345  # above Linux's largest pid: no process has it
    foreign = tmp_path / f".model.pid{dead}-{_pid_namespace()}@elsewhere-host.new.abc_123.tmp"
    container = tmp_path / f".model.pid{dead}-{_pid_namespace() + 1}@{_host()}.new.abc_123.tmp"  # its ids are not ours
    odd = tmp_path / ".model.pid.tmp"
    for folder in (foreign, container, odd):
        folder.mkdir()
    assert sweep_staging(tmp_path) == [] and foreign.exists() and container.exists() and odd.exists()


def test_a_target_named_like_a_kind_is_parsed_as_its_own(tmp_path):
    """A derived name may hold dots: 'qwen.old' was read as 'qwen' and an old folder."""
    from kvcomm.files import _host, _pid_namespace, sweep_staging
    dead = 2**22 + 12_345
    left = tmp_path / f".qwen.old.pid{dead}-{_pid_namespace()}@{_host()}.new.abc_123.tmp"
    left.mkdir()
    assert sweep_staging(tmp_path, "qwen") == [] and left.exists()
    assert sweep_staging(tmp_path, "qwen.old") == [left] and not left.exists()


def test_a_staged_folder_is_published_with_the_permissions_of_new_files(tmp_path):
    """``mkdtemp`` made published model folders 0700 (and files written through temporary files
    0600): other users of a shared cache could not read them."""
    import os
    import stat
    import tempfile

    from kvcomm.files import staged_folder

    mask = os.umask(0o022)
    try:
        with staged_folder(tmp_path / "model") as staging:
            (staging / "sub").mkdir()
            handle, name = tempfile.mkstemp(dir=staging / "sub")  # 0600, as a temporary file is made
            os.close(handle)
            os.rename(name, staging / "sub" / "weights")
        assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
        assert stat.S_IMODE((tmp_path / "model" / "sub").stat().st_mode) == 0o755
        assert stat.S_IMODE((tmp_path / "model" / "sub" / "weights").stat().st_mode) == 0o644
    finally:
        os.umask(mask)


def test_a_write_that_may_not_replace_keeps_a_file_that_appeared(tmp_path):
    """Two runs with one new --out both passed the existence check; the second's atomic write then
    replaced the first's file. Without replace, the check and the publishing are one step."""
    from kvcomm.errors import DataError

    target = tmp_path / "p.json"
    atomic_write(target, "first", replace=False)
    assert target.read_text() == "first"
    with pytest.raises(DataError, match="p.json exists .*pass --overwrite"):
        atomic_write(target, "second", replace=False)
    assert target.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["p.json"]
    atomic_write(target, "third")
    assert target.read_text() == "third"


def test_a_write_to_a_folder_is_refused_by_name_and_the_folder_is_left_alone(tmp_path):
    """``KVMessage.save`` (and every atomic write) to a folder raised a bare IsADirectoryError from
    the rename, after the work; it is now a DataError that says what to give."""
    from kvcomm.errors import DataError

    folder = tmp_path / "out"
    (folder / "inside").mkdir(parents=True)
    with pytest.raises(DataError, match="out is a folder; give a file name"):
        atomic_write(folder, b"bytes")
    assert [p.name for p in folder.iterdir()] == ["inside"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_empty_or_tilde_cache_variable_is_read_as_a_person_means_it(monkeypatch, tmp_path):
    """An empty KVCOMM_CACHE (an unset shell variable) put the cache in the working directory, and
    ``~/kvc`` made a folder named ``~``."""
    from kvcomm.cache import cache_root
    from kvcomm.wire.codebook import codebook_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    for empty in ("", "  "):
        monkeypatch.setenv("KVCOMM_CACHE", empty)
        monkeypatch.setenv("KVCOMM_CODEBOOKS", empty)
        assert cache_root() == tmp_path / ".cache" / "kvcomm"
        assert codebook_dir() == tmp_path / ".cache" / "kvcomm" / "codebooks"
    monkeypatch.setenv("KVCOMM_CACHE", "~/kvc")
    assert cache_root() == tmp_path / "kvc"
