"""Cost of reliability: checkpoint size and time per model, and the collective watchdog's overhead.

Run: ``mpiexec -n 2 python benchmarks/checkpoint_cost.py [--data-dir DIR] [--steps N]``

For each MNIST model (mlp, cnn-small, cnn) APTS-D takes a few steps (so the L-SR1
memory is full), then a checkpoint is written the way ``hpcopt train`` writes it
(gather of RNG states, rank-0 ``torch.save`` to a temporary file, fsync, rename,
agreement).  The watchdog rows time APTS-D steps with ``--collective-timeout`` off
and on, alternating blocks of steps so that load drifts hit both alike; the
overhead is the ratio of the medians (goal ≤ 1.02).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hpcopt.comm import Communicator
from hpcopt.distributed.data_parallel import DistributedObjective
from hpcopt.distributed.sharding import GlobalBatches
from hpcopt.log import checkpoint
from hpcopt.numerics.flat import FlatParameters
from hpcopt.optimizers import APTSD, make_config
from hpcopt.problems import make_problem

MODELS = ("mlp", "cnn-small", "cnn")


def setup(comm: Communicator, data_dir: str, model_name: str, batch_size: int) -> tuple[FlatParameters, APTSD]:
    problem = make_problem("mnist", data_dir=data_dir, seed=0, options={})
    torch.manual_seed(0)
    flat = FlatParameters(problem.build_model(model_name))
    objective = DistributedObjective(problem, flat, comm)
    # The L-SR1 global pass: its pairs are the largest state APTS-D checkpoints.
    optimizer = APTSD(objective, make_config("apts-d", {"global_solver": "lsr1"}))
    batches = GlobalBatches(len(problem.train), batch_size, 0, comm.rank, comm.size)
    index = next(batches.epoch(0))
    shard = problem.train.subset(index)
    objective.set_batch(shard.inputs, shard.targets, batch_size, noise_seed=0)
    return flat, optimizer


def step_times(comm: Communicator, optimizer: APTSD, steps: int) -> list[float]:
    samples = []
    for _ in range(steps):
        comm.barrier()
        start = time.perf_counter()
        optimizer.step()
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = (
        Path(os.environ.get("HPCOPT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets")) / "mnist"
    )
    parser.add_argument("--data-dir", default=os.environ.get("HPCOPT_MNIST", str(default_data)))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="steps per watchdog block (3 blocks each way)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated MNIST models")
    parser.add_argument("--timeout", type=float, default=60.0, help="watchdog timeout for the 'on' rows")
    args = parser.parse_args()
    comm = Communicator()
    torch.set_num_threads(1)
    directory = Path(comm.bcast_object(tempfile.mkdtemp(prefix="hpcopt-ckpt-") if comm.is_root else None))
    rows = []
    for model_name in args.models.split(","):
        flat, optimizer = setup(comm, args.data_dir, model_name, args.batch_size)
        for _ in range(3):
            optimizer.step()  # fill the L-SR1 memory
        compat = {"model": model_name}
        writer = checkpoint.Checkpointer(str(directory / f"{model_name}.ckpt"), 1, comm, compat, None)
        save_times = []
        for _ in range(3):
            start = time.perf_counter()
            writer.save(step=3, epoch=1, batch_in_epoch=3, epoch_losses=[], optimizer=optimizer, log_rows=0)
            save_times.append(comm.allreduce_scalars([time.perf_counter() - start], op="max")[0])
        size = os.path.getsize(directory / f"{model_name}.ckpt") if comm.is_root else 0
        start = time.perf_counter()
        checkpoint.load(str(directory / f"{model_name}.ckpt"))
        load_time = time.perf_counter() - start

        off: list[float] = []
        on: list[float] = []
        for _ in range(3):
            comm.collective_timeout = 0.0
            off += step_times(comm, optimizer, args.steps)
            comm.collective_timeout = args.timeout
            on += step_times(comm, optimizer, args.steps)
        comm.collective_timeout = 0.0
        step_off = comm.allreduce_scalars([statistics.median(off)], op="max")[0]
        step_on = comm.allreduce_scalars([statistics.median(on)], op="max")[0]
        if comm.is_root:
            print(f"  {model_name}: {flat.numel} parameters, step {step_off * 1e3:.1f} ms", flush=True)
        rows.append(
            (
                model_name,
                flat.numel,
                size,
                statistics.median(save_times),
                load_time,
                step_off,
                step_on,
                step_on / step_off,
            )
        )
    if comm.is_root:
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()
        print(f"{comm.size} rank(s), APTS-D defaults, global batch {args.batch_size}, {comm.library_version()}")
        header = ("model", "params", "ckpt MB", "B/param", "save ms", "load ms", "step ms", "step+wd ms", "wd ratio")
        print(" ".join(f"{h:>10s}" for h in header))
        for name, numel, size, save, load, off_s, on_s, ratio in rows:
            print(
                f"{name:>10s} {numel:>10d} {size / 1e6:>10.2f} {size / numel:>10.1f} {save * 1e3:>10.1f} "
                f"{load * 1e3:>10.1f} {off_s * 1e3:>10.2f} {on_s * 1e3:>10.2f} {ratio:>10.3f}"
            )


if __name__ == "__main__":
    main()
