"""The collective watchdog: a deadline on non-blocking collectives, and failure notices.

With ``collective_timeout > 0`` the communicator starts its tensor collectives and
its barrier non-blocking (``Iallreduce``, ``Ibcast``, ``Iallgatherv``, ``Ibarrier``)
and hands the request to :func:`complete_by_deadline`, a ``Test`` loop that gives up
at the deadline; the communicator then raises :class:`~hpcopt.errors.AbortError`
naming the operation and the rank.  While it waits, rank 0 also looks for failure
notices (:func:`send_failure_notice`, received by :func:`raise_on_failure_notice`)
from ranks that are about to die, so that it can close its run log as failed before
the job is aborted.  The pickle-based object collectives stay blocking (start-up only).

Owns the wait loop, its timing constants and the notice protocol; imports
:mod:`hpcopt.errors` and :mod:`hpcopt.comm.mpi`, and works on raw mpi4py objects
handed in by :mod:`hpcopt.comm.communicator`.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from typing import Any

from hpcopt.comm.mpi import mpi_module
from hpcopt.errors import AbortError

# Point-to-point tag of the failure notices a failing rank sends to rank 0.
FAILURE_TAG = 7077
# While waiting on a collective: spin on Test for this long, then yield the core
# between Tests (ranks often share cores), and look for failure notices this often.
# Yield, not sleep: a non-blocking collective only progresses inside Test, so a
# sleep between Tests stretches every pipelined chunk of a large message by the
# sleep (measured: +11 % per APTS-D step of a 390k-parameter CNN with a 50 us sleep).
# sched_yield returns at once when no other process wants the core, like MPI's own spin.
_SPIN_SECONDS = 1e-3
_NOTICE_INTERVAL = 5e-3
_yield_core = getattr(os, "sched_yield", lambda: time.sleep(0))


def complete_by_deadline(request: Any, seconds: float, poll: Callable[[], None]) -> bool:
    """Test ``request`` until it completes (``True``) or ``seconds`` have passed (``False``).

    ``poll`` runs every few milliseconds while waiting (rank 0 checks for failure
    notices there and may raise); the deadline is only checked right after it.
    """
    start = time.perf_counter()
    deadline = start + seconds
    next_poll = start + _NOTICE_INTERVAL
    while not request.Test():
        now = time.perf_counter()
        if now >= next_poll:
            next_poll = now + _NOTICE_INTERVAL
            poll()
            if now >= deadline:
                return False
        if now - start > _SPIN_SECONDS:
            _yield_core()
    return True


def raise_on_failure_notice(mpi_comm: Any) -> None:
    """Raise :class:`AbortError` if a failure notice waits on ``mpi_comm`` (called on rank 0)."""
    mpi = mpi_module()
    status = mpi.Status()
    if mpi_comm.iprobe(source=mpi.ANY_SOURCE, tag=FAILURE_TAG, status=status):
        source = status.Get_source()
        message = mpi_comm.recv(source=source, tag=FAILURE_TAG)
        raise AbortError(f"rank {source} failed: {message}")


def send_failure_notice(mpi_comm: Any, error: BaseException, seconds: float) -> None:
    """Send ``error`` to rank 0 of ``mpi_comm`` and wait ``seconds`` for the job to be aborted.

    The send is synchronous, so the wait starts once rank 0 holds the notice; rank
    0's ``MPI_Abort`` normally ends this process before the deadline.
    """
    text = "".join(traceback.format_exception_only(error)).strip()
    request = mpi_comm.issend(text, dest=0, tag=FAILURE_TAG)
    deadline = time.perf_counter() + seconds
    while not request.Test() and time.perf_counter() < deadline:
        time.sleep(1e-3)
    while time.perf_counter() < deadline:
        time.sleep(1e-2)  # rank 0 is closing its log; its MPI_Abort ends this process
