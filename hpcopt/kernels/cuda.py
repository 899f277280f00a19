"""CUDA kernels of ``kernels/*.cu``, compiled at run time with ``cupy.RawModule``.

CuPy is imported lazily (it is the optional ``gpu`` extra).  Each ``.cu`` file is
compiled once per process and device by NVRTC on first use and cached in
:data:`_MODULES`; CuPy also keeps its own on-disk cache of compiled modules.

Tensors are handed to CuPy zero-copy through ``__cuda_array_interface__`` and
every launch goes onto torch's current stream of the tensors' device, so a kernel
is ordered after the torch work that produced its inputs.  Methods that return
sums read them back to the host, which waits for that stream.

Where the ``.cu`` files are found (first hit wins):

1. ``$HPCOPT_KERNEL_DIR``;
2. ``kernels/`` beside the ``hpcopt`` package (a source checkout or an editable
   install);
3. ``<sys.prefix>/share/hpcopt/kernels`` (where ``pip install .`` puts them, see
   ``data_files`` in ``setup.py``).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hpcopt.errors import ConfigError

KERNEL_FILES = ("reduce.cu", "cg.cu", "pack.cu", "updates.cu")
BLOCK = 256  # HPCOPT_BLOCK in kernels/common.cuh
MAX_BLOCKS = 1024  # fixed cap: the launch shape, hence the reduction order, depends on n only

_MODULES: dict[tuple[str, int], Any] = {}


def kernel_dir() -> Path:
    """The directory holding the ``.cu`` files (see the module docstring for the order)."""
    candidates = []
    if os.environ.get("HPCOPT_KERNEL_DIR"):
        candidates.append(Path(os.environ["HPCOPT_KERNEL_DIR"]))
    candidates.append(Path(__file__).resolve().parents[2] / "kernels")
    candidates.append(Path(sys.prefix) / "share" / "hpcopt" / "kernels")
    for path in candidates:
        if all((path / name).is_file() for name in KERNEL_FILES):
            return path
    raise ConfigError(
        f"hpcopt's CUDA sources ({', '.join(KERNEL_FILES)}) were not found in "
        f"{', '.join(str(p) for p in candidates)}; set HPCOPT_KERNEL_DIR to the kernels/ directory"
    )


def import_cupy() -> Any:
    """``cupy``, or a :class:`ConfigError` naming the extra to install."""
    try:
        import cupy
    except ImportError as exc:
        raise ConfigError("the CUDA kernels need CuPy: pip install 'hpcopt[gpu]'") from exc
    return cupy


def _suffix(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "f32"
    if dtype == torch.float64:
        return "f64"
    raise ConfigError(f"CUDA kernels support float32 and float64, not {dtype}")


class CudaKernels:
    """The kernel interface of :class:`~hpcopt.kernels.cpu.CpuKernels`, fused, on one CUDA device."""

    name = "cuda"

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ConfigError(f"CudaKernels needs a CUDA device, got {self.device}")
        self._cp = import_cupy()
        self._dir = kernel_dir()
        self._index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self._partials: dict[int, Any] = {}

    # -- plumbing ----------------------------------------------------------------

    def _function(self, file: str, name: str) -> Any:
        key = (file, self._index)
        module = _MODULES.get(key)
        if module is None:
            with self._cp.cuda.Device(self._index):
                source = (self._dir / file).read_text()
                module = self._cp.RawModule(code=source, options=("-std=c++17", f"-I{self._dir}"))
            _MODULES[key] = module
        return module.get_function(name)

    def _array(self, tensor: Tensor) -> Any:
        if tensor.device != self.device and not (tensor.is_cuda and tensor.device.index == self._index):
            raise ValueError(f"tensor on {tensor.device}, kernels on {self.device}")
        if not tensor.is_contiguous():
            raise ValueError("kernels need contiguous tensors")
        return self._cp.asarray(tensor.detach())

    def _scalar(self, dtype: torch.dtype, value: float) -> Any:
        import numpy as np

        return np.float32(value) if dtype == torch.float32 else np.float64(value)

    @staticmethod
    def _blocks(n: int) -> int:
        return max(1, min(MAX_BLOCKS, math.ceil(n / BLOCK)))

    def _launch(self, file: str, name: str, n: int, args: tuple[Any, ...], nsums: int) -> list[float]:
        """Launch ``name`` over ``n`` elements; reduce its ``nsums`` partial sums (if any)."""
        import numpy as np

        blocks = self._blocks(n)
        stream = self._cp.cuda.ExternalStream(torch.cuda.current_stream(self.device).cuda_stream)
        with self._cp.cuda.Device(self._index), stream:
            if nsums == 0:
                self._function(file, name)((blocks,), (BLOCK,), args)
                return []
            partials = self._partials.get(nsums * blocks)
            if partials is None:
                partials = self._partials[nsums * blocks] = self._cp.empty(nsums * blocks, dtype=self._cp.float64)
            out = self._cp.empty(nsums, dtype=self._cp.float64)
            self._function(file, name)((blocks,), (BLOCK,), (*args, partials))
            self._function("reduce.cu", "reduce_partials")((nsums,), (BLOCK,), (partials, np.int32(blocks), out))
            return [float(v) for v in out.get(stream=stream)]

    # -- the interface -------------------------------------------------------------

    def cg_step_(self, x: Tensor, r: Tensor, p: Tensor, ap: Tensor, alpha: float) -> float:
        import numpy as np

        n = x.numel()
        args = (*map(self._array, (x, r, p, ap)), self._scalar(x.dtype, alpha), np.int64(n))
        return self._launch("cg.cu", f"cg_step_{_suffix(x.dtype)}", n, args, 1)[0]

    def cg_direction_(self, p: Tensor, z: Tensor, w: Tensor, beta: float) -> tuple[float, float]:
        import numpy as np

        n = p.numel()
        args = (*map(self._array, (p, z, w)), self._scalar(p.dtype, beta), np.int64(n))
        pp, wp = self._launch("cg.cu", f"cg_direction_{_suffix(p.dtype)}", n, args, 2)
        return pp, wp

    def pack(self, out: Tensor, vector: Tensor, scalars: Tensor, scale: float = 1.0) -> Tensor:
        import numpy as np

        n, k = vector.numel(), scalars.numel()
        args = (
            *map(self._array, (out, vector)),
            self._scalar(out.dtype, scale),
            np.int64(n),
            self._array(scalars),
            np.int32(k),
        )
        self._launch("pack.cu", f"pack_{_suffix(out.dtype)}", n + k, args, 0)
        return out

    def unpack(self, buffer: Tensor, vector: Tensor, scalars: Tensor, scale: float = 1.0) -> None:
        import numpy as np

        n, k = vector.numel(), scalars.numel()
        args = (
            *map(self._array, (buffer, vector)),
            self._scalar(buffer.dtype, scale),
            np.int64(n),
            self._array(scalars),
            np.int32(k),
        )
        self._launch("pack.cu", f"unpack_{_suffix(buffer.dtype)}", n + k, args, 0)

    def nlcg_dots(self, s: Tensor, g: Tensor, g_prev: Tensor, h: Tensor) -> tuple[float, float]:
        import numpy as np

        n = s.numel()
        args = (*map(self._array, (s, g, g_prev, h)), np.int64(n))
        ys, shs = self._launch("updates.cu", f"nlcg_dots_{_suffix(s.dtype)}", n, args, 2)
        return ys, shs

    def nlcg_precondition_(
        self,
        h: Tensor,
        z: Tensor,
        g: Tensor,
        g_prev: Tensor,
        s: Tensor,
        ys: float,
        shs: float,
        *,
        update: bool,
        eps: float = 1e-8,
    ) -> tuple[float, float]:
        import numpy as np

        n, dtype = h.numel(), h.dtype
        args = (
            *map(self._array, (h, z, g, g_prev, s)),
            self._scalar(dtype, ys),
            self._scalar(dtype, shs),
            self._scalar(dtype, eps),
            np.int32(1 if update else 0),
            np.int64(n),
        )
        rz, rz_prev = self._launch("updates.cu", f"nlcg_precondition_{_suffix(dtype)}", n, args, 2)
        return rz, rz_prev

    def nlcg_step_(self, theta: Tensor, d: Tensor, s: Tensor, z: Tensor, beta: float, step_size: float) -> float:
        import numpy as np

        n, dtype = theta.numel(), theta.dtype
        args = (
            *map(self._array, (theta, d, s, z)),
            self._scalar(dtype, beta),
            self._scalar(dtype, step_size),
            np.int64(n),
        )
        return self._launch("updates.cu", f"nlcg_step_{_suffix(dtype)}", n, args, 1)[0]

    def sq_distance(self, w: Tensor, v: Tensor) -> float:
        import numpy as np

        n = w.numel()
        args = (*map(self._array, (w, v)), np.int64(n))
        return self._launch("updates.cu", f"sq_distance_{_suffix(w.dtype)}", n, args, 1)[0]

    def neumann_update_(
        self, w: Tensor, v: Tensor, m: Tensor, g: Tensor, coef: float, eta: float, mu: float, gamma: float
    ) -> float:
        import numpy as np

        n, dtype = w.numel(), w.dtype
        scalars = tuple(self._scalar(dtype, value) for value in (coef, eta, mu, gamma))
        args = (*map(self._array, (w, v, m, g)), *scalars, np.int64(n))
        return self._launch("updates.cu", f"neumann_update_{_suffix(dtype)}", n, args, 1)[0]

    def tr_trial(self, trial: Tensor, theta: Tensor, s: Tensor) -> float:
        import numpy as np

        n = trial.numel()
        args = (*map(self._array, (trial, theta, s)), np.int64(n))
        return self._launch("updates.cu", f"tr_trial_{_suffix(trial.dtype)}", n, args, 1)[0]
