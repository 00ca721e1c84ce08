"""One atomic write: a file appears whole under its name, or not at all (a folder likewise:
:func:`staged_folder`); and one lock for work that two processes should not both do.

The data goes to a uniquely named temporary file in the target's folder (so two processes writing
the same file never share one), is flushed to disk, and then replaces the target with one
``os.replace``; the file gets the permissions the replaced file had, or a new file's (the umask
applies). Temporary names start with a dot and end in ``.tmp``: ids that kvcomm stores never
do, so a crash leaves nothing that can be mistaken for real data.

:func:`exclusive` serialises a costly one-time job (converting a model, say) between processes:
atomic writes keep two concurrent jobs correct, the lock keeps the second from redoing the first's
work. The lock is advisory (``flock``) and the kernel drops it when its holder exits, crash or not.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Self

from pydantic import BaseModel, ValidationError

from kvcomm.config import describe
from kvcomm.errors import DataError

TEMPORARY_SUFFIX = ".tmp"


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a leftover of an interrupted :func:`atomic_write`."""
    return path.name.startswith(".") and path.name.endswith(TEMPORARY_SUFFIX)


@contextlib.contextmanager
def atomic_file(path: str | Path, replace: bool = True) -> Iterator[BinaryIO]:
    """Opens a temporary file beside ``path`` for writing; on a clean exit it replaces ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was. With ``replace``
    false the file is published only where ``path`` does not exist at that moment (a hard link:
    the check and the publishing are one step), so a file that appeared while the work ran (another
    run with the same ``--out``) is kept.

    Raises:
        DataError: ``path`` is a folder, or ``replace`` is false and ``path`` exists.
    """
    target = Path(path)
    if target.is_dir():  # before, os.replace raised a bare IsADirectoryError after the work was done
        raise DataError(f"{target} is a folder; give a file name to write to")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMPORARY_SUFFIX)
    try:
        os.fchmod(fd, _mode_for(target))  # mkstemp's 0600 would outlive the rename
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        if replace:
            os.replace(name, target)
        else:
            _publish_new(name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise
    _sync_folder(target.parent)


def _publish_new(name: str, target: Path) -> None:
    """The temporary file ``name`` as ``target``, where ``target`` does not exist (else DataError)."""
    taken = DataError(f"{target} exists (written while this ran?); pass --overwrite to replace it")
    try:
        os.link(name, target)
    except FileExistsError:
        raise taken from None
    except OSError:  # a file system without hard links: checked, then replaced
        if target.exists():
            raise taken from None
        os.replace(name, target)
        return
    os.unlink(name)


@contextlib.contextmanager
def exclusive(path: str | Path, waiting: str | None = None) -> Iterator[None]:
    """Holds an exclusive lock on the file ``path`` (created if missing) for the ``with`` block;
    another process asking for it waits, after printing ``waiting`` to stderr if given.

    Not re-entrant: a thread holding the lock that asks for it again waits for itself. Where no
    lock can be had (no ``fcntl``, a file system without ``flock``, a lock file another user owns)
    the block runs unlocked, with a warning: the lock saves repeated work, the atomic writes inside
    keep the result whole either way.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None  # type: ignore[assignment]
    target, handle = Path(path), None
    if fcntl is not None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            handle = target.open("a")
        except OSError as err:
            _unlocked(target, err)
    if handle is None:
        yield
        return
    with handle:
        locked = True
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):  # held by another: wait for it
                if waiting:
                    print(waiting, file=sys.stderr)
                fcntl.flock(handle, fcntl.LOCK_EX)
            else:  # no flock on this file system
                _unlocked(target, err)
                locked = False
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


def produce_once(target: Path, done: Callable[[], bool], produce: Callable[[], object], what: str) -> None:
    """Runs ``produce`` unless ``done()``, one process at a time: under a lock beside ``target``
    (hidden), checked again once held, so a process that waited uses the result of the one it
    waited for. ``what`` names the job in the message a waiting process prints."""
    if done():
        return
    with exclusive(target.parent / f".{target.name}.lock", f"kvcomm: waiting for another process {what}"):
        if not done():
            produce()


def _unlocked(target: Path, err: OSError) -> None:
    print(f"kvcomm: cannot lock {target} ({err.strerror or err}); going on without the lock", file=sys.stderr)


@contextlib.contextmanager
def staged_folder(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yields an empty staging folder beside ``target``; on a clean exit it is renamed to ``target``.

    Args:
        replace: an existing ``target`` is moved aside first and deleted once the new folder is in
            place (a crash in between never leaves neither). Without it, an existing ``target``
            (other than an empty folder) makes the rename fail and is left as it was.

    Raises:
        OSError: the rename failed (``target`` exists and ``replace`` is false, or the file system
            refused); the staging folder is removed all the same.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_staging(target.parent, target.name)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=_staging_prefix(target), suffix=TEMPORARY_SUFFIX))
    try:
        yield staging
        _share_like_new_files(staging)
        if replace and target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=_staging_prefix(target, "old"),
                                        suffix=TEMPORARY_SUFFIX))
            target.rename(old / target.name)
            try:
                staging.rename(target)
            except OSError:
                (old / target.name).rename(target)  # put the old one back
                raise
            shutil.rmtree(old)
        else:
            staging.rename(target)  # atomic
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def sweep_staging(folder: Path, name: str | None = None) -> list[Path]:
    """Removes the staging folders in ``folder`` (of the target ``name``, or of any) that a process
    of this machine and PID namespace left when it was killed (its id no longer runs):
    :func:`staged_folder` names each after its target, its process, its machine and its kind.
    Where one was killed while replacing its target (the old folder moved aside, the new one not
    yet in place), the old folder is put back first. Folders of running processes, of other
    machines or PID namespaces (another container's), or named otherwise are left alone.
    Returns the folders removed."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in folder.iterdir():
            found = _STAGING.fullmatch(entry.name)
            if (not found or (name is not None and found["name"] != name) or found["host"] != _host()
                    or int(found["namespace"]) != _pid_namespace() or _running(int(found["pid"]))
                    or not entry.is_dir()):
                continue
            target = folder / found["name"]
            kept = entry / found["name"]
            if found["kind"] == "old" and kept.is_dir() and not target.exists():
                kept.rename(target)  # killed between moving the old one aside and putting the new one in
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


_STAGING = re.compile(rf"\.(?P<name>.+)\.pid(?P<pid>\d+)-(?P<namespace>\d+)@(?P<host>[A-Za-z0-9-]*)"
                      rf"\.(?P<kind>new|old)\.[a-z0-9_]+{re.escape(TEMPORARY_SUFFIX)}")


def _staging_prefix(target: Path, kind: str = "new") -> str:
    """A staging folder's name opens with its target's, then its process (id and PID namespace:
    an id says nothing about a process of another container), its machine, and its kind (``new``:
    what is being written; ``old``: a replaced folder moved aside)."""
    return f".{target.name}.pid{os.getpid()}-{_pid_namespace()}@{_host()}.{kind}."


def _pid_namespace() -> int:
    """This process's PID namespace (its inode; 0 where the system does not say)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64]


def _running(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one we may not signal runs too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def atomic_write(path: str | Path, data: bytes | str | Callable[[BinaryIO], object], replace: bool = True) -> Path:
    """Writes ``data`` (bytes, text as UTF-8, or a function that writes to the file) atomically
    (``replace`` false: only where ``path`` does not exist then, :func:`atomic_file`)."""
    with atomic_file(path, replace) as out:
        if callable(data):
            data(out)
        else:
            out.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def save_figure(fig: Any, path: str | Path, **options: Any) -> Path:
    """A matplotlib figure saved atomically (:func:`atomic_write`), in the format its suffix names."""
    target = Path(path)
    return atomic_write(target, lambda out: fig.savefig(out, format=target.suffix.lstrip(".") or "png", **options))


def _mode_for(target: Path) -> int:
    """The permissions the file gets: the replaced file's, else what ``open`` would give a new one
    (0666 less the process's umask)."""
    with contextlib.suppress(FileNotFoundError):
        return target.stat().st_mode & 0o7777
    return 0o666 & ~_umask()


def _share_like_new_files(folder: Path) -> None:
    """Gives ``folder`` and what it holds the permissions new ones would have (the umask's):
    ``mkdtemp`` makes it 0700, and temporary files inside may be 0600, which other users of a
    shared cache (a cluster's workers) could then not read."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    """The process's umask, read without changing it where the system says (Linux); elsewhere set
    and restored at once."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _sync_folder(folder: Path) -> None:
    """Makes the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_json(path: str | Path, what: str) -> Any:
    """The JSON value in ``path``.

    Raises:
        DataError: ``cannot read <what> <path>: …`` when it cannot be read or parsed.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {what} {path}: {err}") from err


class JsonFile(BaseModel):
    """A pydantic model kept as a JSON file: written with :func:`atomic_write`, read back validated."""

    what: ClassVar[str] = "file"  # what errors call it

    def save(self, path: str | Path, replace: bool = True) -> None:
        """Written atomically; with ``replace`` false, only where ``path`` does not exist then."""
        atomic_write(path, self.model_dump_json(indent=2) + "\n", replace)

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Raises DataError when the file cannot be read or does not validate."""
        return cls.from_json_value(read_json(path, cls.what), path)

    @classmethod
    def from_json_value(cls, raw: Any, path: str | Path) -> Self:
        """``raw`` (read from ``path``) validated; DataError naming the file if it does not."""
        try:
            return cls.model_validate(raw)
        except ValidationError as err:  # one line per problem: where it is and what it is
            raise DataError(describe(err, f"cannot read {cls.what} {path}")) from None
        except ValueError as err:
            raise DataError(f"cannot read {cls.what} {path}: {err}") from err
