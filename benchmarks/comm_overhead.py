"""hpcopt's packed allreduce vs a raw mpi4py ``Allreduce`` of the same bytes.

Run: ``mpiexec -n 2 python benchmarks/comm_overhead.py [--repeats N]``

Both sides reduce the same float32 buffer in place, timed alternately (so load drifts hit
both alike); hpcopt adds its tensor→buffer
view, the counters and the timing.  The table prints median times and the ratio
hpcopt/raw (goal ≤ 1.10).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import _common
import torch
from mpi4py import MPI

from hpcopt.comm import Communicator, PackedBuffer


def paired_medians(
    raw_fn: Callable[[], object], hpcopt_fn: Callable[[], object], repeats: int, comm: MPI.Comm
) -> tuple[float, float]:
    """Median times of the two calls, timed alternately so that load drifts hit both alike."""
    samples: dict[str, list[float]] = {"raw": [], "hpcopt": []}
    for i in range(2 * repeats):
        # Alternate which goes first, so neither always follows the barrier.
        name, fn = (("raw", raw_fn), ("hpcopt", hpcopt_fn))[(i + i // 2) % 2]
        comm.Barrier()
        start = time.perf_counter()
        fn()
        samples[name].append(time.perf_counter() - start)
    # The slowest rank defines a collective's time.
    return (
        comm.allreduce(statistics.median(samples["raw"]), op=MPI.MAX),
        comm.allreduce(statistics.median(samples["hpcopt"]), op=MPI.MAX),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--sizes", type=_common.sizes, default="1e3,1e4,1e5,1e6,1e7")
    args = parser.parse_args()
    world = MPI.COMM_WORLD
    comm = Communicator(world)
    rows = []
    for size in args.sizes:
        repeats = max(5, args.repeats if size <= 1_000_000 else args.repeats // 5)
        packed = PackedBuffer(size - 1, 1, dtype=torch.float32)
        packed.data.fill_(1.0)
        raw = packed.data.clone().numpy()
        # Warm-up both paths (MPI connection set-up, page faults).
        for _ in range(3):
            comm.allreduce_(packed.data)
            world.Allreduce(MPI.IN_PLACE, raw, op=MPI.SUM)
        t_raw, t_hpc = paired_medians(
            partial(world.Allreduce, MPI.IN_PLACE, raw, op=MPI.SUM),
            partial(comm.allreduce_, packed.data),
            repeats,
            world,
        )
        rows.append((size, size * 4, t_raw, t_hpc, t_hpc / t_raw))
    if comm.is_root:
        print(f"packed allreduce, {comm.size} ranks, float32, median of {args.repeats} (MPI: {comm.library_version()})")
        print(f"{'floats':>10} {'bytes':>12} {'raw mpi4py (us)':>16} {'hpcopt (us)':>12} {'ratio':>7}")
        for size, nbytes, t_raw, t_hpc, ratio in rows:
            print(f"{size:>10.0e} {nbytes:>12d} {t_raw * 1e6:>16.1f} {t_hpc * 1e6:>12.1f} {ratio:>7.3f}")
        print("goal: ratio <= 1.10")


if __name__ == "__main__":
    main()
