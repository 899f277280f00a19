"""Graceful stop of ``hpcopt train`` on SIGTERM, SIGINT and an early-warning signal.

What a batch system sends and what a run then does:

* ``SIGTERM`` (``scancel``, the time limit, a pre-emption) and the early-warning signal
  ``--stop-signal`` (``SIGUSR1`` by default: what ``#SBATCH --signal=USR1@120`` delivers
  two minutes before the time limit) end the run as **preempted**, exit status
  :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL`` of ``sysexits.h``: "try again"), which a
  requeue wrapper recognises;
* ``SIGINT`` (Ctrl-C; ``mpiexec`` forwards it to every rank) ends it as **interrupted**,
  exit status :data:`EXIT_INTERRUPTED` (130, the shell's 128 + SIGINT).

A handler only records the signal: it runs between two Python bytecodes of the main
thread, possibly inside a collective's wait loop, where nothing else is safe.  At each
step boundary every rank calls :meth:`StopSignals.agree`, one allreduce (max) of a single
number, so every rank stops after the *same* step even when only some ranks were
signalled; the trainer then writes the checkpoint (rank 0, atomically), closes the run
log with the status and leaves with the exit status.  A signal received while the stop
is under way is recorded and changes nothing: the atomic checkpoint write and the log's
close run to their end (a second Ctrl-C to ``mpiexec`` makes *it* kill the ranks; the
previous checkpoint, or the new one, is intact either way).

A signal can come before training starts: SLURM may send the early warning up to a
minute early, and start-up (importing torch, reading data) takes a while.
:func:`caught_early`, entered by ``hpcopt train`` before anything heavy, installs the same
flag-only handlers at once; :class:`StopSignals` takes over what they noted, so such a
run stops after its first step, with a checkpoint, instead of dying of the signal.

No MPI here: the communicator is passed in (anything with ``size`` and ``allreduce_scalars``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Protocol, Self

from hpcopt.training.config import STOP_SIGNALS

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_PREEMPTED",
    "STOP_SIGNALS",
    "Stop",
    "StopSignals",
    "caught_early",
    "exit_code",
    "parse_signal",
]

#: Exit status of a run stopped by SIGTERM or the early-warning signal (``EX_TEMPFAIL``).
EXIT_PREEMPTED = 75
#: Exit status of a run stopped by SIGINT (128 + 2, as a shell reports Ctrl-C).
EXIT_INTERRUPTED = 130

# Severity of each status: the ranks' maximum wins, so one rank's Ctrl-C is everyone's.
_PREEMPTED, _INTERRUPTED = 1, 2
_STATUS = {_PREEMPTED: "preempted", _INTERRUPTED: "interrupted"}
# One float carries severity and signal number: severity * _SCALE + signum (signum < 64).
_SCALE = 100


# What the handlers of caught_early noted before training began (same encoding as below).
_noted_early = 0


def _signal_plan(early_warning: str) -> dict[signal.Signals, int]:
    """Signal → severity: SIGTERM and the early warning preempt, SIGINT interrupts."""
    try:
        warning = parse_signal(early_warning)
    except ValueError:
        warning = None  # TrainConfig.validate() reports the bad name on every rank
    plan = {signal.SIGTERM: _PREEMPTED, signal.SIGINT: _INTERRUPTED}
    if warning is not None:
        plan[warning] = _PREEMPTED
    return plan


@contextlib.contextmanager
def caught_early(early_warning: str = "USR1") -> Iterator[None]:
    """While entered, note SIGTERM, SIGINT and ``early_warning`` instead of dying of them.

    For the start of ``hpcopt train``, before its slow imports; the :class:`StopSignals`
    entered inside acts on what was noted.  The previous handlers come back on exit
    (main thread only; elsewhere nothing is installed).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    plan = _signal_plan(early_warning)

    def note(signum: int, frame: FrameType | None) -> None:
        global _noted_early
        _noted_early = max(_noted_early, plan[signal.Signals(signum)] * _SCALE + signum)

    previous = {signum: signal.signal(signum, note) for signum in plan}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Reducer(Protocol):
    @property
    def size(self) -> int: ...

    def allreduce_scalars(self, values: list[float], op: str = "sum") -> list[float]: ...


def parse_signal(name: str) -> signal.Signals | None:
    """``"USR1"`` or ``"SIGUSR1"`` → :data:`signal.SIGUSR1`; ``"none"`` → ``None``.

    Raises:
        ValueError: not one of :data:`STOP_SIGNALS` (the option's validation says so first).
    """
    short = name.upper().removeprefix("SIG")
    if short == "NONE":
        return None
    if short not in STOP_SIGNALS:
        raise ValueError(f"--stop-signal must be one of {', '.join(STOP_SIGNALS)}, got {name!r}")
    return signal.Signals[f"SIG{short}"]


@dataclass(frozen=True)
class Stop:
    """The agreed decision: which status the run log gets and which signal caused it."""

    status: str  # "preempted" or "interrupted"
    signal_name: str  # "SIGTERM", ...

    @property
    def exit_code(self) -> int:
        return exit_code(self.status)


def exit_code(status: str) -> int:
    """The process exit status of a run that ended with run-log ``status`` (0 for ``completed``)."""
    return {"preempted": EXIT_PREEMPTED, "interrupted": EXIT_INTERRUPTED}.get(status, 0)


class StopSignals:
    """Handlers for SIGTERM, SIGINT and the early-warning signal, installed while the object is entered.

    Args:
        comm: the training communicator (``agree`` allreduces over it).
        early_warning: ``--stop-signal`` (a name of :data:`STOP_SIGNALS`).

    Handlers are installed only in the main thread (Python allows no other); elsewhere
    the object still agrees, on nothing.  Leaving the ``with`` block restores the
    previous handlers, so a library caller's own Ctrl-C behaviour comes back.
    """

    def __init__(self, comm: _Reducer, early_warning: str = "USR1") -> None:
        self.comm = comm
        self.signals = _signal_plan(early_warning)
        self._received = 0  # severity * _SCALE + signum of the most severe signal so far
        self._previous: dict[signal.Signals, object] = {}
        self.stop: Stop | None = None
        #: Bytes this object's allreduces moved (kept out of the optimizer's traffic figures).
        self.bytes = 0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only an assignment: no I/O, no locks, nothing that a collective's wait loop could trip on.
        self._received = max(self._received, self.signals[signal.Signals(signum)] * _SCALE + signum)

    def __enter__(self) -> Self:
        global _noted_early
        self._received, _noted_early = max(self._received, _noted_early), 0
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def received(self) -> bool:
        """Whether this rank has seen a stop signal (local; :meth:`agree` decides)."""
        return self._received > 0

    def agree(self) -> Stop | None:
        """Collective (every rank, at the same step boundary): the stop every rank takes, or ``None``.

        Once a stop is agreed it stays agreed, and no further collective is made.
        """
        if self.stop is not None:
            return self.stop
        value = float(self._received)
        if self.comm.size > 1:
            value = self.comm.allreduce_scalars([value], op="max")[0]
            self.bytes += 8
        code = int(value)
        if code == 0:
            return None
        self.stop = Stop(_STATUS[code // _SCALE], signal.Signals(code % _SCALE).name)
        return self.stop
