"""Rows read on demand from a map-style ``torch.utils.data.Dataset``: :class:`StreamedRows`.

A data set that does not fit in one rank's memory is given to :func:`hpcopt.problem` as
a map-style ``Dataset`` whose ``dataset[i]`` returns one ``(input, target)`` row.
:class:`StreamedRows` stands where the in-memory :class:`~hpcopt.problems.base.Dataset`
stands and offers the same three reads, each of which touches only the rows asked for:

* :meth:`StreamedRows.batches`: this rank's shard of each global batch of an epoch,
  through a ``torch.utils.data.DataLoader`` whose batch sampler yields those index
  lists (``num_workers`` processes, or one thread of the rank reading ``read_ahead``
  shards, read ahead while the optimizer steps);
* :meth:`StreamedRows.chunks`: consecutive rows, for evaluation in bounded memory;
* :meth:`StreamedRows.subset`: a view of some rows (another :class:`StreamedRows`),
  such as this rank's slice of the validation set.

Rows are stacked with ``default_collate``, so a shard holds exactly the values the same
rows given as tensors would: the losses of a run do not depend on how its data were given.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, default_collate
from torch.utils.data import Dataset as TorchDataset

from hpcopt.errors import DataError
from hpcopt.problems.base import EVAL_CHUNK, Dataset

Row = tuple[Any, Any]


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else ()


def check_pair(row: Any, index: int, what: str) -> Row:
    """``row`` when it is an ``(input, target)`` pair; else a :class:`DataError` naming the row."""
    if not isinstance(row, (tuple, list)) or len(row) != 2:
        raise DataError(f"{what} row {index} is a {type(row).__name__}, not an (input, target) pair")
    return row[0], row[1]


def _stack(rows: list[Any], indices: Sequence[int], what: str) -> tuple[Tensor, Tensor]:
    """Rows ``indices`` (as read: ``rows``) stacked into ``(inputs, targets)``.

    The rows are stacked first and checked only when stacking fails: a check of every row
    in Python cost as much as reading them.  A bad row is then a :class:`DataError` naming it.
    """
    if not all(isinstance(row, (tuple, list)) and len(row) == 2 for row in rows):
        for row, index in zip(rows, indices):
            check_pair(row, index, what)
    try:
        inputs, targets = default_collate(rows)
    except (RuntimeError, TypeError, ValueError) as error:
        first_input, first_target = rows[0]
        for (value, target), index in zip(rows, indices):
            if _shape(value) != _shape(first_input) or _shape(target) != _shape(first_target):
                raise DataError(
                    f"{what} rows disagree in shape: row {indices[0]} has input {_shape(first_input)} and "
                    f"target {_shape(first_target)}, row {index} has input {_shape(value)} and target {_shape(target)}"
                ) from None
        raise DataError(f"{what} rows {indices[0]}..{indices[-1]} cannot be stacked: {error}") from None
    return torch.as_tensor(inputs), torch.as_tensor(targets)


class _Rows(TorchDataset[Any]):
    """The user's dataset read a batch of rows at a time (``DataLoader`` calls ``__getitems__``).

    Reading and stacking a shard happen in one call, in the reader process when there is
    one; the user's own ``__getitems__``, if the dataset has one, reads the rows.
    """

    def __init__(self, dataset: TorchDataset[Any], what: str) -> None:
        self.dataset = dataset
        self.what = what

    def __getitem__(self, index: int) -> Row:
        return check_pair(self.dataset[index], index, self.what)

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        getitems = getattr(self.dataset, "__getitems__", None)
        rows = getitems(indices) if callable(getitems) else [self.dataset[index] for index in indices]
        return _stack(rows, indices, self.what)


def _stacked(batch: Any) -> Any:
    """The loader's ``collate_fn``: :meth:`_Rows.__getitems__` has stacked the shard already."""
    return batch


class _IndexLists(Sampler[list[int]]):
    """A batch sampler: the given index lists, in order (the DataLoader asks only for ``iter``).

    ``lists`` may be replaced between epochs: the loader's main process draws the index
    lists, so a persistent loader reads the new epoch's lists without restarting its readers.
    """

    def __init__(self, lists: Iterable[list[int]] = ()) -> None:
        super().__init__()
        self.lists = lists

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.lists)


_DONE = object()


def produced_ahead(items: Iterable[Any], depth: int) -> Iterator[Any]:
    """``items`` in order, produced by a thread that stays up to ``depth`` items ahead.

    The reader of a rank whose cores are all taken by ranks: a thread needs no process
    of its own and hands a shard over as a Python reference, where a reader process
    sends it through shared memory (a file descriptor per tensor).  torch releases the
    GIL in its kernels, so the thread reads while the optimizer computes or waits in a
    collective.  An exception in the thread is raised here, at the item it stopped at;
    closing this generator early stops the thread.
    """
    ready: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as error:  # raised again in the consumer, at this item
            put((None, error))
        finally:
            close = getattr(items, "close", None)
            if callable(close):
                close()  # a generator left early releases what it holds, in this thread

    thread = threading.Thread(target=produce, name="hpcopt-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        thread.join()


class StreamedRows:
    """Rows of a map-style dataset, read only when asked for.

    Args:
        dataset: ``dataset[i]`` is the ``(input, target)`` pair of row ``i``; ``len(dataset)`` rows.
        rows: the rows of ``dataset`` this view holds, in order (``None``: all of them).
        what: names the set in error messages (``train``, ``val``).
    """

    def __init__(self, dataset: TorchDataset[Any], rows: Tensor | None = None, what: str = "train") -> None:
        self.dataset = dataset
        self.rows = rows
        self.what = what
        self._rows = _Rows(dataset, what)
        # One loader per reader count, kept across epochs so that its reader processes start
        # once per run, not once per epoch (forking a process that holds torch is not free).
        self._loaders: dict[int, tuple[DataLoader[Any], _IndexLists]] = {}
        self._reading = False

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.dataset)  # type: ignore[arg-type]

    def _dataset_rows(self, positions: Tensor) -> list[int]:
        """Indices into ``dataset`` of positions of this view."""
        return (positions if self.rows is None else self.rows[positions]).tolist()

    def subset(self, index: Tensor | slice) -> StreamedRows:
        """A view of the rows selected by a slice or an index tensor (nothing is read)."""
        positions = torch.arange(len(self))[index]
        rows = positions if self.rows is None else self.rows[positions]
        return StreamedRows(self.dataset, rows, self.what)

    def read(self, positions: Tensor) -> Dataset:
        """The rows at ``positions`` of this view, read now and stacked."""
        inputs, targets = self._rows.__getitems__(self._dataset_rows(positions))
        return Dataset(inputs, targets)

    def row(self, position: int) -> Row:
        """One row of this view as the dataset returns it (for start-up checks)."""
        index = self._dataset_rows(torch.tensor([position]))[0]
        return self._rows[index]

    def chunks(self, size: int = EVAL_CHUNK) -> Iterator[Dataset]:
        """Consecutive rows, at most ``size`` at a time, each chunk read when it is reached."""
        for start in range(0, len(self), size):
            yield self.read(torch.arange(start, min(start + size, len(self))))

    def batches(self, indices: Iterable[Tensor], num_workers: int = 0, read_ahead: int = 0) -> Iterator[Dataset]:
        """The rows of each index tensor (positions of this view) in turn, read by a ``DataLoader``.

        With ``num_workers`` > 0 that many processes read the next shards while the caller
        computes; else with ``read_ahead`` > 0 one thread of this process reads up to that
        many shards ahead (:func:`produced_ahead`); with both 0 each shard is read when it is
        reached.
        """
        if read_ahead > 0 and num_workers == 0:
            yield from produced_ahead(self.batches(indices), read_ahead)
            return
        lists = (self._dataset_rows(index) for index in indices)
        if self._reading:
            # Another read of this view is still open: it owns the kept loader, so this one
            # gets its own (a caller interleaving two epochs' batches; not hpcopt's trainer).
            loader, sampler = self._new_loader(num_workers)
        else:
            if num_workers not in self._loaders:
                self._loaders[num_workers] = self._new_loader(num_workers)
            loader, sampler = self._loaders[num_workers]
        sampler.lists = lists
        reading, self._reading = self._reading, True
        try:
            for inputs, targets in loader:
                yield Dataset(inputs, targets)
        finally:
            self._reading = reading

    def close(self) -> None:
        """End the reader processes kept between epochs (the next :meth:`batches` starts new ones)."""
        self._loaders.clear()

    def _new_loader(self, num_workers: int) -> tuple[DataLoader[Any], _IndexLists]:
        sampler = _IndexLists()
        loader = DataLoader(
            self._rows,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=_stacked,
            persistent_workers=num_workers > 0,
        )
        return loader, sampler

    @property
    def inputs(self) -> Tensor:
        """Every input of this view, read now: for small views only (a few probe rows)."""
        return self.read(torch.arange(len(self))).inputs

    @property
    def targets(self) -> Tensor:
        """Every target of this view, read now: for small views only."""
        return self.read(torch.arange(len(self))).targets

    def __repr__(self) -> str:
        return f"<StreamedRows {self.what}: {len(self)} rows of {type(self.dataset).__name__}>"
