"""Allreduce timings for the α–β performance model (``hpcopt calibrate``).

:func:`measure_allreduce` times ``MPI_Allreduce`` of float32 messages of several
sizes on the ranks of a communicator and returns ``(ranks, bytes, seconds)``
samples; :mod:`hpcopt.analysis.perfmodel` fits latency and bandwidth to them.  The
calls are the library's own (``Allreduce`` on a zero-copy view, ``Barrier``), not
:meth:`Communicator.allreduce_`, so that the fit describes the network and MPI
rather than hpcopt's bookkeeping around them, and nothing is added to the counters.

Owns the measurement and :func:`parse_sizes`; imports torch, :mod:`hpcopt.errors`
and :mod:`hpcopt.comm.communicator`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from hpcopt.comm.communicator import Communicator
from hpcopt.errors import ConfigError

#: One timing: ``(ranks, message bytes, median seconds of the slowest rank)``.
Sample = tuple[int, float, float]

# Above this many floats a repeat costs milliseconds: a quarter of the repeats suffice.
_LARGE_MESSAGE = 1_000_000


def parse_sizes(text: str) -> list[int]:
    """Float32 counts from ``"16,1024,1e6"``.

    Raises:
        ConfigError: an entry is not a number, or a count is below 1.
    """
    try:
        sizes = [int(float(item)) for item in text.split(",")]
    except (ValueError, OverflowError):
        raise ConfigError(f"--sizes must be comma-separated float32 counts, e.g. 16,1024,1e6; got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--sizes must all be >= 1, got {text!r}")
    return sizes


def measure_allreduce(sizes: Sequence[int], repeats: int = 20, comm: Communicator | None = None) -> list[Sample]:
    """Median ``MPI_Allreduce`` time (slowest rank) per float32 message size.

    Every rank of ``comm`` (default: a new world communicator) must call this with
    the same arguments; every rank gets the same samples.  Each size is first
    reduced three times untimed (connection set-up, page faults); messages above a
    million floats are timed ``max(3, repeats // 4)`` times instead of ``repeats``.
    """
    if repeats < 1:
        raise ValueError(f"measure_allreduce needs repeats >= 1, got {repeats}")
    comm = Communicator() if comm is None else comm
    # The raw mpi4py objects: see the module docstring for why not allreduce_.
    mpi, world = comm._mpi, comm._comm
    samples: list[Sample] = []
    for count in sizes:
        buffer = torch.ones(max(int(count), 1), dtype=torch.float32).numpy()
        for _ in range(3):
            world.Allreduce(mpi.IN_PLACE, buffer, op=mpi.SUM)
        times = []
        for _ in range(repeats if count <= _LARGE_MESSAGE else max(3, repeats // 4)):
            world.Barrier()
            start = time.perf_counter()
            world.Allreduce(mpi.IN_PLACE, buffer, op=mpi.SUM)
            times.append(time.perf_counter() - start)
        samples.append((comm.size, float(buffer.nbytes), world.allreduce(statistics.median(times), op=mpi.MAX)))
    return samples
