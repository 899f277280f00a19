"""What MPI this process runs on: mpi4py's version, the library's vendor and MPI standard.

Owns the read-only MPI queries of ``hpcopt info`` that are not about one
communicator (the library version string and the hostnames are
:class:`~hpcopt.comm.communicator.Communicator` methods, shared with the run log's
provenance).  Imports only :mod:`hpcopt.comm.mpi`, and mpi4py through it.
"""

from __future__ import annotations

from hpcopt.comm.mpi import mpi_module


def mpi4py_version() -> str:
    """``mpi4py.__version__``."""
    import mpi4py

    return str(mpi4py.__version__)


def mpi_vendor() -> str:
    """The MPI implementation mpi4py was built against, e.g. ``"MPICH 5.0.2"`` (``MPI.get_vendor``)."""
    name, version = mpi_module().get_vendor()
    return f"{name} {'.'.join(str(part) for part in version)}"


def mpi_standard() -> str:
    """The MPI standard level the library implements, e.g. ``"4.1"`` (``MPI.Get_version``)."""
    major, minor = mpi_module().Get_version()
    return f"{major}.{minor}"
