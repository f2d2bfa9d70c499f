"""Tests for pyrozoo.io: atomic writes, and the one-writer lock on a folder, with real second processes."""

from __future__ import annotations

import errno
import multiprocessing
import os
import re
import signal
import time
from pathlib import Path

import pytest

from pyrozoo import io
from pyrozoo.errors import PyrozooError
from pyrozoo.io import FolderLock, atomic_write, hold_folder

# Forked processes start at once (a spawned one would import torch and Pyro again, seconds each) and are as
# separate as any: their own pid, their own open files, their own flocks.
FORK = multiprocessing.get_context("fork")


# --- helpers that run in a second process -------------------------------------------------------------------


def _hold(folder: Path, conn, then: str) -> None:
    """Take the folder's lock, say so, then: wait to be told to release it, or hang until killed."""
    lock = FolderLock(folder).acquire()
    conn.send("held")
    if then == "hang":
        time.sleep(600)
    conn.recv()
    lock.release()
    conn.send("released")
    conn.recv()


def _try_lock(folder: Path, conn) -> None:
    try:
        with hold_folder(folder):
            conn.send("ok")
    except PyrozooError as e:
        conn.send(str(e))


def try_in_another_process(folder: Path) -> str:
    """ "ok" if another process can take the folder's lock now, else its error message."""
    ours, theirs = FORK.Pipe()
    child = FORK.Process(target=_try_lock, args=(folder, theirs))
    child.start()
    assert ours.poll(30), "the second process did not answer"
    answer = ours.recv()
    child.join(30)
    return answer


class Holder:
    """A second process holding ``folder``: ``release()`` asks it to let go, ``kill()`` sends SIGKILL."""

    def __init__(self, folder: Path, then: str = "wait"):
        self.conn, theirs = FORK.Pipe()
        self.process = FORK.Process(target=_hold, args=(folder, theirs, then), daemon=True)
        self.process.start()
        assert self.conn.poll(30) and self.conn.recv() == "held"
        self.pid = self.process.pid

    def release(self) -> None:
        self.conn.send("release")
        assert self.conn.poll(30) and self.conn.recv() == "released"

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.process.join(30)
        assert self.process.exitcode == -signal.SIGKILL

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(30)


@pytest.fixture
def holders():
    started = []
    yield lambda folder, then="wait": started.append(Holder(folder, then)) or started[-1]
    for holder in started:
        holder.stop()


# --- the folder lock ----------------------------------------------------------------------------------------


def test_second_process_is_refused_naming_the_first(tmp_path, holders):
    folder = tmp_path / "run"
    holder = holders(folder)
    with pytest.raises(PyrozooError) as info:
        FolderLock(folder, instead="choose another --out").acquire()
    message = str(info.value)
    assert message.startswith(f"{folder} is in use by process {holder.pid} (started ")
    assert "command: " in message and "choose another --out" in message and "\n" not in message
    # a reader of the folder (prune, export) has no --out to choose: the message offers only the wait
    with pytest.raises(PyrozooError) as info:
        FolderLock(folder).acquire()
    assert str(info.value).endswith("wait for it to finish")
    assert io.read_holder(folder)["pid"] == holder.pid
    # Another process, not only this one, is refused the same way.
    assert f"in use by process {holder.pid}" in try_in_another_process(folder)
    holder.release()
    assert io.read_holder(folder) is None  # a released lock names no process
    with hold_folder(folder):
        assert io.read_holder(folder)["pid"] == os.getpid()


def test_sigkill_leaves_the_folder_free_at_once(tmp_path, holders):
    folder = tmp_path / "run"
    holder = holders(folder, then="hang")
    assert f"in use by process {holder.pid}" in try_in_another_process(folder)
    holder.kill()
    # No waiting and no stale-lock clean-up: the kernel dropped the dead process's lock.
    with hold_folder(folder) as lock:
        assert lock.held and io.read_holder(folder)["pid"] == os.getpid()
    assert try_in_another_process(folder) == "ok"


def test_released_on_exception(tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(ValueError):
        with hold_folder(folder):
            assert try_in_another_process(folder).startswith(f"{folder} is in use by process {os.getpid()}")
            raise ValueError("boom")
    assert try_in_another_process(folder) == "ok"


def test_released_when_dropped_without_release(tmp_path):
    folder = tmp_path / "run"
    lock = FolderLock(folder).acquire()
    assert "in use" in try_in_another_process(folder)
    del lock  # a lock nobody can release any more is released
    assert try_in_another_process(folder) == "ok"


def test_reentrant_within_one_process(tmp_path):
    folder = tmp_path / "run"
    (tmp_path / "link").symlink_to(folder.name)  # folder does not exist yet: made by the first lock
    with hold_folder(folder) as outer:
        # Train, then evaluate: the same process opens the folder again, under another name even.
        with hold_folder(tmp_path / "link") as inner:
            assert inner.held and outer.held
        assert not inner.held
        assert "in use" in try_in_another_process(folder)  # still held by the outer lock
        inner.release()  # releasing twice is harmless, and does not release the outer hold
        assert "in use" in try_in_another_process(folder)
    assert try_in_another_process(folder) == "ok"
    lock = FolderLock(folder).acquire()
    with pytest.raises(RuntimeError, match="held already"):
        lock.acquire()
    lock.release()


def test_a_forked_child_does_not_inherit_the_lock(tmp_path):
    folder = tmp_path / "run"
    with hold_folder(folder):
        # The child is refused and names us; its exit (closing its copy of the file) leaves our lock in place.
        assert f"in use by process {os.getpid()}" in try_in_another_process(folder)
        assert f"in use by process {os.getpid()}" in try_in_another_process(folder)


def test_two_folders_are_independent(tmp_path, holders):
    holders(tmp_path / "a")
    with hold_folder(tmp_path / "b"):
        assert "in use" in try_in_another_process(tmp_path / "a")
        assert "in use" in try_in_another_process(tmp_path / "b")
        assert try_in_another_process(tmp_path / "c") == "ok"


def test_a_folder_that_cannot_be_made_is_one_error(tmp_path):
    (tmp_path / "file").write_text("")
    folder = tmp_path / "file" / "run"
    message = f"^cannot write to the run folder {re.escape(str(folder))}: Not a directory$"
    with pytest.raises(PyrozooError, match=message):
        FolderLock(folder).acquire()


def test_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(io.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="without file locks .* make sure only one does"):
        with hold_folder(tmp_path / "run") as lock:
            assert lock.held
    assert not lock.held


# --- atomic_write -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, error):
    path = tmp_path / "metrics.csv"
    path.write_text("old")

    def write(tmp: Path) -> None:
        assert tmp.parent == tmp_path and tmp != path
        tmp.write_text("half of the ne")
        raise error("killed mid-write")

    with pytest.raises(error):
        atomic_write(path, write)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_refusals_of_the_system_are_one_error_naming_the_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_text("old")

    def disk_full(tmp: Path) -> None:
        tmp.write_text("part")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(PyrozooError, match=f"^cannot write {re.escape(str(path))}: No space left on device$"):
        atomic_write(path, disk_full)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    missing = tmp_path / "no-such-folder" / "config.json"
    with pytest.raises(PyrozooError, match=f"^cannot write {re.escape(str(missing))}: No such file"):
        atomic_write(missing, lambda tmp: tmp.write_text("new"))


def test_write_replaces_with_usual_permissions(tmp_path):
    path = tmp_path / "config.json"
    atomic_write(path, lambda tmp: tmp.write_text("new"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


SIZE, CHUNKS, WRITES = 1 << 18, 8, 40


def _write_many(path: Path, letter: bytes, start) -> None:
    start.wait()
    for _ in range(WRITES):

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                for _ in range(CHUNKS):  # in pieces, so that two writers of one file would interleave
                    f.write(letter * (SIZE // CHUNKS))
                    f.flush()

        atomic_write(path, write)


def test_two_processes_writing_one_file_never_mix(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"0" * SIZE)
    start = FORK.Event()
    writers = [FORK.Process(target=_write_many, args=(path, letter, start)) for letter in (b"a", b"b")]
    for writer in writers:
        writer.start()
    start.set()
    seen = set()
    while any(w.is_alive() for w in writers):
        content = path.read_bytes()
        assert len(content) == SIZE and content == content[:1] * SIZE, "a reader saw a mixed or partial file"
        seen.add(content[:1])
    for writer in writers:
        writer.join(30)
        assert writer.exitcode == 0
    content = path.read_bytes()
    assert content in (b"a" * SIZE, b"b" * SIZE)
    assert seen - {b"0"} <= {b"a", b"b"}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind


# --- atomic_write_folder ------------------------------------------------------------------------------------


def _write_report(tmp: Path) -> None:
    (tmp / "report.json").write_text("{}")


def test_a_folder_is_replaced_only_where_an_earlier_write_of_its_kind_left_it(tmp_path):
    """A new, an empty, or an earlier write's folder is replaced whole; one holding anything else (a user's
    run beside it, a note added), a file, a link (not followed, not replaced) and ``.`` are refused in one line,
    and nothing of theirs is touched."""
    from pyrozoo.io import atomic_write_folder

    kinds = frozenset({"report.json"})
    out = tmp_path / "out"
    atomic_write_folder(out, _write_report, kinds)  # new
    atomic_write_folder(out, _write_report, kinds)  # an earlier write's
    (tmp_path / "empty").mkdir()
    atomic_write_folder(tmp_path / "empty", _write_report, kinds)
    assert (out / "report.json").is_file() and (tmp_path / "empty" / "report.json").is_file()
    (out / "notes.txt").write_text("mine")
    (tmp_path / "runs" / "lenet-map").mkdir(parents=True)
    (tmp_path / "file.log").write_text("mine")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    refused = {
        out: "it holds 'notes.txt', which an earlier write of this kind did not leave, and the folder is replaced "
        "whole; give a new or empty folder",
        tmp_path / "runs": "it holds 'lenet-map', which",
        tmp_path / "file.log": "it is a file, not a folder",
        tmp_path / "link": "it is a link, and pyrozoo neither writes through a link nor replaces one",
        Path("."): "give the folder a name of its own",
    }
    for path, words in refused.items():
        with pytest.raises(PyrozooError, match=re.escape(f"cannot write {path}: {words}")):
            atomic_write_folder(path, _write_report, kinds)
    assert (out / "notes.txt").read_text() == "mine" and (tmp_path / "runs" / "lenet-map").is_dir()
    assert (tmp_path / "file.log").read_text() == "mine" and (tmp_path / "link").is_symlink()
    assert not any((tmp_path / "real").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file.log", "link", "out", "real", "runs"]
