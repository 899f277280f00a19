"""One writer per file: the lock file beside a run log or checkpoint (:mod:`hpcopt.log.lock`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hpcopt.errors import OutputError
from hpcopt.log.lock import WriterLock, WriterLocks, lock_path, same_file

pytestmark = pytest.mark.timeout(60)


def _dead_pid() -> int:
    """The pid of a process that has just ended (not reused within the test, in practice)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def _write_lock(path: Path, **fields: object) -> Path:
    lock = Path(lock_path(str(path)))
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), **fields}))
    return lock


def test_lock_is_taken_released_and_holds_host_and_pid(tmp_path: Path) -> None:
    log = tmp_path / "r.h5"
    with WriterLocks() as locks:
        locks.acquire(str(log), "run log")
        holder = json.loads((tmp_path / "r.h5.lock").read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
        assert sorted(os.listdir(tmp_path)) == ["r.h5.lock"]  # no temporary file of the lock left
    assert os.listdir(tmp_path) == []


def test_lock_is_released_when_the_block_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), WriterLocks() as locks:
        locks.acquire(str(tmp_path / "r.h5"), "run log")
        raise RuntimeError("training failed")
    assert os.listdir(tmp_path) == []


def test_a_live_holder_is_refused_with_its_pid(tmp_path: Path) -> None:
    log = tmp_path / "r.h5"
    first = WriterLock(str(log), "run log")
    first.acquire()
    with pytest.raises(OutputError, match=rf"run log .*r\.h5 is being written by another job \(pid {os.getpid()} "):
        WriterLock(str(log), "run log").acquire()
    first.release()
    WriterLock(str(log), "run log").acquire()  # free again


def test_a_stale_lock_is_removed_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "r.h5"
    pid = _dead_pid()
    _write_lock(log, pid=pid)
    lock = WriterLock(str(log), "run log")
    lock.acquire()
    assert f"removed the stale lock {lock.lock} of pid {pid}" in capsys.readouterr().err
    assert json.loads(Path(lock.lock).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_reused_pid_is_seen_by_its_start_time(tmp_path: Path) -> None:
    # Our own pid, but "started" at another time: the process that took the lock is gone.
    log = tmp_path / "r.h5"
    _write_lock(log, started="1")
    lock = WriterLock(str(log), "run log")
    lock.acquire()
    lock.release()


def test_a_lock_of_another_host_is_reported_with_what_to_do(tmp_path: Path) -> None:
    log = tmp_path / "r.h5"
    lock = _write_lock(log, host="node-7", pid=4242, created_utc="2026-12-03T10:00:00+00:00")
    with pytest.raises(OutputError) as error:
        WriterLock(str(log), "run log").acquire()
    assert str(error.value) == (
        f"run log {log} is locked by pid 4242 on host node-7 (since 2026-12-03T10:00:00+00:00), which cannot be "
        f"checked from here; if no job runs there any more, delete {lock} and start again"
    )
    assert lock.exists()  # not ours to remove


def test_a_foreign_lock_file_is_not_removed(tmp_path: Path) -> None:
    log = tmp_path / "r.h5"
    Path(lock_path(str(log))).write_text("not json")
    with pytest.raises(OutputError, match="which is not an hpcopt lock; delete it if no job writes"):
        WriterLock(str(log), "run log").acquire()


def test_leftover_temporary_files_of_the_path_are_removed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "r.h5.ckpt"
    (tmp_path / "r.h5.ckpt.tmp-12345").write_bytes(b"x" * 1000)
    (tmp_path / "r.h5.tmp-12346").write_bytes(b"y")  # the run log's: another path, kept
    with WriterLocks() as locks:
        locks.acquire(str(ckpt), "checkpoint")
    assert sorted(os.listdir(tmp_path)) == ["r.h5.tmp-12346"]
    assert "r.h5.ckpt.tmp-12345, a temporary file of checkpoint" in capsys.readouterr().err


def test_two_names_of_one_file_share_one_lock(tmp_path: Path) -> None:
    target = tmp_path / "real.h5"
    link = tmp_path / "link.h5"
    link.symlink_to(target)
    assert same_file(str(link), str(target)) and not same_file(str(link), str(tmp_path / "other.h5"))
    assert lock_path(str(link)) == lock_path(str(target))
    with WriterLocks() as locks:
        locks.acquire(str(target), "run log")
        with pytest.raises(OutputError, match="being written by another job"):
            WriterLock(str(link), "checkpoint").acquire()
        locks.acquire(str(link), "checkpoint")  # the same job: already held


def test_disabled_locks_create_nothing(tmp_path: Path) -> None:
    with WriterLocks(enabled=False) as locks:
        locks.acquire(str(tmp_path / "r.h5"), "run log")
        assert os.listdir(tmp_path) == []


def test_an_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="is not writable"):
        WriterLock(str(tmp_path / "missing" / "r.h5"), "run log").acquire()
