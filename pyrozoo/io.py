"""Files that are never half-written, and folders with one writer.

Every file pyrozoo writes goes through :func:`atomic_write`. A process that writes into a run folder first
takes the folder's lock with :func:`hold_folder` (or :class:`FolderLock`), so a second process on the same
folder stops with a PyrozooError naming the first, instead of mixing its files into the run.

The lock is ``fcntl.flock`` on a file ``.lock`` in the folder, not a lock file that exists or not: the kernel
drops a flock when its holder dies, however it dies (``kill -9`` included), so a folder is never left locked
by a process that is gone, and no stale-lock guessing (is that pid still alive? on which host?) is needed.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shlex
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Callable, Iterator

from pyrozoo.errors import PyrozooError

_UMASK = os.umask(0)
os.umask(_UMASK)

# False in a process that must leave every file to another: the ranks but 0 of a distributed run
# (pyrozoo.distributed), which compute what rank 0 computes and write nothing.
_WRITES = True


def stop_writing() -> None:
    """From now on this process writes no file (:func:`atomic_write` and :func:`atomic_write_folder` do
    nothing) and takes no folder lock (:class:`FolderLock` holds nothing): another process writes them."""
    global _WRITES
    _WRITES = False


def _write_failure(path: Path, e: BaseException) -> PyrozooError | None:
    """The one-line error for a write that the system refused (no folder, no permission, a full disk, a failing
    device), or None for any other failure (a bug keeps its traceback). torch.save reports a full disk as a
    RuntimeError from its zip writer ("unexpected pos ..."), not an OSError: that, and any error while the
    disk has no space left, is a refusal too."""
    if isinstance(e, OSError) and e.errno is not None:
        return PyrozooError(f"cannot write {path}: {e.strerror or e}")
    if not isinstance(e, Exception):
        return None  # KeyboardInterrupt, SystemExit: not a write failure
    text = " ".join(str(e).split())
    try:
        full = os.statvfs(path.parent).f_bavail == 0
    except OSError:
        full = False
    if full:
        return PyrozooError(f"cannot write {path}: no space left on device ({text}); free some space")
    if isinstance(e, RuntimeError) and any(
        w in text for w in ("unexpected pos", "write failed", "failed writing")
    ):
        return PyrozooError(f"cannot write {path}: the device refused the write ({text}); is the disk full?")
    return None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``.

    The temporary name is unique to this call (so two processes never write the same temporary file), and the
    rename is atomic: a reader, or a run killed at any moment, sees the old file or the new one, never a part.
    If ``write`` fails, the old file stays and the temporary one is removed. The system's refusals (no such
    folder, no permission, a full disk, whatever exception the writer turns them into) are a PyrozooError
    naming ``path``. (Nothing is fsynced: this guards
    against a killed process, not a power cut.)
    """
    if not _WRITES:
        return
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise PyrozooError(f"cannot write {path}: {e.strerror or e}") from e
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes owner-only files; give the usual permissions
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException as e:
        failure = _write_failure(path, e)  # before the unlink frees the space a full disk lacked
        Path(tmp).unlink(missing_ok=True)
        if failure is not None:
            raise failure from e
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def atomic_write_folder(
    path: str | os.PathLike, write: Callable[[Path], object], replaces: frozenset[str] = frozenset()
) -> None:
    """Call ``write(tmp)`` on a fresh temporary folder beside ``path``, then put it in ``path``'s place.

    A kill while writing leaves the previous folder untouched (and a temporary one that the next call ignores);
    the previous folder is removed only once the new one is complete and in place. Only a folder that is empty
    or holds nothing but names of ``replaces`` (what an earlier write of the same kind left) is replaced: a
    user's folder, a file and a link are refused (:func:`check_replaceable`) before anything is written.
    """
    if not _WRITES:
        return
    path = Path(path)
    check_replaceable(path, replaces)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as e:
        raise PyrozooError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_UMASK)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException as e:
        failure = _write_failure(path, e)
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None:
            raise failure from e
        raise


def check_replaceable(path: Path, replaces: frozenset[str]) -> None:
    """Refuse, in one line, a ``path`` that :func:`atomic_write_folder` must not put a new folder in place of:
    no name of its own (``.``), a link (never written through nor replaced), anything but a folder, or a folder
    holding anything whose name is not in ``replaces``."""
    if path.name in ("", ".", ".."):
        raise PyrozooError(f"cannot write {path}: give the folder a name of its own (e.g. {path / 'report'})")
    if path.is_symlink():
        raise PyrozooError(
            f"cannot write {path}: it is a link, and pyrozoo neither writes through a link nor replaces one; "
            "give a real folder"
        )
    if not path.exists():
        return
    if not path.is_dir():
        raise PyrozooError(f"cannot write {path}: it is a file, not a folder; give a new folder")
    foreign = sorted(entry.name for entry in path.iterdir() if entry.name not in replaces)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise PyrozooError(
            f"cannot write {path}: it holds {foreign[0]!r}{more}, which an earlier write of this kind did not "
            "leave, and the folder is replaced whole; give a new or empty folder"
        )


def save_torch(obj, path: str | os.PathLike, save: Callable | None = None) -> None:
    """``torch.save(obj, path)`` (or another ``save(obj, file)``, e.g. ``torch.export.save``) through memory.
    On a failed write (a full disk) torch's own zip writer raises, then throws again from its destructor, which
    aborts the whole process; a plain Python write of the bytes raises an OSError that :func:`atomic_write`
    reports in one line."""
    import io

    import torch

    buffer = io.BytesIO()
    (save or torch.save)(obj, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


def make_folder(path: str | os.PathLike) -> Path:
    """``mkdir -p path``; the system's refusal (a read-only or immutable parent, no permission) is one line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PyrozooError(f"cannot make the folder {path}: {e.strerror or e}") from None
    return path


def remove_leftovers(folder: Path) -> None:
    """Remove the temporary files and folders that writers killed mid-write left in ``folder`` (only safe for
    the folder's one writer, which :class:`FolderLock` makes the caller)."""
    for path in [*folder.glob(".*.tmp"), *folder.glob(".*.old")]:
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError:
            pass  # not ours to worry about: it is only a leftover


# --- one writer per folder ----------------------------------------------------------------------------------

LOCK_NAME = ".lock"
# Errors of a filesystem that has no flock (some network and FUSE mounts): nothing can be locked there.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class _Hold:
    """This process's hold on one folder: the locked file and how many FolderLocks share it."""

    def __init__(self, fd: int | None):
        self.fd, self.count = fd, 0


# Held folders by identity (device, inode), so that two spellings of one folder are one lock. A flock belongs
# to an open file, so opening the lock file a second time in this process would block on ourselves: a second
# FolderLock on a held folder shares the first one's hold instead (re-entrant).
_holds: dict[tuple[int, int], _Hold] = {}
_holds_mutex = threading.Lock()


def _forget_holds_in_child() -> None:
    """A forked child does not own its parent's locks: it closes its copies of the locked files (which leaves
    the parent's lock in place) and starts with none, so it is refused like any other process."""
    global _holds_mutex
    for hold in _holds.values():
        if hold.fd is not None:
            os.close(hold.fd)
    _holds.clear()
    _holds_mutex = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_forget_holds_in_child)


def _holder_record() -> bytes:
    command = shlex.join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])
    started = datetime.datetime.now().astimezone().isoformat(sep=" ", timespec="seconds")
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": command}
    return (json.dumps(record) + "\n").encode()


def read_holder(folder: str | os.PathLike) -> dict | None:
    """The record of the process holding ``folder`` (pid, host, started, command); None if none is there."""
    try:
        record = json.loads((Path(folder) / LOCK_NAME).read_bytes())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "pid" in record else None


def _in_use(folder: Path, instead: str | None) -> PyrozooError:
    # The holder writes its record just after taking the lock; give it a moment if we came in between.
    for _ in range(20):
        record = read_holder(folder)
        if record is not None:
            break
        time.sleep(0.025)
    if record is None:
        who = "another process"
    else:
        host = record.get("host")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        command = str(record.get("command", "?"))
        command = command if len(command) <= 200 else command[:197] + "..."
        who = f"process {record['pid']}{where} (started {record.get('started', '?')}, command: {command})"
    return PyrozooError(
        f"{folder} is in use by {who}: wait for it to finish" + (f", or {instead}" if instead else "")
    )


def _release(key: tuple[int, int], hold: _Hold) -> None:
    with _holds_mutex:
        if _holds.get(key) is not hold:  # released already, or a forked child's copy of a parent's lock
            return
        hold.count -= 1
        if hold.count > 0:
            return
        del _holds[key]
        if hold.fd is not None:
            try:
                os.ftruncate(hold.fd, 0)  # the record names no process once none holds the folder
            finally:
                os.close(hold.fd)  # which drops the lock


class FolderLock:
    """The one-writer lock on ``folder``; take it with :meth:`acquire` or ``with``, and drop it with
    :meth:`release` (or leaving the ``with`` block, on an exception too).

    Another process that holds the folder makes :meth:`acquire` raise PyrozooError naming that process
    (pid, host, when it took the lock, command). Within one process the lock is re-entrant: a second
    FolderLock on a folder this process holds (train, then evaluate in the same folder) shares the hold, and
    the folder is free again when the last of them is released. So the lock separates processes, not threads
    or objects of one process. The kernel drops the lock when the process dies, however it dies; a forked
    child does not inherit it. The folder is made if missing. On a filesystem without file locks nothing can
    be locked: a warning says so, and the folder is used unlocked.
    """

    def __init__(self, folder: str | os.PathLike, instead: str | None = None):
        self.folder = Path(folder)
        self.instead = instead  # what else the user can do when the folder is in use ("choose another --out")
        self._finalizer: weakref.finalize | None = None

    @property
    def held(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive

    def acquire(self) -> "FolderLock":
        if self.held:
            raise RuntimeError(f"this FolderLock on {self.folder} is held already")
        if not _WRITES:  # a process that writes nothing needs no lock (and must not take its writer's)
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            stat = self.folder.stat()
        except OSError as e:
            raise PyrozooError(f"cannot write to the run folder {self.folder}: {e.strerror or e}") from None
        key = (stat.st_dev, stat.st_ino)
        with _holds_mutex:
            hold = _holds.get(key) or self._lock(key)
            hold.count += 1
        # Released when the object goes, too, so a lock dropped without release() does not outlive it.
        self._finalizer = weakref.finalize(self, _release, key, hold)
        return self

    def _lock(self, key: tuple[int, int]) -> _Hold:
        fd = open_regular(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, f"the folder {self.folder}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(self.folder, self.instead) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_LOCKS:
                raise PyrozooError(f"cannot lock the folder {self.folder}: {e.strerror or e}") from None
            warnings.warn(
                f"{self.folder} is on a filesystem without file locks ({e.strerror}), so nothing stops a "
                "second process writing into it; make sure only one does",
                stacklevel=3,
            )
            fd = None
        else:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, _holder_record(), 0)
            except OSError:  # a full disk: the lock holds all the same, only without the record naming us
                pass
            remove_leftovers(self.folder)  # we are its one writer now: no one else is writing these
        _holds[key] = hold = _Hold(fd)
        return hold

    def release(self) -> None:
        """Drop this lock (the folder stays held while another FolderLock of this process holds it)."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, instead: str | None = None) -> Iterator[FolderLock]:
    """``with hold_folder(out):`` runs its block as the folder's one writer (see :class:`FolderLock`)."""
    with FolderLock(folder, instead) as lock:
        yield lock


def open_regular(path: Path, flags: int, what: str) -> int:
    """``os.open(path, flags)`` for a file written in place, never through a link: a link (to a file anywhere)
    or anything but a regular file at ``path`` is a PyrozooError naming ``what``, and nothing is written."""
    refused = PyrozooError(
        f"cannot use {what}: {path} is not a regular file (a link, a folder or a device); pyrozoo never writes "
        "through one, so remove it"
    )
    try:
        # O_NONBLOCK: a FIFO planted at path must not hang the open (it is refused just below)
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise refused from None
        raise PyrozooError(f"cannot write to {what}: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise refused
    return fd
