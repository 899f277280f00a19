"""The deferred ``mpi4py`` import shared by the modules of :mod:`hpcopt.comm`.

Owns nothing but the import itself; imports only ``mpi4py``, and only when called.
Deferred so that ``hpcopt analyze``, ``hpcopt jobs`` and the pure-math tests start
without initialising MPI.
"""

from __future__ import annotations

from typing import Any


def mpi_module() -> Any:
    """``mpi4py.MPI`` (initialises MPI on the first call)."""
    from mpi4py import MPI

    return MPI
