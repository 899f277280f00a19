"""Effective bandwidth of the fused CG step vs the unfused torch sequence vs a copy.

Run: ``python benchmarks/kernels.py [--sizes 1e6,1e7,1e8] [--repeats N] [--dtype float32]
[--device auto|cpu|cuda] [--json FILE]``

The CG step reads x, r, p, Ap and writes x, r: 6 vectors of traffic when fused
(one pass, the ‖r‖² reduction rides along); the unfused torch sequence
(``x.add_(p, α)``, ``r.add_(Ap, −α)``, ``dot(r, r)``) moves 7.  Effective bandwidth
is always counted as 6 vectors per step, so the columns compare like with like,
and a device-to-device copy (2 vectors) is the practical ceiling.

On a CPU-only machine the "fused" column is the torch twin
(:class:`hpcopt.kernels.CpuKernels`, which is *not* fused: it is the reference
of the CUDA kernel, with a float64 reduction) and the GPU columns print
"GPU: not measured (no GPU)".  The table reports medians measured in this run.
``--device auto`` (default) measures the CPU and then the GPU where there is one;
``cpu`` or ``cuda`` measures that device only.  ``--json FILE`` also writes every row
(seconds and GB/s per variant) to FILE.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import _common
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
        t_copy = median_seconds(partial(copy_dst.copy_, x), repeats, sync)
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


COLUMNS = ("floats", "unfused_GBps", "fused_GBps", "copy_GBps", "unfused_over_fused_time")


def print_rows(title: str, rows: list[tuple]) -> None:
    print(title)
    print(f"{'floats':>10} {'unfused GB/s':>13} {'fused GB/s':>11} {'copy GB/s':>10} {'unfused/fused time':>19}")
    for n, bw_unfused, bw_fused, bw_copy, ratio in rows:
        print(f"{n:>10.0e} {bw_unfused:>13.2f} {bw_fused:>11.2f} {bw_copy:>10.2f} {ratio:>19.3f}")


def as_records(rows: list[tuple]) -> list[dict[str, float]]:
    """The rows as dicts, with the fused step's fraction of the copy bandwidth."""
    records = []
    for row in rows:
        record = dict(zip(COLUMNS, row))
        record["fused_over_copy_bandwidth"] = record["fused_GBps"] / record["copy_GBps"]
        records.append(record)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=_common.sizes, default="1e6,1e7,1e8", help="vector lengths (floats)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, one rank per core)")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: the CPU, then the GPU if there is one"
    )
    parser.add_argument("--json", type=Path, help="also write every row to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes: list[int] = args.sizes
    dtype = getattr(torch, args.dtype)
    report: dict[str, Any] = {"dtype": args.dtype, "repeats": args.repeats, "sizes": sizes, "devices": {}}

    if args.device in ("auto", "cpu"):
        cpu_rows = run(torch.device("cpu"), sizes, args.repeats, dtype)
        twin = CpuKernels.__name__
        print_rows(
            f"CPU, {args.dtype}, {args.threads} thread(s), median of {args.repeats}; 'fused' = {twin} twin (unfused)",
            cpu_rows,
        )
        report["devices"]["cpu"] = {"backend": twin, "threads": args.threads, "rows": as_records(cpu_rows)}

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no GPU")
    if args.device != "cpu":
        if torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
            backend = select_backend(device).name
            gpu_rows = run(device, sizes, args.repeats, dtype)
            name = torch.cuda.get_device_name(device)
            print_rows(f"GPU {name}, {args.dtype}, median of {args.repeats}; 'fused' = {backend}", gpu_rows)
            report["devices"]["cuda"] = {"backend": backend, "gpu": name, "rows": as_records(gpu_rows)}
        else:
            print("GPU: not measured (no GPU)")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
