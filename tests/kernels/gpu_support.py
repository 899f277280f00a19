"""Whether the CUDA kernel tests can run here: a GPU that torch sees, and CuPy seeing a device."""

from __future__ import annotations

import pytest
import torch


def cuda_kernels_unavailable() -> str:
    """Why the CUDA kernels cannot run on this machine; ``""`` when they can."""
    if not torch.cuda.is_available():
        return "no GPU: torch.cuda.is_available() is False"
    try:
        import cupy
    except ImportError:
        return "no GPU kernels: CuPy not installed (pip install 'hpcopt[gpu]')"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA device"
    except Exception as exc:  # cupy raises its own CUDARuntimeError types
        return f"CuPy cannot see a device: {exc}"
    return ""


_REASON = cuda_kernels_unavailable()
needs_gpu = pytest.mark.skipif(bool(_REASON), reason=_REASON or "GPU available")
