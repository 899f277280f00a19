"""The communication layer: the only package that imports mpi4py.

Owns every collective and point-to-point message on torch tensors
(:mod:`~hpcopt.comm.communicator`), CUDA-aware detection and host staging
(:mod:`~hpcopt.comm.cuda_aware`), the collective watchdog
(:mod:`~hpcopt.comm.watchdog`), the allreduce timings of ``hpcopt calibrate``
(:mod:`~hpcopt.comm.calibration`) and the MPI queries of ``hpcopt info``
(:mod:`~hpcopt.comm.provenance`).  It may import :mod:`hpcopt.errors` and torch
only; mpi4py itself is imported on first use (:mod:`~hpcopt.comm.mpi`), so importing
this package does not initialise MPI.
"""

from hpcopt.comm.calibration import Sample, measure_allreduce, parse_sizes
from hpcopt.comm.communicator import CommStats, Communicator, OpCounter, PackedBuffer, PointToPointRequest
from hpcopt.comm.cuda_aware import HostStaging, cuda_aware_mpi, synchronize
from hpcopt.comm.provenance import mpi4py_version, mpi_standard, mpi_vendor

__all__ = [
    "CommStats",
    "Communicator",
    "HostStaging",
    "OpCounter",
    "PackedBuffer",
    "PointToPointRequest",
    "Sample",
    "cuda_aware_mpi",
    "measure_allreduce",
    "mpi4py_version",
    "mpi_standard",
    "mpi_vendor",
    "parse_sizes",
    "synchronize",
]
