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
  rank-dependent relative 1e-6), ``hang`` (sleep for ``seconds``, default 3600),
  ``exit`` (``os._exit(1)``, a rank vanishing without MPI_Abort) or ``sigkill``.

Several faults are separated by ``;``.  Unset (the normal case), every hook is a
dictionary lookup and a return.  Tests may call :func:`configure` instead of setting
the environment variable.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

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


def parse(spec: str) -> list[Fault]:
    """``"rank=1,step=3,where=curvature"`` (``;``-separated for several) → faults."""
    faults: list[Fault] = []
    for part in spec.split(";"):
        if not part.strip():
            continue
        fields: dict[str, str] = {}
        for item in part.split(","):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"{ENV}: expected key=value, got {item!r}")
            fields[key.strip()] = value.strip()
        where = fields.pop("where", "")
        rank = fields.pop("rank", "all")
        step = fields.pop("step", "all")
        kind = fields.pop("kind", "raise")
        seconds = float(fields.pop("seconds", "3600"))
        if where not in HOOKS or kind not in KINDS or fields:
            raise ValueError(f"{ENV}: bad fault {part!r} (where: {', '.join(HOOKS)}; kind: {', '.join(KINDS)})")
        faults.append(
            Fault(
                where=where,
                rank=None if rank == "all" else int(rank),
                step=None if step == "all" else int(step),
                kind=kind,
                seconds=seconds,
            )
        )
    return faults


_active: list[Fault] = parse(os.environ.get(ENV, ""))


def configure(spec: str | None) -> None:
    """Replace the active faults (``None`` or ``""``: none); for tests."""
    global _active
    _active = parse(spec or "")


def inject(where: str, rank: int, step: int, value: float | None = None) -> float | None:
    """Apply the faults matching ``(where, rank, step)`` to ``value`` (returned, maybe altered)."""
    if not _active:
        return value
    for fault in _active:
        if fault.where != where or fault.rank not in (None, rank) or fault.step not in (None, step):
            continue
        if fault.kind == "raise":
            raise InjectedFault(f"injected fault on rank {rank} at step {step} in {where}")
        if fault.kind == "hang":
            time.sleep(fault.seconds)
        elif fault.kind == "exit":
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
