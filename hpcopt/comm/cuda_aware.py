"""Device memory and MPI: CUDA-aware detection, stream synchronisation, host staging.

Before any MPI call sees a device buffer, the stream that wrote it is synchronised
(:func:`synchronize`).  With a CUDA-aware MPI (:func:`cuda_aware_mpi`: the
``HPCOPT_CUDA_AWARE=0|1`` override, else ``MPI.Query_cuda_support`` where mpi4py
has it, else the library's ``MPIX_Query_cuda_support``) the device memory goes to
MPI directly; otherwise :class:`HostStaging` copies it through a pinned host buffer
and back.  Which of the two happens per call is the communicator's decision
(:mod:`hpcopt.comm.communicator`); this module only provides the means.

Imports torch, :mod:`hpcopt.errors` and :mod:`hpcopt.comm.mpi`.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Mapping

import torch

from hpcopt.comm.mpi import mpi_module
from hpcopt.errors import ConfigError


def _libmpi_query_cuda_support() -> bool | None:
    """``MPIX_Query_cuda_support()`` of the loaded MPI library (Open MPI, MPICH ≥ 4), if it has one."""
    paths: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "libmpi" in line and "/" in line})
    except OSError:
        pass
    for path in paths:
        try:
            query = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)
        except OSError:
            continue
        if query is not None:
            query.restype = ctypes.c_int
            query.argtypes = []
            return bool(query())
    return None


def cuda_aware_mpi(environ: Mapping[str, str] | None = None) -> bool:
    """Whether MPI may be handed CUDA device memory.

    ``HPCOPT_CUDA_AWARE=1``/``0`` decides when set; otherwise mpi4py's
    ``MPI.Query_cuda_support()`` (where available), then the library's
    ``MPIX_Query_cuda_support``; if neither answers, ``False`` (staging is always safe).

    Raises:
        ConfigError: ``HPCOPT_CUDA_AWARE`` is set to something other than 0 or 1.
    """
    value = (os.environ if environ is None else environ).get("HPCOPT_CUDA_AWARE", "").strip()
    if value in ("0", "1"):
        return value == "1"
    if value:
        raise ConfigError(f"HPCOPT_CUDA_AWARE must be 0 or 1, got {value!r}")
    query = getattr(mpi_module(), "Query_cuda_support", None)
    if query is not None:
        return bool(query())
    return bool(_libmpi_query_cuda_support())


def synchronize(tensor: torch.Tensor) -> None:
    """Wait for the current stream of ``tensor``'s device (no-op for CPU tensors)."""
    # MPI reads device memory outside CUDA's stream order: the kernels that wrote it must be done.
    if tensor.device.type == "cuda":
        torch.cuda.current_stream(tensor.device).synchronize()


class HostStaging:
    """Moves device tensors through host buffers around an MPI call (MPI without CUDA support).

    One host buffer per (slot, dtype, size) is kept and reused; it is page-locked
    (pinned) when the torch build can pin memory, else ordinary memory (CPU-only
    builds, where staging only runs in tests).

    Attributes:
        pinned: whether the last buffer allocated is pinned (``None`` before any).
        copies: device↔host copies made; bytes: their payload; seconds: their time.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, int], torch.Tensor] = {}
        self.pinned: bool | None = None
        self.copies = 0
        self.bytes = 0
        self.seconds = 0.0

    def host_buffer(self, numel: int, dtype: torch.dtype, slot: str = "data") -> torch.Tensor:
        key = (slot, dtype, numel)
        buffer = self._buffers.get(key)
        if buffer is None:
            if len(self._buffers) >= 16:
                self._buffers.clear()
            try:
                buffer = torch.empty(numel, dtype=dtype, pin_memory=True)
                self.pinned = True
            except RuntimeError:
                buffer = torch.empty(numel, dtype=dtype)
                self.pinned = False
            self._buffers[key] = buffer
        return buffer

    def to_host(self, tensor: torch.Tensor, slot: str = "data") -> torch.Tensor:
        """A host copy of ``tensor`` (flattened), complete when this returns."""
        start = time.perf_counter()
        host = self.host_buffer(tensor.numel(), tensor.dtype, slot)
        host.copy_(tensor.detach().reshape(-1), non_blocking=True)
        synchronize(tensor)
        self._count(host, start)
        return host

    def to_device(self, host: torch.Tensor, tensor: torch.Tensor) -> None:
        """Copy ``host`` back into ``tensor``; ordered on the device's stream before later work."""
        start = time.perf_counter()
        tensor.detach().view(-1).copy_(host, non_blocking=True)
        self._count(host, start)

    def _count(self, host: torch.Tensor, start: float) -> None:
        self.copies += 1
        self.bytes += host.numel() * host.element_size()
        self.seconds += time.perf_counter() - start
