"""Krylov iterations per second and collectives per iteration of the distributed HF solve.

Run at several rank counts and compare the lines:
``mpiexec -n 1 python -m mpi4py benchmarks/krylov_rate.py --data-dir ../shared/datasets/mnist``
``mpiexec -n 2 python -m mpi4py benchmarks/krylov_rate.py --data-dir ../shared/datasets/mnist``

One global batch of MNIST; each rank builds the curvature operator on its part of
the curvature sub-batch and runs a fixed number of CG iterations of Martens' solver
(tolerances off), timing only the solve.  Printed by rank 0: products/s, collectives
per iteration (from ``comm.stats``) and the share of the solve spent in MPI.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from hpcopt.comm import Communicator
from hpcopt.distributed.data_parallel import DistributedObjective
from hpcopt.numerics.flat import FlatParameters
from hpcopt.numerics.krylov.martens import martens_cg
from hpcopt.optimizers import HessianFree, make_config
from hpcopt.problems import make_problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        default=str(
            Path(os.environ.get("HPCOPT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared/datasets")) / "mnist"
        ),
    )
    parser.add_argument("--model", default="cnn-small")
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--curvature", default="ggn")
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    comm = Communicator()
    problem = make_problem("mnist", data_dir=args.data_dir, seed=0)
    torch.manual_seed(0)
    flat = FlatParameters(problem.build_model(args.model))
    objective = DistributedObjective(problem, flat, comm)
    size = args.batch // comm.size
    shard = problem.train.subset(slice(comm.rank * size, (comm.rank + 1) * size))
    objective.set_batch(shard.inputs, shard.targets, size * comm.size, noise_seed=0)
    config = make_config("hf", {"curvature": args.curvature, "curvature_fraction": args.fraction})
    optimizer = HessianFree(objective, config)
    _, grad = objective.value_and_grad()
    grad = grad.clone()
    start = time.perf_counter()
    matvec = optimizer.curvature_operator(damping=1.0)
    build = time.perf_counter() - start
    calls, seconds = comm.stats.calls, comm.stats.seconds
    start = time.perf_counter()
    result = martens_cg(matvec, grad, max_iter=args.iterations, rtol=0.0, progress_tol=0.0)
    elapsed = time.perf_counter() - start
    collectives = comm.stats.calls - calls
    mpi = comm.stats.seconds - seconds
    if comm.is_root:
        print(
            f"P={comm.size} {args.model} n={flat.numel} curvature={args.curvature} rows={optimizer.curvature_rows}: "
            f"{result.iterations} CG iterations in {elapsed:.3f}s = {result.iterations / elapsed:.1f} it/s, "
            f"{collectives / max(result.iterations, 1):.2f} collectives/iteration, "
            f"MPI {100 * mpi / elapsed:.1f}% of the solve, operator build {build:.3f}s"
        )


if __name__ == "__main__":
    main()
