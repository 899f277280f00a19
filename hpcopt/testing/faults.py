"""Fault injection for the reliability tests: the one place that reads ``HPCOPT_FAULT``.

``HPCOPT_FAULT="rank=1,step=3,where=curvature,kind=raise"`` makes rank 1 raise when it
reaches the hook ``curvature`` during step 3.  Fields (all optional except ``where``):

* ``rank``: a rank number or ``all`` (default ``all``);
* ``step``: the 1-based global step, or ``all`` (default ``all``);
* ``where``: a hook name — ``gradient`` (local value and gradient), ``trial`` (local
  value at a trial point), ``curvature`` (local curvature operator), ``local_solve``
  (start of the APTS-D local phase), ``checkpoint`` (rank 0 between writing a
  checkpoint's temporary file and renaming it);
* ``kind``: ``raise`` (default: an unhandled ``RuntimeError``), ``nan`` / ``inf``
  (the hook's value becomes NaN / +Inf), ``noise`` (the value is perturbed by a
  rank-dependent relative 1e-6), ``hang`` (sleep for ``seconds``, default 3600, at the
  first matching call of each step: an optimizer that computes several gradients a step
  still pauses once), ``exit`` (``os._exit(1)``, a rank vanishing without MPI_Abort) or ``sigkill``.

Several faults are separated by ``;``.  The variable is read by :func:`check_environment`,
which ``hpcopt train`` calls with its other start-up checks, so a malformed value is a
one-line :class:`~hpcopt.errors.ConfigError` on every rank before any file is created
(or, without that call, when a hook first runs; never at import).  Unset (the normal
case), a hook is a global lookup, an identity test and a return: the hooks sit on the
hot path of every step.  Tests may call
:func:`configure` instead of setting the environment variable.

Owns the fault plan and the hooks' behaviour; imports :mod:`hpcopt.errors` only.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import overload

from hpcopt.errors import ConfigError

ENV = "HPCOPT_FAULT"
HOOKS = ("gradient", "trial", "curvature", "local_solve", "checkpoint")
KINDS = ("raise", "nan", "inf", "noise", "hang", "exit", "sigkill")


class InjectedFault(RuntimeError):
    """The exception ``kind=raise`` throws (deliberately not an HpcoptError: it is a "bug")."""


@dataclass(frozen=True)
class Fault:
    where: str
    rank: int | None = None  # None: every rank
    step: int | None = None  # None: every step
    kind: str = "raise"
    seconds: float = 3600.0


class _Unread:
    """Marks a plan not yet read from the environment."""


_UNREAD = _Unread()
# None: no faults (the hooks return at once); a tuple: the faults to apply.
_plan: tuple[Fault, ...] | _Unread | None = _UNREAD
# (index in the plan, step) of every hang already served: a hang pauses a step once.
_hung: set[tuple[int, int]] = set()


def parse(spec: str) -> list[Fault]:
    """``"rank=1,step=3,where=curvature"`` (``;``-separated for several) → faults.

    Raises:
        ConfigError: a part is not ``key=value`` pairs naming a known hook and kind.
    """
    faults: list[Fault] = []
    for part in spec.split(";"):
        if not part.strip():
            continue
        fields: dict[str, str] = {}
        for item in part.split(","):
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"{ENV}: expected key=value, got {item!r}")
            fields[key.strip()] = value.strip()
        where = fields.pop("where", "")
        rank = fields.pop("rank", "all")
        step = fields.pop("step", "all")
        kind = fields.pop("kind", "raise")
        seconds = fields.pop("seconds", "3600")
        if where not in HOOKS or kind not in KINDS or fields:
            raise ConfigError(f"{ENV}: bad fault {part!r} (where: {', '.join(HOOKS)}; kind: {', '.join(KINDS)})")
        try:
            fault = Fault(
                where=where,
                rank=None if rank == "all" else int(rank),
                step=None if step == "all" else int(step),
                kind=kind,
                seconds=float(seconds),
            )
        except ValueError:
            raise ConfigError(
                f"{ENV}: bad fault {part!r} (rank and step: an integer or all; seconds: a number)"
            ) from None
        faults.append(fault)
    return faults


def _set(spec: str) -> tuple[Fault, ...] | None:
    global _plan
    plan = tuple(parse(spec)) or None
    _plan = plan
    _hung.clear()
    return plan


def configure(spec: str | None) -> None:
    """Replace the active faults (``None`` or ``""``: none, and ``HPCOPT_FAULT`` is not read); for tests."""
    _set(spec or "")


def check_environment() -> None:
    """Read ``HPCOPT_FAULT`` now unless a plan is set already; :class:`ConfigError` if it is malformed."""
    if isinstance(_plan, _Unread):
        _set(os.environ.get(ENV, ""))


def reset() -> None:
    """Forget the active faults; the next hook reads ``HPCOPT_FAULT`` again."""
    global _plan
    _plan = _UNREAD
    _hung.clear()


@overload
def inject(where: str, rank: int, step: int, value: float) -> float: ...


@overload
def inject(where: str, rank: int, step: int, value: None = None) -> None: ...


def inject(where: str, rank: int, step: int, value: float | None = None) -> float | None:
    """Apply the faults matching ``(where, rank, step)`` to ``value`` (returned, maybe altered).

    Raises:
        ConfigError: on the first call, when ``HPCOPT_FAULT`` is malformed (and on
            every later call until it is fixed or :func:`configure` is called).
    """
    plan = _plan
    if plan is None:
        return value
    if isinstance(plan, _Unread):
        plan = _set(os.environ.get(ENV, ""))
        if plan is None:
            return value
    for index, fault in enumerate(plan):
        if fault.where != where or fault.rank not in (None, rank) or fault.step not in (None, step):
            continue
        if fault.kind == "raise":
            raise InjectedFault(f"injected fault on rank {rank} at step {step} in {where}")
        if fault.kind == "hang":
            if (index, step) not in _hung:
                _hung.add((index, step))
                time.sleep(fault.seconds)
        elif fault.kind == "exit":
            # The launcher kills the other ranks at once (SIGKILL, no message of its own):
            # this line is all the job's output will say about why it ended.
            os.write(2, f"hpcopt: injected fault: rank {rank} exits with status 1 at step {step} in {where}\n".encode())
            os._exit(1)
        elif fault.kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif value is not None:
            if fault.kind == "nan":
                value = float("nan")
            elif fault.kind == "inf":
                value = float("inf")
            elif fault.kind == "noise":
                value = value * (1.0 + 1e-6 * (rank + 1))
    return value
