"""Collectives on flat torch tensors over an MPI communicator, and their counters.

Optimizers never import mpi4py: they fill a flat torch buffer and call
``comm.allreduce_(buffer)`` (or one of the few other collectives below).  Every
collective is counted — calls, payload bytes and seconds per operation — and the
run log records those counters per step.

CPU tensors cross MPI zero-copy: ``tensor.numpy()`` shares the tensor's memory
and mpi4py's buffer methods (``Allreduce``, ``Bcast``, ``Allgatherv``) read and
write it in place; Python objects (configs, error messages, signatures) use the
pickle-based lower-case methods, never on a hot path.

CUDA tensors go to MPI directly when the library is CUDA-aware, else through
:class:`~hpcopt.comm.cuda_aware.HostStaging` (rank 0 prints a one-line warning
once); staging copies are counted in ``Communicator.staging``, not in the
per-operation counters.  With ``collective_timeout > 0`` the tensor collectives
and the barrier run under the watchdog of :mod:`hpcopt.comm.watchdog`.

A single process started without ``mpiexec`` is a world of size 1 (MPI
singleton init), so the same code runs unchanged.

Sub-communicators (:meth:`Communicator.split`) report to the communicator they were
split from: the same counters, host staging and watchdog setting, and failure notices
still go to rank 0 of the world.

Owns :class:`Communicator`, :class:`PackedBuffer`, :class:`PointToPointRequest` and
the counters; imports torch, :mod:`hpcopt.errors` and the other modules of
:mod:`hpcopt.comm`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hpcopt.comm import watchdog
from hpcopt.comm.cuda_aware import HostStaging, cuda_aware_mpi, synchronize
from hpcopt.comm.mpi import mpi_module
from hpcopt.errors import AbortError, HpcoptError


@dataclass(slots=True)  # updated on every collective: slots make that a little cheaper
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


class PointToPointRequest:
    """A pending ``isend``/``irecv``: keeps its tensor alive and counts the message on ``wait()``.

    Counted like the collectives, under ``send`` and ``recv`` (payload bytes, and the
    seconds spent posting plus waiting).
    """

    def __init__(
        self, stats: CommStats, op: str, nbytes: int, request: Any, tensor: torch.Tensor, posted: float
    ) -> None:
        self._stats = stats
        self._op = op
        self._nbytes = nbytes
        self._request = request
        self.tensor = tensor
        self._posted = posted
        self._done = False

    def wait(self) -> torch.Tensor:
        """Complete the message (once; later calls return at once); returns the tensor."""
        if not self._done:
            start = time.perf_counter()
            self._request.Wait()
            self._stats.record(self._op, self._nbytes, self._posted + time.perf_counter() - start)
            self._done = True
        return self.tensor


class Communicator:
    """Collectives on flat torch tensors over an MPI communicator.

    Args:
        mpi_comm: an ``mpi4py.MPI.Comm``; ``None`` means ``MPI.COMM_WORLD``.
    """

    def __init__(self, mpi_comm: Any | None = None, *, parent: Communicator | None = None) -> None:
        mpi = mpi_module()
        self._mpi = mpi
        self._comm = mpi.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank: int = self._comm.Get_rank()
        self.size: int = self._comm.Get_size()
        # A sub-communicator (split) reports to the communicator it was split from: one
        # set of counters per rank, so the run log's per-step traffic includes what goes
        # over sub-communicators, and one watchdog setting and failure-notice channel.
        self._parent = parent
        # The world communicator as a plain attribute: the hot path reads its watchdog setting.
        self._world: Communicator = self if parent is None else parent._world
        self.stats: CommStats = CommStats() if parent is None else parent.stats
        self._ops = {"sum": mpi.SUM, "max": mpi.MAX, "min": mpi.MIN}
        self._in_place = mpi.IN_PLACE
        self._views: dict[int, tuple[torch.Tensor, Any]] = {}
        self._collective_timeout = 0.0
        self._collectives = 0
        #: Device buffers that MPI cannot read go through this (see the module docstring).
        self.staging: HostStaging = HostStaging() if parent is None else parent.staging
        #: Stage CPU tensors too (tests of the staging path on machines without a GPU).
        self.force_staging = False
        self._cuda_aware: bool | None = None
        self._staging_warned = False
        self._in_staging = False

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def _top(self) -> Communicator:
        # The communicator every split descends from (the world): it owns the failure notices.
        return self if self._parent is None else self._parent._top

    @property
    def collective_timeout(self) -> float:
        """Seconds a collective may take before the watchdog aborts (0: no watchdog).

        Set on the world communicator; sub-communicators split from it follow it.
        """
        return self._top._collective_timeout

    @collective_timeout.setter
    def collective_timeout(self, seconds: float) -> None:
        self._top._collective_timeout = seconds

    @property
    def cuda_aware(self) -> bool:
        """Whether device buffers go to MPI directly (asked once, on first use)."""
        if self._parent is not None:
            return self._parent.cuda_aware
        if self._cuda_aware is None:
            self._cuda_aware = cuda_aware_mpi()
        return self._cuda_aware

    def _needs_staging(self, tensor: torch.Tensor) -> bool:
        if self.size == 1 or self._in_staging:
            return False
        if tensor.device.type == "cpu":
            return self.force_staging
        return not self.cuda_aware

    def _staged(self, collective: Any, *tensors: torch.Tensor) -> Any:
        """Run ``collective`` on host copies of ``tensors``; returns the host results."""
        top = self._top  # one warning per job, whichever communicator stages first
        if not top._staging_warned and any(t.device.type != "cpu" for t in tensors):
            top._staging_warned = True
            if top.is_root:
                os.write(2, b"hpcopt: warning: MPI is not CUDA-aware; staging device buffers through host memory\n")
        hosts = [self.staging.to_host(t, slot=f"arg{i}") for i, t in enumerate(tensors)]
        self._in_staging = True
        try:
            return collective(*hosts)
        finally:
            self._in_staging = False

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
            # Reached with a CUDA-aware MPI (or a world of one): mpi4py reads the device
            # memory through __cuda_array_interface__.  Never cached: every call synchronises.
            synchronize(tensor)
            return tensor.detach()
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
        # The hot path of every optimizer: a long-lived CPU buffer whose MPI view is
        # cached needs neither the staging test nor a new view.  Each skipped check is
        # a fraction of a microsecond, which is what a 4 kB allreduce costs in all.
        cached = self._views.get(id(buffer))
        if cached is not None and cached[0] is buffer and not self.force_staging:
            array = cached[1]
        elif self._needs_staging(buffer):
            host = self._staged(lambda staged: self.allreduce_(staged, op), buffer)
            self.staging.to_device(host, buffer)
            return buffer
        else:
            array = self._buffer(buffer, cache=reuse)
        if self.size > 1:
            start = time.perf_counter()
            if self._world._collective_timeout > 0:
                self._wait(self._comm.Iallreduce(self._in_place, array, self._ops[op]), "allreduce", array.nbytes)
            else:
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
        if self._needs_staging(buffer):
            host = self._staged(lambda staged: self.bcast_(staged, root), buffer)
            self.staging.to_device(host, buffer)
            return buffer
        array = self._buffer(buffer)
        if self.size > 1 and self.collective_timeout > 0:
            start = time.perf_counter()
            self._wait(self._comm.Ibcast(array, root), "bcast", array.nbytes)
            self.stats.record("bcast", array.nbytes, time.perf_counter() - start)
        elif self.size > 1:
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
        if self._needs_staging(local):
            # Not a hot path (start-up and diagnostics): the gathered result is a fresh tensor.
            gathered = self._staged(lambda staged: self.allgatherv(staged, counts), local)
            return gathered.to(local.device, non_blocking=False)
        out = torch.empty(sum(counts), dtype=local.dtype, device=local.device)
        send = self._buffer(local.contiguous())
        recv = self._buffer(out)
        displs = [0]
        for c in counts[:-1]:
            displs.append(displs[-1] + c)
        if self.size > 1 and self.collective_timeout > 0:
            start = time.perf_counter()
            request = self._comm.Iallgatherv(send, [recv, list(counts), displs, None])
            self._wait(request, "allgatherv", recv.nbytes)
            self.stats.record("allgatherv", recv.nbytes, time.perf_counter() - start)
        elif self.size > 1:
            self._timed("allgatherv", recv.nbytes, self._comm.Allgatherv, send, [recv, list(counts), displs, None])
        else:
            recv[:] = send
            self.stats.record("allgatherv", recv.nbytes, 0.0)
        return out

    # -- point-to-point on tensors (pipeline stages) -----------------------------

    def _p2p_buffer(self, tensor: torch.Tensor) -> Any:
        if tensor.device.type != "cpu" and not self.cuda_aware:
            raise NotImplementedError("point-to-point messages of device tensors need a CUDA-aware MPI")
        return self._buffer(tensor)

    def send_(self, tensor: torch.Tensor, dest: int, tag: int = 0) -> None:
        """Blocking send of a contiguous ``tensor`` to ``dest``."""
        array = self._p2p_buffer(tensor)
        self._timed("send", array.nbytes, self._comm.Send, array, dest, tag)

    def recv_(self, tensor: torch.Tensor, source: int, tag: int = 0) -> torch.Tensor:
        """Blocking receive into a contiguous ``tensor`` (its shape and dtype must match the send); returns it."""
        array = self._p2p_buffer(tensor)
        self._timed("recv", array.nbytes, self._comm.Recv, array, source, tag)
        return tensor

    def isend(self, tensor: torch.Tensor, dest: int, tag: int = 0) -> PointToPointRequest:
        """Non-blocking send; ``tensor`` must not change until the request's ``wait()`` returns."""
        array = self._p2p_buffer(tensor)
        start = time.perf_counter()
        request = self._comm.Isend(array, dest, tag)
        return PointToPointRequest(self.stats, "send", array.nbytes, request, tensor, time.perf_counter() - start)

    def irecv(self, tensor: torch.Tensor, source: int, tag: int = 0) -> PointToPointRequest:
        """Non-blocking receive into ``tensor``; valid after the request's ``wait()``."""
        array = self._p2p_buffer(tensor)
        start = time.perf_counter()
        request = self._comm.Irecv(array, source, tag)
        return PointToPointRequest(self.stats, "recv", array.nbytes, request, tensor, time.perf_counter() - start)

    # -- Python objects (start-up, errors, metadata; never on a hot path) ------

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        return self._comm.bcast(obj, root=root) if self.size > 1 else obj

    def allgather_object(self, obj: Any) -> list[Any]:
        return self._comm.allgather(obj) if self.size > 1 else [obj]

    def barrier(self) -> None:
        if self.size > 1 and self.collective_timeout > 0:
            self._wait(self._comm.Ibarrier(), "barrier", 0)
        elif self.size > 1:
            self._comm.Barrier()

    # -- watchdog and failure notices ------------------------------------------

    def _wait(self, request: Any, op: str, nbytes: int) -> None:
        """Complete a non-blocking collective or raise :class:`AbortError` at the deadline."""
        self._collectives += 1
        # Rank 0 owns the run log, so it should be the one that detects a stall and
        # closes the log as failed before aborting: the other ranks wait twice as long.
        seconds = self.collective_timeout * (1 if self._top.rank == 0 else 2)
        if not watchdog.complete_by_deadline(request, seconds, self._raise_on_notice):
            raise AbortError(
                f"rank {self.rank}: {op} of {nbytes} bytes (collective #{self._collectives} of this rank) "
                f"did not complete within --collective-timeout {self.collective_timeout:g}s; another rank "
                "is stalled or dead, aborting the job"
            )

    def _raise_on_notice(self) -> None:
        if self._parent is not None:
            # Notices travel on the world communicator (notify_failure is called on it).
            self._top._raise_on_notice()
            return
        if self.rank != 0:
            return
        watchdog.raise_on_failure_notice(self._comm)

    def notify_failure(self, error: BaseException) -> None:
        """Tell rank 0 that this rank is about to die of ``error`` (watchdog on only).

        Rank 0 receives the notice while waiting in its next collective, closes its run
        log as failed and aborts the job.  This rank waits for the notice to be received
        (synchronous send) and then up to ``collective_timeout`` for that abort, so the
        log is closed before ``python -m mpi4py`` aborts the job from here.  Without the
        watchdog, or on rank 0 (which closes its own log), this does nothing.
        """
        if self.size == 1 or self.rank == 0 or self.collective_timeout <= 0:
            return
        watchdog.send_failure_notice(self._comm, error, self.collective_timeout)

    def split(self, color: int, key: int | None = None) -> Communicator:
        """A sub-communicator of the ranks sharing ``color`` (ordered by ``key``, default rank).

        It shares this communicator's counters, host staging and watchdog setting.
        """
        return Communicator(self._comm.Split(color, self.rank if key is None else key), parent=self)

    def split_shared(self) -> Communicator:
        """The ranks of this node (``Split_type(COMM_TYPE_SHARED)``), ordered by rank (shares counters as ``split``)."""
        return Communicator(self._comm.Split_type(self._mpi.COMM_TYPE_SHARED, key=self.rank), parent=self)

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
