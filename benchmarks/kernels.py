"""Effective bandwidth of the fused CG step vs the unfused torch sequence vs a copy.

Run: ``python benchmarks/kernels.py [--sizes 1e6,1e7,1e8] [--repeats N] [--dtype float32]``

The CG step reads x, r, p, Ap and writes x, r: 6 vectors of traffic when fused
(one pass, the ‖r‖² reduction rides along); the unfused torch sequence
(``x.add_(p, α)``, ``r.add_(Ap, −α)``, ``dot(r, r)``) moves 7.  Effective bandwidth
is always counted as 6 vectors per step, so the columns compare like with like,
and a device-to-device copy (2 vectors) is the practical ceiling.

On a CPU-only machine the "fused" column is the torch twin
(:class:`hpcopt.kernels.CpuKernels`, which is *not* fused: it is the reference
of the CUDA kernel, with a float64 reduction) and the GPU columns print
"GPU: not measured (no GPU)".  The table reports medians measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from hpcopt.kernels import CpuKernels, select_backend

VECTORS_PER_STEP = 6
ALPHA = 1e-3  # small, so repeated steps keep the vectors finite


def median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def run(device: torch.device, sizes: list[int], repeats: int, dtype: torch.dtype) -> list[tuple]:
    kernels = select_backend(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for n in sizes:
        x, r, p, ap = (torch.randn(n, dtype=dtype, device=device) for _ in range(4))
        copy_dst = torch.empty_like(x)

        def unfused(x=x, r=r, p=p, ap=ap) -> float:
            x.add_(p, alpha=ALPHA)
            r.add_(ap, alpha=-ALPHA)
            return float(torch.dot(r, r))

        def fused(x=x, r=r, p=p, ap=ap) -> float:
            return kernels.cg_step_(x, r, p, ap, ALPHA)

        t_unfused = median_seconds(unfused, repeats, sync)
        t_fused = median_seconds(fused, repeats, sync)
        t_copy = median_seconds(lambda x=x, copy_dst=copy_dst: copy_dst.copy_(x), repeats, sync)
        step_bytes = VECTORS_PER_STEP * n * x.element_size()
        rows.append(
            (
                n,
                step_bytes / t_unfused / 1e9,
                step_bytes / t_fused / 1e9,
                2 * n * x.element_size() / t_copy / 1e9,
                t_unfused / t_fused,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e7,1e8", help="vector lengths (floats)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, one rank per core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    dtype = getattr(torch, args.dtype)
    header = f"{'floats':>10} {'unfused GB/s':>13} {'fused GB/s':>11} {'copy GB/s':>10} {'unfused/fused time':>19}"

    cpu_rows = run(torch.device("cpu"), sizes, args.repeats, dtype)
    twin = CpuKernels.__name__
    print(f"CPU, {args.dtype}, {args.threads} thread(s), median of {args.repeats}; 'fused' = {twin} twin (unfused)")
    print(header)
    for n, bw_unfused, bw_fused, bw_copy, ratio in cpu_rows:
        print(f"{n:>10.0e} {bw_unfused:>13.2f} {bw_fused:>11.2f} {bw_copy:>10.2f} {ratio:>19.3f}")

    if not torch.cuda.is_available():
        print("GPU: not measured (no GPU)")
        return
    device = torch.device("cuda", torch.cuda.current_device())
    backend = select_backend(device).name
    gpu_rows = run(device, sizes, args.repeats, dtype)
    print(f"GPU {torch.cuda.get_device_name(device)}, {args.dtype}, median of {args.repeats}; 'fused' = {backend}")
    print(header)
    for n, bw_unfused, bw_fused, bw_copy, ratio in gpu_rows:
        print(f"{n:>10.0e} {bw_unfused:>13.2f} {bw_fused:>11.2f} {bw_copy:>10.2f} {ratio:>19.3f}")


if __name__ == "__main__":
    main()
