"""Rows read on demand from a map-style ``torch.utils.data.Dataset``: :class:`StreamedRows`.

A data set that does not fit in one rank's memory is given to :func:`hpcopt.problem` as
a map-style ``Dataset`` whose ``dataset[i]`` returns one ``(input, target)`` row.
:class:`StreamedRows` stands where the in-memory :class:`~hpcopt.problems.base.Dataset`
stands and offers the same three reads, each of which touches only the rows asked for:

* :meth:`StreamedRows.batches`: this rank's shard of each global batch of an epoch,
  through a ``torch.utils.data.DataLoader`` whose batch sampler yields those index
  lists (``num_workers`` processes read ahead while the optimizer steps);
* :meth:`StreamedRows.chunks`: consecutive rows, for evaluation in bounded memory;
* :meth:`StreamedRows.subset`: a view of some rows (another :class:`StreamedRows`),
  such as this rank's slice of the validation set.

Rows are stacked with ``default_collate``, so a shard holds exactly the values the same
rows given as tensors would: the losses of a run do not depend on how its data were given.
"""

from __future__ import annotations

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


class _IndexedRows(TorchDataset[tuple[int, Row]]):
    """``dataset[i]`` with its index, so that a bad row can be named from inside a reader process."""

    def __init__(self, dataset: TorchDataset[Any], what: str) -> None:
        self.dataset = dataset
        self.what = what

    def __getitem__(self, index: int) -> tuple[int, Row]:
        return index, check_pair(self.dataset[index], index, self.what)


class _Collate:
    """Stack indexed rows into ``(inputs, targets)``; rows that disagree in shape are a :class:`DataError`."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __call__(self, rows: Sequence[tuple[int, Row]]) -> tuple[Tensor, Tensor]:
        first_index, (first_input, first_target) = rows[0]
        for index, (value, target) in rows[1:]:
            if _shape(value) != _shape(first_input) or _shape(target) != _shape(first_target):
                raise DataError(
                    f"{self.what} rows disagree in shape: row {first_index} has input {_shape(first_input)} and "
                    f"target {_shape(first_target)}, row {index} has input {_shape(value)} and target {_shape(target)}"
                )
        inputs, targets = default_collate([row for _, row in rows])
        return torch.as_tensor(inputs), torch.as_tensor(targets)


class _IndexLists(Sampler[list[int]]):
    """A batch sampler: the given index lists, in order (the DataLoader asks only for ``iter``)."""

    def __init__(self, lists: Iterable[list[int]]) -> None:
        super().__init__()
        self.lists = lists

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.lists)


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
        self._indexed = _IndexedRows(dataset, what)
        self._collate = _Collate(what)

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
        indices = self._dataset_rows(positions)
        inputs, targets = self._collate([self._indexed[i] for i in indices])
        return Dataset(inputs, targets)

    def row(self, position: int) -> Row:
        """One row of this view as the dataset returns it (for start-up checks)."""
        index = self._dataset_rows(torch.tensor([position]))[0]
        return self._indexed[index][1]

    def chunks(self, size: int = EVAL_CHUNK) -> Iterator[Dataset]:
        """Consecutive rows, at most ``size`` at a time, each chunk read when it is reached."""
        for start in range(0, len(self), size):
            yield self.read(torch.arange(start, min(start + size, len(self))))

    def batches(self, indices: Iterable[Tensor], num_workers: int = 0) -> Iterator[Dataset]:
        """The rows of each index tensor (positions of this view) in turn, read by a ``DataLoader``.

        With ``num_workers`` > 0 that many processes read the next shards while the caller
        computes; with 0 each shard is read when it is reached.
        """
        lists = (self._dataset_rows(index) for index in indices)
        loader = DataLoader(
            self._indexed,
            batch_sampler=_IndexLists(lists),
            num_workers=num_workers,
            collate_fn=self._collate,
        )
        for inputs, targets in loader:
            yield Dataset(inputs, targets)

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
