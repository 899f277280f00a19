"""The HDF5 run log: one file per run, written by rank 0 only.

Layout (every per-row dataset is 1-D, resizable and chunked):

* root attributes: what the trainer passes to :meth:`RunLog.open` (``hpcopt_version``,
  ``optimizer``, ``problem``, ``world_size``, ``num_parameters``, ``seed``, ``config_json``,
  ``mpi_library_version``, ``torch_version``, ``hostnames``, ``git_sha``, ``git_status``:
  :mod:`hpcopt.log.provenance`), plus
  ``created_utc`` (ISO 8601) and ``status`` (``"running"``, ``"completed"`` or ``"failed"``);
  a failed log also holds ``error``, the one-line exception that ended the run.
  Strings are variable-length UTF-8, which h5py reads back as ``str``; logs of earlier
  versions hold ``status`` as a 16-byte fixed-length string, which h5py reads as
  ``bytes`` (:func:`hpcopt.analysis.tables.load_run` decodes both).
* group ``iterations``: ``step`` (int64), ``epoch``, ``loss``, ``radius``, ``step_norm``,
  ``ratio`` (float64), ``accepted`` (int8, 0/1), ``wall_time`` (float64, seconds since the
  start of training), ``comm_calls``, ``comm_bytes`` (int64) and ``comm_time`` (float64);
  the ``comm_*`` values are per step, not cumulative.  NaN marks a field that does not
  apply to the optimizer (``radius`` for SGD).
* group ``evaluations``: ``epoch``, ``wall_time``, ``train_loss``, ``val_loss`` and one
  float64 dataset per metric name (``val_accuracy``, ``val_rel_l2_error``, ...).
* group ``ranks``: ``compute_time`` and ``comm_time``, one entry per rank.

Flush policy (crash safety).  Iteration rows are kept in memory and appended to the
file in one block every ``flush_every`` rows, followed by ``h5py.File.flush()``;
every evaluation is written and flushed at once.  A run killed with SIGKILL therefore
leaves a readable file holding every flushed row (at most ``flush_every - 1`` iteration
rows are lost) and ``status == "running"``.

Concurrent readers (SWMR).  The file is created with ``libver="latest"`` and switched
to single-writer/multiple-reader mode once every dataset and attribute that exists at
open time has been created, so ``hpcopt analyze`` can read a log while the run is
still writing it.  HDF5 does not support creating objects in SWMR mode, hence:

* all iteration, evaluation and rank datasets are created in :meth:`RunLog.open`;
  metrics must be named there (``metric_names``).  A metric that first appears later
  is still recorded (with NaN for earlier evaluations), but readers already attached
  may not see it until they reopen the file.
* ``status`` is a variable-length UTF-8 string attribute created at open and
  overwritten in place (same type and size), which SWMR allows.
* :meth:`RunLog.set_attribute` overwrites an existing attribute in place when the new
  value fits its type; any other attribute is kept in memory and written when the log
  is closed (the file is reopened without SWMR for that), so it is lost if the run is
  killed.

Creation (no half-written file).  The file is built under a temporary name,
``<path>.tmp-<pid>``, and moved onto ``path`` only once every attribute and dataset of
the header exists and is flushed: a job killed while creating its log (SIGKILL, an
abort, a full disk) leaves no file at ``path``, or the complete previous one when
overwriting.  The next job writing ``path`` removes the temporary file
(:mod:`hpcopt.log.lock`, whose lock file also keeps a second job from writing the same log).

Write errors (a full disk, a quota) are a one-line :class:`~hpcopt.errors.OutputError`
naming the file and the system's reason, not an h5py traceback.

A file whose SWMR writer was killed keeps its "open for writing" mark: open it with
``h5py.File(path, "r", swmr=True)`` (as :func:`hpcopt.analysis.tables.load_run` does) or clear
the mark with ``h5clear -s``.

This module imports only numpy and h5py so that ``hpcopt analyze`` starts fast.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import h5py
import numpy as np

from hpcopt.errors import OutputError

__all__ = ["EvaluationRecord", "IterationRecord", "RunLog"]

#: dtype of every dataset of group ``iterations``, in file order.
ITERATION_FIELDS: dict[str, np.dtype] = {
    "step": np.dtype(np.int64),
    "epoch": np.dtype(np.float64),
    "loss": np.dtype(np.float64),
    "radius": np.dtype(np.float64),
    "step_norm": np.dtype(np.float64),
    "ratio": np.dtype(np.float64),
    "accepted": np.dtype(np.int8),
    "wall_time": np.dtype(np.float64),
    "comm_calls": np.dtype(np.int64),
    "comm_bytes": np.dtype(np.int64),
    "comm_time": np.dtype(np.float64),
}

#: Datasets of group ``evaluations`` that every run has; metrics come on top.
EVALUATION_FIELDS: tuple[str, ...] = ("epoch", "wall_time", "train_loss", "val_loss")

#: Datasets of group ``ranks``.
RANK_FIELDS: tuple[str, ...] = ("compute_time", "comm_time")

#: Values the root attribute ``status`` takes.
STATUSES: tuple[str, ...] = ("running", "completed", "failed", "preempted", "interrupted")

# Variable-length UTF-8: h5py reads it back as ``str`` (a fixed-length string reads back
# as ``bytes``), and overwriting it keeps the attribute's type and size, which SWMR allows.
_STRING = h5py.string_dtype("utf-8")

# Rows per chunk: one chunk holds a few kilobytes, so appending a row touches one chunk
# and a run of 10^5 steps is still a few hundred chunks per dataset.
_ITERATION_CHUNK = 1024
_EVALUATION_CHUNK = 64

# HDF5 buries the system's reason in a long message: "... errno = 28, error message = 'No space left on device' ...".
_SYSTEM_REASON = re.compile(r"error message = '([^']*)'")


@contextmanager
def _stderr_discarded() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block (h5py prints some errors itself, from C)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _reason(error: BaseException) -> str:
    """The system's reason for an h5py write error, in a few words."""
    text = str(error)
    found = _SYSTEM_REASON.search(text)
    if found:
        return found.group(1)
    return (text.strip().splitlines() or [type(error).__name__])[0]


@dataclass
class IterationRecord:
    """One optimizer step, as rank 0 logs it.

    ``wall_time`` is seconds since the start of training at the end of the step; the
    ``comm_*`` fields count this step only.  Use NaN for a field that does not apply.
    """

    step: int
    epoch: float
    loss: float
    radius: float
    step_norm: float
    ratio: float
    accepted: bool
    wall_time: float
    comm_calls: int
    comm_bytes: int
    comm_time: float


@dataclass
class EvaluationRecord:
    """One evaluation on the validation set; ``metrics`` maps a metric name to its value."""

    epoch: float
    wall_time: float
    train_loss: float
    val_loss: float
    metrics: dict[str, float] = field(default_factory=dict)


def _attribute_value(value: object) -> object:
    """Convert ``value`` to something h5py stores as an attribute.

    ``None`` becomes ``""`` (e.g. ``git_sha`` outside a git checkout), mappings become
    JSON text and sequences of strings become arrays of variable-length strings.  Every
    string is stored as variable-length UTF-8, which h5py reads back as ``str``.
    """
    if value is None:
        value = ""
    if isinstance(value, Mapping):
        value = json.dumps(value, sort_keys=True)
    if isinstance(value, str):
        # np.str_ included, which h5py refuses (it has no type for numpy's fixed-width unicode).
        return np.array(str(value), dtype=_STRING)
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return np.array(value, dtype=_STRING)
    return value


class RunLog:
    """Writer of one run log (see the module docstring for the layout and flush policy).

    Args:
        path: file to write; ``None`` disables the log.
        enabled: ``False`` on every rank but 0, which makes every method a no-op.
        overwrite: replace an existing file instead of refusing to start.
        flush_every: iteration rows kept in memory before they are appended and flushed.

    Typical use::

        RunLog.check_path(path, overwrite=overwrite)   # before any expensive work
        with RunLog(path, enabled=rank == 0) as log:
            log.open(attributes, metric_names=["val_accuracy"])
            for ...:
                log.log_iteration(IterationRecord(...))
        # leaving the block normally marks the run "completed", by an exception "failed"
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        enabled: bool = True,
        overwrite: bool = False,
        flush_every: int = 1,
    ) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be at least 1, got {flush_every}")
        self.path = None if path is None else os.fspath(path)
        self.enabled = enabled and self.path is not None
        self.overwrite = overwrite
        self.flush_every = flush_every
        self._file: h5py.File | None = None
        self._closed = False
        self._pending_rows: list[IterationRecord] = []
        self._num_iterations = 0
        self._num_evaluations = 0
        self._metric_names: list[str] = []
        # Attributes that could not be written under SWMR; written by close().
        self._deferred_attributes: dict[str, object] = {}
        self._datasets: dict[str, h5py.Dataset] = {}

    # ------------------------------------------------------------------ checks

    @staticmethod
    def check_path(path: str | os.PathLike[str] | None, *, overwrite: bool) -> None:
        """Raise :class:`OutputError` if a run log cannot be written at ``path``.

        Call it before any expensive work so a typo fails in a second, not after an
        hour of training.  It creates and changes nothing.  ``None`` (no log) passes.
        """
        if path is None:
            return
        text = os.fspath(path)
        if not text:
            raise OutputError("run log path is empty")
        if os.path.isdir(text):
            raise OutputError(f"run log path {text} is a directory; give a file name")
        parent = os.path.dirname(os.path.abspath(text))
        if not os.path.exists(parent):
            raise OutputError(f"cannot write run log {text}: directory {parent} does not exist")
        if not os.path.isdir(parent):
            raise OutputError(f"cannot write run log {text}: {parent} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write run log {text}: directory {parent} is not writable")
        if os.path.lexists(text):
            if not overwrite:
                raise OutputError(f"run log {text} already exists; choose another path or allow overwriting it")
            if not os.access(text, os.W_OK):
                raise OutputError(f"cannot overwrite run log {text}: file is not writable")

    # ----------------------------------------------------------------- writing

    def open(self, attributes: Mapping[str, object], metric_names: Sequence[str] = ()) -> None:
        """Create the file, its attributes and every dataset, then enter SWMR mode.

        ``attributes`` become root attributes as given (``status`` and ``created_utc``
        are set here and override any passed value).  ``metric_names`` are the keys the
        :class:`EvaluationRecord` metrics will have.
        """
        if not self.enabled:
            return
        if self._file is not None or self._closed:
            raise RuntimeError(f"run log {self.path} was already opened")
        assert self.path is not None
        self.check_path(self.path, overwrite=self.overwrite)
        temporary = f"{self.path}.tmp-{os.getpid()}"
        try:
            # locking="best-effort" keeps working on file systems without locks (often Lustre).
            handle = h5py.File(temporary, "w", libver="latest", locking="best-effort")
        except OSError as error:
            raise OutputError(f"cannot create run log {self.path}: {_reason(error)}") from None
        try:
            for name, value in attributes.items():
                if name in ("status", "created_utc"):
                    continue
                handle.attrs[name] = _attribute_value(value)
            handle.attrs["created_utc"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            handle.attrs.create("status", "running", dtype=_STRING)

            iterations = handle.create_group("iterations")
            for name, dtype in ITERATION_FIELDS.items():
                self._create_rows(iterations, name, dtype, _ITERATION_CHUNK)
            evaluations = handle.create_group("evaluations")
            for name in EVALUATION_FIELDS:
                self._create_rows(evaluations, name, np.dtype(np.float64), _EVALUATION_CHUNK)
            for name in metric_names:
                self._check_metric_name(name)
                if name not in evaluations:
                    self._create_rows(evaluations, name, np.dtype(np.float64), _EVALUATION_CHUNK)
                    self._metric_names.append(name)
            ranks = handle.create_group("ranks")
            for name in RANK_FIELDS:
                self._create_rows(ranks, name, np.dtype(np.float64), 64)
            handle.swmr_mode = True
            handle.flush()
            self._move_into_place(temporary)
        except BaseException as error:
            try:
                handle.close()
            except Exception:
                pass  # the file is deleted next; its close may fail on a full disk
            try:
                os.unlink(temporary)
            except OSError:
                pass
            if isinstance(error, (OSError, RuntimeError)) and not isinstance(error, OutputError):
                raise OutputError(f"cannot create run log {self.path}: {_reason(error)}") from None
            raise
        self._file = handle
        # Kept open for the whole run: a dataset object released after a failed write
        # retries that write (and h5py prints a traceback for each), so none is released early.
        self._datasets = {
            f"{group}/{name}": dataset
            for group in ("iterations", "evaluations", "ranks")
            for name, dataset in handle[group].items()
        }

    def _move_into_place(self, temporary: str) -> None:
        """Give the complete header its real name (the open handle follows the file)."""
        assert self.path is not None
        if self.overwrite:
            os.replace(temporary, self.path)
            return
        try:
            # A hard link refuses an existing file atomically, in case one appeared since the check.
            os.link(temporary, self.path)
        except FileExistsError:
            raise OutputError(
                f"run log {self.path} already exists; choose another path or allow overwriting it"
            ) from None
        except OSError:
            # No hard links on this file system: rename, after checking once more.
            if os.path.lexists(self.path):
                raise OutputError(
                    f"run log {self.path} already exists; choose another path or allow overwriting it"
                ) from None
            os.replace(temporary, self.path)
            return
        os.unlink(temporary)

    @staticmethod
    def _create_rows(group: h5py.Group, name: str, dtype: np.dtype, chunk: int) -> h5py.Dataset:
        # NaN fill marks a row a live reader sees resized but not yet written.
        fill = np.nan if dtype.kind == "f" else 0
        return group.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(chunk,), dtype=dtype, fillvalue=fill)

    @staticmethod
    def _check_metric_name(name: str) -> None:
        if not name or "/" in name or name in EVALUATION_FIELDS:
            raise ValueError(
                f"invalid metric name {name!r}: it must be non-empty, without '/', "
                f"and not one of {', '.join(EVALUATION_FIELDS)}"
            )

    def _require_open(self) -> h5py.File:
        if self._file is None:
            state = "closed" if self._closed else "not opened yet"
            raise RuntimeError(f"run log {self.path} is {state}")
        return self._file

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Turn h5py's write errors (a full disk, a quota) into one line naming the file."""
        try:
            yield
        except (OSError, RuntimeError) as error:  # h5py raises RuntimeError when a flush fails
            reason = _reason(error)
            with _stderr_discarded():
                error.__traceback__ = None  # its frames hold datasets, which _abandon must release
                self._abandon()
            raise OutputError(f"cannot write run log {self.path}: {reason}") from None

    def _abandon(self) -> None:
        """Give up the file after a write error: close what can be closed, quietly.

        HDF5 retries the failed writes whenever an object of the file is released, and
        h5py prints each failure as an "Exception ignored" traceback (a dozen of them for
        a full disk, after the failure has been reported once), so the caller mutes stderr
        while the file is let go.  The rows already flushed stay readable; the status
        stays ``running``.
        """
        handle, self._file = self._file, None
        self._closed = True
        self._datasets.clear()
        self._pending_rows.clear()
        self._deferred_attributes.clear()
        if handle is None:
            return
        gc.collect()
        for _ in range(5):  # each try releases what it can; a failed release retries the write
            try:
                handle.close()
            except Exception:
                pass
            if not handle.id.valid:
                break
        del handle
        gc.collect()

    def log_iteration(self, record: IterationRecord) -> None:
        """Queue one step; the queue goes to disk and is flushed every ``flush_every`` rows."""
        if not self.enabled:
            return
        self._require_open()
        self._pending_rows.append(record)
        if len(self._pending_rows) >= self.flush_every:
            with self._writing():
                self._write_pending_rows()
                self.flush()

    def _write_pending_rows(self) -> None:
        if not self._pending_rows:
            return
        self._require_open()
        start = self._num_iterations
        stop = start + len(self._pending_rows)
        for name, dtype in ITERATION_FIELDS.items():
            values = np.array([getattr(row, name) for row in self._pending_rows], dtype=dtype)
            dataset = self._datasets[f"iterations/{name}"]
            dataset.resize((stop,))
            dataset[start:stop] = values
        self._num_iterations = stop
        self._pending_rows.clear()

    def log_evaluation(self, record: EvaluationRecord) -> None:
        """Append one evaluation and flush; a metric missing from ``record`` is stored as NaN."""
        if not self.enabled:
            return
        group = self._require_open()["evaluations"]
        for name in record.metrics:
            if name not in self._metric_names:
                self._check_metric_name(name)
                # Not declared at open: create it now, with NaN for the earlier rows.
                dataset = self._create_rows(group, name, np.dtype(np.float64), _EVALUATION_CHUNK)
                dataset.resize((self._num_evaluations,))
                self._datasets[f"evaluations/{name}"] = dataset
                self._metric_names.append(name)
        row = self._num_evaluations
        values: dict[str, float] = {
            "epoch": record.epoch,
            "wall_time": record.wall_time,
            "train_loss": record.train_loss,
            "val_loss": record.val_loss,
        }
        for name in self._metric_names:
            values[name] = record.metrics.get(name, math.nan)
        with self._writing():
            for name, value in values.items():
                dataset = self._datasets[f"evaluations/{name}"]
                dataset.resize((row + 1,))
                dataset[row] = value
            self.flush()
        self._num_evaluations = row + 1

    def set_rank_times(self, compute_time: Sequence[float], comm_time: Sequence[float]) -> None:
        """Store each rank's total compute and communication seconds (index = rank)."""
        if not self.enabled:
            return
        if len(compute_time) != len(comm_time):
            raise ValueError(f"compute_time has {len(compute_time)} entries but comm_time has {len(comm_time)}")
        self._require_open()
        with self._writing():
            for name, values in (("compute_time", compute_time), ("comm_time", comm_time)):
                array = np.asarray(values, dtype=np.float64)
                dataset = self._datasets[f"ranks/{name}"]
                dataset.resize(array.shape)
                dataset[:] = array
            self.flush()

    def set_attribute(self, name: str, value: object) -> None:
        """Set a root attribute: in place if it exists and ``value`` fits, else at close."""
        if not self.enabled:
            return
        handle = self._require_open()
        if name == "status":
            raise ValueError("the status attribute is set by close()")
        value = _attribute_value(value)
        if name in handle.attrs:
            try:
                handle.attrs.modify(name, value)
                self._deferred_attributes.pop(name, None)
                return
            except (TypeError, ValueError, OSError):
                pass  # different type or shape: not possible in place under SWMR
        self._deferred_attributes[name] = value

    def flush(self) -> None:
        """Push everything written so far to disk (not the queued iteration rows)."""
        if self._file is not None:
            self._file.flush()

    def close(self, status: str = "completed") -> None:
        """Write queued rows, set ``status`` (any of :data:`STATUSES` but ``"running"``) and close.

        Calling it again does nothing, so ``close("failed")`` in an error handler is safe.
        """
        if status not in STATUSES[1:]:
            raise ValueError(f"status must be one of {', '.join(STATUSES[1:])}, got {status!r}")
        if not self.enabled or self._file is None:
            self._closed = True
            return
        handle = self._file
        try:
            with self._writing():
                self._write_pending_rows()
                handle.attrs.modify("status", status)
                handle.flush()
        finally:
            self._file = None
            self._closed = True
            self._datasets.clear()
            with self._writing():
                handle.close()
        if self._deferred_attributes:
            assert self.path is not None
            with self._writing(), h5py.File(self.path, "r+", locking="best-effort") as reopened:
                for name, value in self._deferred_attributes.items():
                    reopened.attrs[name] = value
            self._deferred_attributes.clear()

    @property
    def num_iterations(self) -> int:
        """Iteration rows logged so far, queued ones included."""
        return self._num_iterations + len(self._pending_rows)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close("completed")
            return
        # What ended the run, one line, so the log explains itself after the job's
        # stderr is gone (written after closing, like any attribute added under SWMR).
        if self.enabled:
            first_line = (str(exc).splitlines() or [""])[0]
            self._deferred_attributes["error"] = f"{type(exc).__name__}: {first_line}"
        try:
            self.close("failed")
        except Exception as close_error:
            # Let the exception that ended the run propagate; a second failure while
            # closing (disk full, say) is attached to it rather than replacing it.
            exc.add_note(f"hpcopt: closing run log {self.path} also failed: {close_error}")
