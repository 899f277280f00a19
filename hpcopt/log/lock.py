"""One writer per file: a lock file beside every run log and checkpoint a job writes.

A job that writes ``r.h5`` first creates ``r.h5.lock`` (beside the file the path
resolves to, so two names of one file share one lock) holding the writer's host, pid,
the pid's start time and the time the lock was taken, as one line of JSON.  The lock
is written to a temporary name and hard-linked into place, which fails when the lock
exists: two jobs can never both hold it, and a lock file is never half-written.
File systems without hard links fall back to ``O_CREAT | O_EXCL``.

Another job that wants to write the same file, with or without ``--overwrite``,
finds the lock and stops with a one-line :class:`~hpcopt.errors.OutputError` naming
the holder.  A lock is *stale* when its writer is gone: on this host, when no process
has its pid (or the pid now belongs to a younger process); such a lock is removed with
a note on stderr.  A lock taken on another host cannot be checked from here; the error
says which host and pid hold it and to delete the lock file once that job is gone.

The lock is released on every way out of the Python code (:class:`WriterLocks` is a
context manager); a job killed by SIGKILL or ``MPI_Abort`` leaves it, and the next job
finds it stale.  Whoever holds the lock is the file's only writer, so any temporary
file of that path left by a dead job (``r.h5.tmp-<pid>``, ``r.h5.ckpt.tmp-<pid>``) is
garbage: :meth:`WriterLock.acquire` removes it and says so.

HDF5's own file locking is no substitute: it is best-effort (off on many parallel
file systems), and a second writer that truncates the file (``--overwrite``) does so
before the lock is checked.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import socket
import sys
from types import TracebackType
from typing import Self

from hpcopt.errors import OutputError

__all__ = ["WriterLock", "WriterLocks", "lock_path", "same_file"]

LOCK_SUFFIX = ".lock"


def lock_path(path: str) -> str:
    """The lock file of ``path``: beside the file it resolves to, plus :data:`LOCK_SUFFIX`."""
    return os.path.realpath(path) + LOCK_SUFFIX


def same_file(first: str, second: str) -> bool:
    """Whether two paths name one file, after resolving links (hard links included)."""
    if os.path.realpath(first) == os.path.realpath(second):
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False  # one of them does not exist yet


def _process_stat(pid: int) -> tuple[str, str]:
    """``(state, start time)`` of process ``pid`` from ``/proc`` (``("", "")`` when unknown).

    The start time (clock ticks since boot) tells reused pids apart; the state tells a
    killed process that its parent has not reaped yet (``Z``, ``X``) from a live one.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            text = stat.read()
    except OSError:
        return "", ""
    # Field 3 is the state, field 22 the start time; field 2 (the command) is in
    # parentheses and may hold spaces.
    fields = text.rpartition(")")[2].split()
    return (fields[0] if fields else ""), (fields[19] if len(fields) > 19 else "")


def _process_start(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot ("" when unknown)."""
    return _process_stat(pid)[1]


def _alive(pid: int, started: str) -> bool:
    """Whether process ``pid`` of this host exists and is the one that took the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return True  # cannot tell: treat as alive, the safe side
    state, now = _process_stat(pid)
    if state in ("Z", "X"):
        return False  # killed, not yet reaped (its launcher died with it): it writes nothing
    return not (started and now and now != started)


def _note(text: str) -> None:
    sys.stderr.write(f"hpcopt: note: {text}\n")
    sys.stderr.flush()


class WriterLock:
    """The lock of one output file, held by this process between :meth:`acquire` and :meth:`release`.

    Args:
        path: the run log or checkpoint to protect.
        what: how messages name it (``run log``, ``checkpoint``).
    """

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.what = what
        self.lock = lock_path(path)
        self.held = False

    def _record(self) -> dict[str, object]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _process_start(os.getpid()),
            "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }

    def _create(self) -> bool:
        """Create the lock file with its whole content; ``False`` if it exists."""
        text = json.dumps(self._record()) + "\n"
        temporary = f"{self.lock}.tmp-{os.getpid()}"
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.write(text)
            try:
                os.link(temporary, self.lock)  # atomic, and refuses an existing lock
                return True
            except FileExistsError:
                return False
            except OSError:
                pass  # no hard links here: fall back to O_EXCL below
        finally:
            try:
                os.unlink(temporary)
            except OSError:
                pass
        try:
            descriptor = os.open(self.lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        return True

    def _holder(self) -> dict[str, object] | None:
        """The lock's content, ``None`` when it vanished meanwhile; unreadable content is an error."""
        try:
            with open(self.lock, encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as error:
            raise OutputError(f"cannot read the lock {self.lock} of {self.what} {self.path}: {error}") from None
        try:
            holder = json.loads(text)
            if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
                raise ValueError
        except ValueError:
            raise OutputError(
                f"{self.what} {self.path} is locked by {self.lock}, which is not an hpcopt lock; "
                f"delete it if no job writes {self.path}"
            ) from None
        return holder

    def acquire(self) -> None:
        """Take the lock, removing a stale one; :class:`OutputError` if a live (or unknown) job holds it."""
        if self.held:
            return
        directory = os.path.dirname(self.lock)
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write {self.what} {self.path}: directory {directory} is not writable")
        for _ in range(3):  # a lock removed as stale may be taken by a third job meanwhile
            try:
                if self._create():
                    self.held = True
                    self._remove_leftovers()
                    return
            except OSError as error:
                raise OutputError(f"cannot create the lock {self.lock}: {error.strerror or error}") from None
            holder = self._holder()
            if holder is None:
                continue
            host, pid = str(holder.get("host", "")), int(holder["pid"])  # type: ignore[call-overload]
            since = holder.get("created_utc", "?")
            if host != socket.gethostname():
                raise OutputError(
                    f"{self.what} {self.path} is locked by pid {pid} on host {host} (since {since}), which cannot "
                    f"be checked from here; if no job runs there any more, delete {self.lock} and start again"
                )
            if _alive(pid, str(holder.get("started", ""))):
                raise OutputError(
                    f"{self.what} {self.path} is being written by another job (pid {pid} on {host}, since {since}); "
                    "wait for it to end or choose another path"
                )
            try:
                os.unlink(self.lock)
            except FileNotFoundError:
                pass
            except OSError as error:
                raise OutputError(
                    f"{self.what} {self.path} has a stale lock {self.lock} (pid {pid} is gone) that cannot be "
                    f"removed: {error.strerror or error}"
                ) from None
            _note(f"removed the stale lock {self.lock} of pid {pid}, which ended without releasing it")
        raise OutputError(f"{self.what} {self.path}: its lock {self.lock} keeps changing; is another job starting?")

    def _remove_leftovers(self) -> None:
        """Delete temporary files of this path left by dead jobs (we are its only writer now)."""
        real = os.path.realpath(self.path)
        patterns = {f"{glob.escape(real)}.tmp-*", f"{glob.escape(self.path)}.tmp-*"}
        leftovers = sorted({name for pattern in patterns for name in glob.glob(pattern)})
        for name in leftovers:
            try:
                os.unlink(name)
            except OSError:
                continue
            _note(f"removed {name}, a temporary file of {self.what} {self.path} left by a job that died")

    def release(self) -> None:
        """Remove the lock if this process holds it (safe to call twice)."""
        if not self.held:
            return
        self.held = False
        try:
            os.unlink(self.lock)
        except OSError:
            pass


class WriterLocks:
    """The locks of the files one job writes, released together when the ``with`` block ends.

    Args:
        enabled: ``False`` on the ranks that write nothing (every rank but 0).
    """

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.locks: list[WriterLock] = []

    def acquire(self, path: str | None, what: str) -> None:
        """Lock ``path`` (``None``: nothing to lock); :class:`OutputError` if another job writes it."""
        if not self.enabled or path is None:
            return
        if any(same_file(lock.path, path) for lock in self.locks):
            return
        lock = WriterLock(path, what)
        lock.acquire()
        self.locks.append(lock)

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
        self.locks.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
