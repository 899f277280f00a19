"""The only module that touches MPI.

Optimizers never import mpi4py: they fill a flat torch buffer and call
``comm.allreduce_(buffer)`` (or one of the few other collectives below).  Every
collective is counted — calls, payload bytes and seconds per operation — and the
run log records those counters per step.

CPU tensors cross MPI zero-copy: ``tensor.numpy()`` shares the tensor's memory
and mpi4py's buffer methods (``Allreduce``, ``Bcast``, ``Allgatherv``) read and
write it in place; Python objects (configs, error messages, signatures) use the
pickle-based lower-case methods, never on a hot path.

A single process started without ``mpiexec`` is a world of size 1 (MPI
singleton init), so the same code runs unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hpcopt.errors import HpcoptError


def _mpi() -> Any:
    # Imported lazily so that `hpcopt analyze` and pure-math tests start without MPI.
    from mpi4py import MPI

    return MPI


@dataclass
class OpCounter:
    """Calls, payload bytes and seconds spent in one kind of collective."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0


@dataclass
class CommStats:
    """Per-operation counters of the collectives this rank entered."""

    ops: dict[str, OpCounter] = field(default_factory=dict)

    def record(self, op: str, nbytes: int, seconds: float) -> None:
        counter = self.ops.get(op)
        if counter is None:
            counter = self.ops[op] = OpCounter()
        counter.calls += 1
        counter.bytes += nbytes
        counter.seconds += seconds

    @property
    def calls(self) -> int:
        return sum(c.calls for c in self.ops.values())

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.ops.values())

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.ops.values())

    def totals(self) -> tuple[int, int, float]:
        """``(calls, bytes, seconds)`` over all operations so far."""
        return self.calls, self.bytes, self.seconds


class PackedBuffer:
    """One contiguous buffer ``[vector (n); scalars (k)]`` moved by one collective.

    ``vector`` and ``scalars`` are views, so filling them and calling
    ``comm.allreduce_(packed.data)`` reduces a gradient and its loss (or a step and
    its predicted reduction) in a single message.
    """

    def __init__(self, n: int, k: int, *, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.data = torch.zeros(n + k, dtype=dtype, device=device)
        self.vector = self.data[:n]
        self.scalars = self.data[n:]


class Communicator:
    """Collectives on flat torch tensors over an MPI communicator.

    Args:
        mpi_comm: an ``mpi4py.MPI.Comm``; ``None`` means ``MPI.COMM_WORLD``.
    """

    def __init__(self, mpi_comm: Any | None = None) -> None:
        mpi = _mpi()
        self._mpi = mpi
        self._comm = mpi.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank: int = self._comm.Get_rank()
        self.size: int = self._comm.Get_size()
        self.stats = CommStats()
        self._ops = {"sum": mpi.SUM, "max": mpi.MAX, "min": mpi.MIN}
        self._in_place = mpi.IN_PLACE
        self._views: dict[int, tuple[torch.Tensor, Any]] = {}

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # -- buffers -------------------------------------------------------------

    def _buffer(self, tensor: torch.Tensor, *, cache: bool = False) -> Any:
        # The numpy view of a long-lived buffer is cached by identity: optimizers reuse
        # the same packed buffers every step, and building a view costs about a
        # microsecond.  Temporary tensors are not cached (the cache keeps them alive).
        key = id(tensor)
        cached = self._views.get(key)
        if cached is not None and cached[0] is tensor:
            return cached[1]
        if not tensor.is_contiguous():
            raise ValueError("collectives need a contiguous tensor")
        if tensor.device.type != "cpu":
            # Device buffers (CUDA-aware MPI or host staging) arrive with the GPU path.
            raise NotImplementedError("collectives on device tensors are not supported yet")
        array = tensor.detach().numpy()
        if cache:
            if len(self._views) >= 16:
                self._views.clear()
            self._views[key] = (tensor, array)
        return array

    def _timed(self, op: str, nbytes: int, fn: Any, *args: Any) -> Any:
        start = time.perf_counter()
        result = fn(*args)
        self.stats.record(op, nbytes, time.perf_counter() - start)
        return result

    # -- collectives on tensors ----------------------------------------------

    def allreduce_(self, buffer: torch.Tensor, op: str = "sum", *, reuse: bool = True) -> torch.Tensor:
        """Reduce ``buffer`` over all ranks in place (``sum``, ``max`` or ``min``); returns it.

        ``reuse`` (default) marks ``buffer`` as long-lived, so its MPI view is cached.
        """
        array = self._buffer(buffer, cache=reuse)
        if self.size > 1:
            start = time.perf_counter()
            self._comm.Allreduce(self._in_place, array, self._ops[op])
            self.stats.record("allreduce", array.nbytes, time.perf_counter() - start)
        else:
            self.stats.record("allreduce", array.nbytes, 0.0)
        return buffer

    def allreduce_scalars(self, values: Sequence[float], op: str = "sum") -> list[float]:
        """Reduce a few float64 scalars in one message (for decisions and metrics)."""
        buffer = torch.tensor(list(values), dtype=torch.float64)
        self.allreduce_(buffer, op, reuse=False)
        return buffer.tolist()

    def bcast_(self, buffer: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Broadcast ``buffer`` from ``root`` in place; returns it."""
        array = self._buffer(buffer)
        if self.size > 1:
            self._timed("bcast", array.nbytes, self._comm.Bcast, array, root)
        else:
            self.stats.record("bcast", array.nbytes, 0.0)
        return buffer

    def allgatherv(self, local: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Concatenate every rank's 1-D ``local`` (rank r contributes ``counts[r]`` elements)."""
        if len(counts) != self.size:
            raise ValueError(f"allgatherv needs one count per rank, got {len(counts)} for {self.size}")
        if local.numel() != counts[self.rank]:
            raise ValueError(f"rank {self.rank} holds {local.numel()} elements, counts say {counts[self.rank]}")
        out = torch.empty(sum(counts), dtype=local.dtype, device=local.device)
        send = self._buffer(local.contiguous())
        recv = self._buffer(out)
        displs = [0]
        for c in counts[:-1]:
            displs.append(displs[-1] + c)
        if self.size > 1:
            self._timed("allgatherv", recv.nbytes, self._comm.Allgatherv, send, [recv, list(counts), displs, None])
        else:
            recv[:] = send
            self.stats.record("allgatherv", recv.nbytes, 0.0)
        return out

    # -- Python objects (start-up, errors, metadata; never on a hot path) ------

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        return self._comm.bcast(obj, root=root) if self.size > 1 else obj

    def allgather_object(self, obj: Any) -> list[Any]:
        return self._comm.allgather(obj) if self.size > 1 else [obj]

    def barrier(self) -> None:
        if self.size > 1:
            self._comm.Barrier()

    def split(self, color: int, key: int | None = None) -> Communicator:
        """A sub-communicator of the ranks sharing ``color`` (ordered by ``key``, default rank)."""
        return Communicator(self._comm.Split(color, self.rank if key is None else key))

    def agree(self, error: HpcoptError | None) -> None:
        """Make a local input error everybody's error.

        Bad input is usually seen identically by every rank (same options, same
        files), but a file visible to only some nodes, or a rank-dependent check,
        would otherwise leave the other ranks waiting in the next collective.
        Every rank calls this at the same point; if any rank failed, every rank
        raises, naming the first failing rank.
        """
        errors = self.allgather_object(None if error is None else (type(error), str(error)))
        for rank, item in enumerate(errors):
            if item is not None:
                kind, message = item
                if error is not None:
                    raise error
                where = f" (on rank {rank})" if self.size > 1 else ""
                raise kind(f"{message}{where}")

    # -- provenance ----------------------------------------------------------

    def library_version(self) -> str:
        return str(self._mpi.Get_library_version()).strip().splitlines()[0]

    def hostnames(self) -> list[str]:
        return self.allgather_object(self._mpi.Get_processor_name())

    def abort(self, code: int = 1) -> None:
        self._comm.Abort(code)
