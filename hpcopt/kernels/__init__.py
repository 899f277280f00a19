"""Fused vector kernels behind one interface, chosen once from where the parameters live.

``select_backend(device)`` returns

* :class:`~hpcopt.kernels.cpu.CpuKernels` (torch twins) for CPU parameters, and
  for CUDA parameters when CuPy is not installed (torch ops run on the GPU, one
  kernel per operation; a one-line note says so);
* :class:`~hpcopt.kernels.cuda.CudaKernels` (``kernels/*.cu`` through
  ``cupy.RawModule``) for CUDA parameters with CuPy installed.

Both compute the same functions (see ``docs/gpu.md``); the test suite
compares them on a GPU and compares the twins with float64 references everywhere.
The kernels compute local quantities only; reductions over ranks stay in
:mod:`hpcopt.comm`.  It may import torch and :mod:`hpcopt.errors` (CuPy lazily).

``fused_backend(device)`` is what the optimizers call, once, on the device of the
flat parameters: the CUDA kernels where they exist, else ``None``, meaning "keep
the plain torch code".  The twins are not used on the hot paths by default: the
plain code is what the CPU results (bit-exact restarts, rank invariance) were
established with, and the twins' float64 sums would change the last bits.
Tests inject :class:`CpuKernels` explicitly to run the fused code paths on CPU.
"""

from __future__ import annotations

import sys

import torch

from hpcopt.errors import ConfigError
from hpcopt.kernels.cpu import CpuKernels, dot64, neumann_coefficient
from hpcopt.kernels.cuda import CudaKernels, import_cupy

_warned = False

Kernels = CpuKernels | CudaKernels

__all__ = ["CpuKernels", "CudaKernels", "Kernels", "dot64", "fused_backend", "neumann_coefficient", "select_backend"]


def select_backend(device: torch.device | str, *, require_cuda_kernels: bool = False) -> CpuKernels | CudaKernels:
    """The kernel backend for parameters on ``device``.

    Args:
        device: where the parameters live.
        require_cuda_kernels: on a CUDA device, raise (instead of falling back to
            the torch twins) when CuPy is missing.

    Raises:
        ConfigError: ``require_cuda_kernels`` and CuPy cannot be imported.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return CpuKernels()
    try:
        import_cupy()
    except ConfigError:
        if require_cuda_kernels:
            raise
        global _warned
        if not _warned:
            _warned = True
            sys.stderr.write("hpcopt: CuPy not installed; GPU vector updates use unfused torch ops\n")
        return CpuKernels()
    return CudaKernels(device)


def fused_backend(device: torch.device | str) -> CudaKernels | None:
    """The kernels the optimizers' hot paths use for parameters on ``device``, or ``None``.

    ``None`` (CPU parameters, or CUDA without CuPy) keeps the plain torch code:
    on CPU the twins would only repeat it with float64 sums, and on a GPU without
    CuPy they are the same unfused torch ops.  Unlike :func:`select_backend` it
    writes nothing: every rank calls it, and rank 0 reports the choice.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        import_cupy()
    except ConfigError:
        return None
    return CudaKernels(device)
