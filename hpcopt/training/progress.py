"""Progress within an epoch of ``hpcopt train``: a tqdm bar on a terminal, plain lines in batch logs.

Owns :class:`Progress`, which the training loop calls at every step boundary
(:meth:`Progress.start_epoch`, :meth:`Progress.update`, :meth:`Progress.close`).
Only rank 0 builds an enabled one; it prints what rank 0 already holds (the
step's global loss and trust-region radius), so reporting adds no collective and
no synchronisation and cannot change the numerics.

* Interactive (rank 0's stderr is a terminal): a tqdm bar on stderr, one per
  epoch, cleared when the epoch ends so that the evaluation line stays the record.
* Otherwise (a SLURM ``.out`` file, a pipe, ``mpiexec``'s forwarded output): one
  flushed line on stdout every ``every`` steps of the epoch or ``seconds`` seconds
  since the last line, whichever comes first; stdout, because the evaluation lines
  go there too and so stay in order with them.

It may import only the standard library and tqdm (no torch, no MPI), so that it is
tested with a fake clock and a ``StringIO``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

from tqdm import tqdm


class _Bar(tqdm):
    # tqdm's default starts a monitor thread on the first bar; a thread running beside
    # MPI calls on rank 0 buys nothing here, since update() is called at every step.
    monitor_interval = 0


def _duration(seconds: float) -> str:
    """``9.8s``, ``12m03s``, ``1h02m``: short enough for a log line, exact enough for an ETA."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced stream without isatty, or a closed one
        return False


class Progress:
    """Progress of the steps of each epoch; a disabled one does nothing.

    Args:
        enabled: ``False`` on ranks other than 0 and under ``--quiet``.
        epochs: the run's last epoch, shown as ``epoch e/epochs``.
        every: a plain line every this many steps of an epoch (0: by time only).
        seconds: a plain line when this many seconds have passed since the last one
            (0: by step count only).  Checked at step boundaries, so a step longer than
            this gives one line per step, never more.
        stream: where to write; default stderr for the bar, stdout for the lines.
        interactive: bar (``True``) or lines (``False``); default: whether ``stream``
            (or, when it is not given, stderr) is a terminal.
        clock: seconds, monotonic; a fake one in tests.
        bar_refresh: least seconds between two redraws of the bar (tqdm's ``mininterval``).
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        epochs: int,
        every: int = 0,
        seconds: float = 30.0,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        clock: Callable[[], float] = time.perf_counter,
        bar_refresh: float = 0.1,
    ) -> None:
        self.enabled = enabled
        self.epochs = epochs
        self.every = every
        self.seconds = seconds
        if interactive is None:
            interactive = _is_terminal(stream if stream is not None else sys.stderr)
        self.interactive = interactive
        self.stream = stream if stream is not None else (sys.stderr if self.interactive else sys.stdout)
        self.clock = clock
        self.bar_refresh = bar_refresh
        self._bar: _Bar | None = None
        self._epoch = 0
        self._total = 0
        self._done = 0
        self._initial = 0  # steps of the epoch done before this run (resumed from a checkpoint)
        self._epoch_start = 0.0
        self._last_line = clock()

    def start_epoch(self, epoch: int, total: int, done: int = 0) -> None:
        """Epoch ``epoch`` of ``total`` steps begins, ``done`` of them already taken (by a resumed run)."""
        self.close()
        if not self.enabled:
            return
        self._epoch, self._total, self._done, self._initial = epoch, total, done, done
        self._epoch_start = self.clock()
        if self.interactive:
            self._bar = _Bar(
                total=total,
                initial=done,
                desc=f"epoch {epoch}/{self.epochs}",
                unit="step",
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
                mininterval=self.bar_refresh,
            )

    def update(self, loss: float, radius: float = math.nan) -> None:
        """One step done, with its global mini-batch loss and the radius before it (NaN: none)."""
        if not self.enabled:
            return
        self._done += 1
        if self._bar is not None:
            described = f"loss={loss:.4e}" + ("" if math.isnan(radius) else f", radius={radius:.3g}")
            # refresh=False: update() below redraws, at most every bar_refresh seconds.
            self._bar.set_postfix_str(described, refresh=False)
            self._bar.update(1)
            return
        now = self.clock()
        by_steps = self.every > 0 and self._done % self.every == 0
        by_time = self.seconds > 0 and now - self._last_line >= self.seconds
        if by_steps or by_time:
            self._last_line = now
            self.stream.write(self._line(now, loss, radius) + "\n")
            self.stream.flush()

    def close(self) -> None:
        """The epoch ended (or stopped early): clear its bar; idempotent."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _line(self, now: float, loss: float, radius: float) -> str:
        elapsed = now - self._epoch_start
        taken = self._done - self._initial
        rate = taken / elapsed if elapsed > 0 else math.nan
        eta = (self._total - self._done) / rate if rate > 0 else math.nan
        return (
            f"epoch {self._epoch:4d}/{self.epochs}  step {self._done}/{self._total}  {rate:.3g} steps/s  "
            f"elapsed {_duration(elapsed)}  eta {_duration(eta)}  loss {loss:.4e}"
            + ("" if math.isnan(radius) else f"  radius {radius:.3g}")
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
