"""Reading run logs back: ``hpcopt analyze`` and the helpers behind it.

:func:`load_run` reads a log written by :class:`hpcopt.log.runlog.RunLog` into numpy arrays,
also while the run is still writing it or after it was killed (the file is opened as a
SWMR reader, without HDF5 file locking).  :func:`summary_rows` reduces runs to one row
each and :func:`format_table` prints rows as a plain-text table.

A damaged file can make HDF5 loop for ever inside one read (seen on a log that two
jobs wrote at once, before :mod:`hpcopt.log.lock` refused the second), so ``hpcopt
analyze`` reads each log with :func:`load_run_bounded`: in a forked child process that
is killed after ``timeout`` seconds, which turns a hang into a one-line error.

Only numpy and h5py are imported (pandas lazily, for :meth:`Run.iterations_frame`) so
that ``hpcopt analyze`` starts fast.
"""

from __future__ import annotations

import csv as csv_module
import math
import os
import pickle
import select
import signal
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import h5py
import numpy as np

from hpcopt.errors import DataError, OutputError

if TYPE_CHECKING:  # pandas is optional and slow to import
    import pandas

__all__ = [
    "SUMMARY_COLUMNS",
    "Run",
    "display_names",
    "expand_paths",
    "format_table",
    "load_run",
    "load_run_bounded",
    "summary_rows",
    "write_csv",
]

#: Columns of :func:`summary_rows`, in table order.
SUMMARY_COLUMNS: tuple[str, ...] = (
    "file",
    "optimizer",
    "problem",
    "ranks",
    "status",
    "steps",
    "epochs",
    "final_train_loss",
    "final_val_loss",
    "final_metric",
    "final_metric_value",
    "accepted_fraction",
    "median_iter_time",
    "total_wall_time",
    "comm_bytes_per_iter",
    "comm_calls_per_iter",
)

# Datasets of group ``evaluations`` that are not metrics.
_EVALUATION_BASE = ("epoch", "wall_time", "train_loss", "val_loss")


@dataclass
class Run:
    """A loaded run log: root attributes and the datasets of each group as numpy arrays.

    ``iterations["accepted"]`` is boolean; every other array keeps its stored dtype.
    Attribute strings are ``str`` and string arrays are ``list[str]``.
    """

    path: str
    attributes: dict[str, object] = field(default_factory=dict)
    iterations: dict[str, np.ndarray] = field(default_factory=dict)
    evaluations: dict[str, np.ndarray] = field(default_factory=dict)
    ranks: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """``"running"``, ``"completed"``, ``"failed"``, or ``"unknown"`` if not recorded.

        A run killed without a chance to close its log stays ``"running"``.
        """
        return str(self.attributes.get("status", "unknown"))

    def integer(self, name: str, default: int | None = None) -> int:
        """The root attribute ``name`` as an int; ``default`` where it is missing or not a number.

        Attribute values are typed ``object`` (h5py gives numpy scalars for the integers a run
        log stores); without a ``default`` a missing or non-numeric attribute is a ``KeyError``.
        """
        value = self.attributes.get(name)
        if isinstance(value, (int, float, np.integer, np.floating)):
            return int(value)
        if default is None:
            raise KeyError(f"{self.path}: no numeric root attribute '{name}'")
        return default

    @property
    def metric_names(self) -> list[str]:
        """Names of the evaluation metrics, in file order."""
        return [name for name in self.evaluations if name not in _EVALUATION_BASE]

    def iterations_frame(self) -> pandas.DataFrame:
        """The iterations as a ``pandas.DataFrame``, one row per step."""
        try:
            import pandas
        except ImportError:
            raise ImportError(
                "Run.iterations_frame needs pandas, which is not installed; "
                "use Run.iterations (a dict of numpy arrays) instead"
            ) from None
        return pandas.DataFrame(self.iterations)


def _attribute(value: object) -> object:
    """Turn an h5py attribute value into a plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace").rstrip("\x00")
    if isinstance(value, np.ndarray):
        if value.dtype.kind in ("S", "O", "U"):
            return [str(_attribute(item)) for item in value.tolist()]
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read_group(handle: h5py.File, name: str) -> dict[str, np.ndarray]:
    """All 1-D datasets of group ``name``, cut to their common length.

    While a run is being written its datasets grow one after another, so a live reader
    can see some of them one row longer; the incomplete last row is dropped.
    """
    if name not in handle:
        return {}
    group = handle[name]
    arrays = {key: np.asarray(item[()]) for key, item in group.items() if isinstance(item, h5py.Dataset)}
    if not arrays:
        return {}
    length = min(len(array) for array in arrays.values())
    return {key: array[:length] for key, array in arrays.items()}


def _open_for_reading(path: str) -> h5py.File:
    """Open ``path`` read-only in the most permissive way that works."""
    # A SWMR reader can open a log that is still being written, or whose writer was killed
    # (a plain open refuses both); files not written with libver="latest" need a plain open.
    # locking=False: the writer holds the HDF5 file lock, and some file systems have none.
    # locking="best-effort" matches RunLog's own flags, which HDF5 requires when this
    # process is the writer (it then shares the already open file).
    attempts: list[dict[str, object]] = [
        {"swmr": True, "locking": False},
        {"swmr": True, "locking": "best-effort"},
        {"locking": False},
    ]
    for options in attempts[:-1]:
        try:
            return h5py.File(path, "r", **options)
        except OSError:
            pass
    try:
        return h5py.File(path, "r", **attempts[-1])
    except OSError as error:
        raise DataError(f"cannot read run log {path}: {error}") from None


def load_run(path: str | os.PathLike[str]) -> Run:
    """Read the run log at ``path``; :class:`DataError` if it is not a readable hpcopt log."""
    text = os.fspath(path)
    if not os.path.exists(text):
        raise DataError(f"run log {text} does not exist")
    if os.path.isdir(text):
        raise DataError(f"run log {text} is a directory, not a file")
    try:
        is_hdf5 = h5py.is_hdf5(text)
    except OSError as error:
        raise DataError(f"cannot read run log {text}: {error}") from None
    if not is_hdf5:
        raise DataError(f"{text} is not an HDF5 file, so not an hpcopt run log")
    with _open_for_reading(text) as handle:
        if not isinstance(handle.get("iterations"), h5py.Group):
            raise DataError(f"{text} is not an hpcopt run log: it has no 'iterations' group")
        attributes = {key: _attribute(value) for key, value in handle.attrs.items()}
        iterations = _read_group(handle, "iterations")
        evaluations = _read_group(handle, "evaluations")
        ranks = _read_group(handle, "ranks")
    if "accepted" in iterations:
        iterations["accepted"] = iterations["accepted"].astype(bool)
    return Run(text, attributes, iterations, evaluations, ranks)


#: Seconds ``hpcopt analyze`` waits for one run log (``--read-timeout``); a healthy log of
#: a million steps reads in about a second.
READ_TIMEOUT = 60.0


def load_run_bounded(path: str | os.PathLike[str], timeout: float = READ_TIMEOUT) -> Run:
    """:func:`load_run` in a forked child killed after ``timeout`` seconds (:class:`DataError` then).

    Where ``fork`` does not exist, :func:`load_run` itself (unbounded).
    """
    text = os.fspath(path)
    if not hasattr(os, "fork"):
        return load_run(text)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: read, send the result or the error back, and vanish without cleanup
        try:
            os.close(read_end)
            try:
                payload = pickle.dumps(("run", load_run(text)))
            except DataError as error:
                payload = pickle.dumps(("error", str(error)))
            except BaseException as error:  # a bug: its line, not a silent hang or crash
                payload = pickle.dumps(("error", f"cannot read run log {text}: {type(error).__name__}: {error}"))
            with os.fdopen(write_end, "wb") as stream:
                stream.write(payload)
        finally:
            os._exit(0)
    os.close(write_end)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([read_end], [], [], remaining)[0]:
                os.kill(pid, signal.SIGKILL)
                raise DataError(
                    f"reading run log {text} took more than {timeout:g} s: the file is damaged or its file system "
                    "stalls (--read-timeout to wait longer)"
                )
            chunk = os.read(read_end, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    if not chunks:
        raise DataError(f"cannot read run log {text}: the reading process died (the file is probably damaged)")
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "error":
        raise DataError(value)
    assert isinstance(value, Run)
    return value


def _last(array: np.ndarray | None) -> float:
    return float(array[-1]) if array is not None and len(array) else math.nan


def _largest(*values: float) -> float:
    """The largest of ``values`` that is not NaN, or NaN if all are."""
    finite = [value for value in values if not math.isnan(value)]
    return max(finite) if finite else math.nan


def _mean(array: np.ndarray | None) -> float:
    return float(np.mean(array)) if array is not None and len(array) else math.nan


def display_names(paths: Sequence[str]) -> list[str]:
    """The shortest distinguishing path of each of ``paths``, to name runs in a table.

    That is the fewest trailing path components that no other path ends with:
    ``runs/a/r.h5``, ``runs/b/r.h5`` and ``runs/c/s.h5`` show as ``a/r.h5``, ``b/r.h5``
    and ``s.h5``; a single path shows its basename.  A path given twice shows in full.
    """
    parts = [tuple(part for part in os.path.normpath(path).split(os.sep) if part) for path in paths]
    names: list[str | None] = [None] * len(parts)
    for length in range(1, max((len(own) for own in parts), default=0) + 1):
        # A path shorter than ``length`` takes part whole, so "r.h5" and "x/r.h5" differ at 2.
        counts = Counter(own[-length:] for own in parts)
        for index, own in enumerate(parts):
            if names[index] is None and own and counts[own[-length:]] == 1:
                names[index] = os.path.join(*own[-length:])
    return [name if name is not None else os.path.normpath(path) for name, path in zip(names, paths)]


def summary_rows(runs: Sequence[Run]) -> list[dict[str, object]]:
    """One row per run with the columns of :data:`SUMMARY_COLUMNS`.

    ``file`` is the run's shortest distinguishing path among ``runs`` (:func:`display_names`).

    ``final_train_loss`` is the last evaluation's training loss, or the last step's loss
    if the run has no evaluations.  ``final_metric`` is the first metric the log declares.
    ``median_iter_time`` is the median difference of consecutive ``wall_time`` values
    (the first step counted from time 0), robust to the odd slow step or evaluation.
    Values that a run does not have are NaN (numbers) or ``""`` (text).
    """
    rows: list[dict[str, object]] = []
    names = display_names([run.path for run in runs])
    for run, name in zip(runs, names):
        its, evs = run.iterations, run.evaluations
        steps = len(its.get("step", ()))
        wall = its.get("wall_time")
        eval_wall = evs.get("wall_time")
        epochs = _largest(_last(its.get("epoch")), _last(evs.get("epoch")))
        final_train = _last(evs.get("train_loss")) if len(evs.get("train_loss", ())) else _last(its.get("loss"))
        metrics = run.metric_names
        metric = metrics[0] if metrics else ""
        iter_times = np.diff(wall, prepend=0.0) if wall is not None and len(wall) else None
        # A final evaluation can end after the last step.
        total_wall = _largest(_last(wall), _last(eval_wall))
        accepted = its.get("accepted")
        rows.append(
            {
                "file": name,
                "optimizer": str(run.attributes.get("optimizer", "")),
                "problem": str(run.attributes.get("problem", "")),
                "ranks": run.attributes.get("world_size", ""),
                "status": run.status,
                "steps": steps,
                "epochs": epochs,
                "final_train_loss": final_train,
                "final_val_loss": _last(evs.get("val_loss")),
                "final_metric": metric,
                "final_metric_value": _last(evs.get(metric)) if metric else math.nan,
                "accepted_fraction": _mean(accepted.astype(np.float64) if accepted is not None else None),
                "median_iter_time": float(np.median(iter_times)) if iter_times is not None else math.nan,
                "total_wall_time": total_wall,
                "comm_bytes_per_iter": _mean(its.get("comm_bytes")),
                "comm_calls_per_iter": _mean(its.get("comm_calls")),
            }
        )
    return rows


def _format_value(value: object) -> str:
    """Four significant digits for floats, plain text for everything else."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isnan(number):
            return "-"
        if number != 0.0 and (abs(number) >= 1e6 or abs(number) < 1e-3):
            return f"{number:.3e}"
        return f"{number:.4g}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None) -> str:
    """A fixed-width plain-text table of ``rows``: a header line, a rule, one line per row.

    ``columns`` defaults to the keys of the first row.  Numbers are right-aligned, text
    left-aligned; a value a row lacks shows as ``-``.
    """
    if columns is None:
        columns = list(rows[0]) if rows else []
    cells = [[_format_value(row.get(name, math.nan)) for name in columns] for row in rows]
    numeric = [
        all(
            isinstance(row.get(name), (int, float, np.number)) and not isinstance(row.get(name), bool)
            for row in rows
            if name in row
        )
        for name in columns
    ]
    widths = [max([len(name)] + [len(line[index]) for line in cells]) for index, name in enumerate(columns)]

    def render(values: Sequence[str]) -> str:
        parts = [
            value.rjust(width) if is_number else value.ljust(width)
            for value, width, is_number in zip(values, widths, numeric)
        ]
        return "  ".join(parts).rstrip()

    lines = [render(list(columns)), "  ".join("-" * width for width in widths)]
    lines.extend(render(line) for line in cells)
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Mapping[str, object]], path: str, columns: Sequence[str] | None = None) -> None:
    """Write ``rows`` to ``path`` as CSV with full-precision numbers; :class:`OutputError` if it cannot."""
    if columns is None:
        columns = list(rows[0]) if rows else list(SUMMARY_COLUMNS)
    if os.path.isdir(path):
        raise OutputError(f"CSV path {path} is a directory; give a file name")
    try:
        with open(path, "w", newline="", encoding="utf-8") as stream:
            writer = csv_module.DictWriter(stream, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({name: row.get(name, "") for name in columns})
    except OSError as error:
        raise OutputError(f"cannot write CSV {path}: {error.strerror or error}") from None


def expand_paths(paths: Sequence[str]) -> list[str]:
    """``paths`` with each directory replaced by the ``*.h5`` files in it (sorted)."""
    expanded: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(".h5"))
            if not found:
                raise DataError(f"directory {path} holds no run logs (*.h5)")
            expanded.extend(found)
        else:
            expanded.append(path)
    return expanded
