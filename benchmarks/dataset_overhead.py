"""Overhead of training from a map-style ``Dataset`` instead of tensors in memory, per epoch.

Run: ``mpiexec -n 2 python -m mpi4py benchmarks/dataset_overhead.py [--data-dir DIR] [--models M1,M2] [--epochs N]``

The same MNIST rows train the same model with APTS-D (identical losses, checked) given
six ways through :func:`hpcopt.problem`:

* ``tensors``: the in-memory fast path (each shard is an index into the tensors);
* ``dataset``: a map-style ``Dataset`` over the same tensors, read by a ``DataLoader``
  in the training process (``num_workers=0``);
* ``dataset-1w``: the same with one reader process ahead of the optimizer (``num_workers=1``);
* ``dataset-thread``: the same read ahead by a thread of each rank (``read_ahead=2``);
* ``memmap-1w``, ``memmap-thread``: rows read from a memory-mapped ``.npy`` file on disk
  (a data set that need not fit in memory), by one reader process or by a thread.

Each variant trains ``--epochs`` epochs (evaluation included, once at the end); the
variants alternate, ``--repeats`` rounds, and the table gives the median seconds per epoch
and its ratio to ``tensors`` (goal: ≤ 1.10 with one reader).  The ``read s``
column is the time one rank takes to read its shards of one epoch and nothing else
(reader start-up included): the cost of the path itself, apart from what a reader
process takes from the ranks when they share too few cores.  Each model of ``--models``
is measured in turn: the reading costs the same per step whatever the model, so its
share of an epoch is largest for the cheapest model.  Rank 0 prints the table and
writes the CSV and a PNG of the ratios.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

import hpcopt
from hpcopt.comm import Communicator
from hpcopt.distributed.sharding import GlobalBatches
from hpcopt.problems import make_problem, models


class TensorRows(Dataset[tuple[Tensor, Tensor]]):
    """Rows of tensors in memory, one ``__getitem__`` per row (the DataLoader path, no disk)."""

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.inputs[index], self.targets[index]


class MemmapRows(Dataset[tuple[Tensor, Tensor]]):
    """Rows of a ``.npy`` file read through a memory map: only the rows asked for are read."""

    def __init__(self, inputs_path: Path, targets: Tensor) -> None:
        self.inputs = np.load(inputs_path, mmap_mode="r")
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(np.array(self.inputs[index])), self.targets[index]


def read_seconds(problem: hpcopt.Problem, batch_size: int, comm: Communicator, reader: tuple[int, int]) -> float:
    """Seconds to read this rank's shards of one epoch (no training)."""
    batches = GlobalBatches(len(problem.train), batch_size, 0, comm.rank, comm.size)
    start = time.perf_counter()
    workers, ahead = reader
    for _ in problem.train.batches(batches.epoch(0), num_workers=workers, read_ahead=ahead):
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("HPCOPT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    parser.add_argument("--data-dir", default=str(default_data / "mnist"))
    parser.add_argument("--models", default="mlp,cnn-small", help="comma-separated: mlp, cnn-small, cnn")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all variants (the median is reported)")
    parser.add_argument("--limit", type=int, help="use only the first N training rows")
    parser.add_argument("--csv", default="dataset_overhead.csv")
    parser.add_argument("--png", default="dataset_overhead.png")
    args = parser.parse_args()
    comm = Communicator()
    torch.set_num_threads(1)

    options = {} if args.limit is None else {"limit": args.limit}
    mnist = make_problem("mnist", data_dir=args.data_dir, options=options)
    train, val = (mnist.train.inputs, mnist.train.targets), (mnist.val.inputs, mnist.val.targets)
    folder = Path(comm.bcast_object(tempfile.mkdtemp(prefix="hpcopt-memmap-") if comm.is_root else None))
    if comm.is_root:
        np.save(folder / "train.npy", train[0].numpy())
        np.save(folder / "val.npy", val[0].numpy())
    comm.barrier()
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in names if name not in ("mlp", "cnn-small", "cnn")]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: choose from mlp, cnn-small, cnn")
    rows: list[dict[str, object]] = []
    same = True
    for name in names:
        model_rows, model_same = measure(name, args, comm, train, val, folder)
        rows += model_rows
        same = same and model_same
    if not comm.is_root:
        return
    print(f"MNIST {len(train[1])} train rows, APTS-D, {comm.size} ranks, batch {args.batch_size}, {args.epochs} epochs")
    print(f"{'model':<10} {'variant':<15} {'workers':>7} {'ahead':>5} {'s/epoch':>9} {'ratio':>6} {'read s':>7}")
    for row in rows:
        print(
            f"{row['model']:<10} {row['variant']:<15} {row['num_workers']:>7} {row['read_ahead']:>5} "
            f"{row['seconds_per_epoch']:>9.3f} {row['ratio']:>6.3f} {row['read_seconds_per_epoch']:>7.3f}"
        )
    print(f"identical losses in every variant: {'yes' if same else 'NO'}")
    with open(args.csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}")
    write_figure(rows, Path(args.png), comm.size, args.batch_size)


def measure(
    model: str,
    args: argparse.Namespace,
    comm: Communicator,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    folder: Path,
) -> tuple[list[dict[str, object]], bool]:
    """One model's rows of the table, and whether every variant gave the same losses."""
    builder = getattr(models, model.replace("-", "_"))

    def in_memory() -> hpcopt.Problem:
        return hpcopt.problem(builder, F.cross_entropy, train, val, metric="accuracy")

    def tensor_rows() -> hpcopt.Problem:
        return hpcopt.problem(builder, F.cross_entropy, TensorRows(*train), TensorRows(*val), metric="accuracy")

    def memmap_rows() -> hpcopt.Problem:
        train_rows = MemmapRows(folder / "train.npy", train[1])
        return hpcopt.problem(
            builder, F.cross_entropy, train_rows, MemmapRows(folder / "val.npy", val[1]), metric="accuracy"
        )

    # name: (problem, (num_workers, read_ahead))
    variants: dict[str, tuple[Callable[[], hpcopt.Problem], tuple[int, int]]] = {
        "tensors": (in_memory, (0, 0)),
        "dataset": (tensor_rows, (0, 0)),
        "dataset-1w": (tensor_rows, (1, 0)),
        "dataset-thread": (tensor_rows, (0, 2)),
        "memmap-1w": (memmap_rows, (1, 0)),
        "memmap-thread": (memmap_rows, (0, 2)),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    reading: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, list[float]] = {}
    steps = 0
    for _ in range(args.repeats):
        for name, (make, reader) in variants.items():
            result = hpcopt.train(
                make(),
                optimizer="apts-d",
                epochs=args.epochs,
                batch_size=args.batch_size,
                eval_every=args.epochs,
                num_workers=reader[0],
                read_ahead=reader[1],
                quiet=True,
                comm=comm,
            )
            # The slowest rank's time is the epoch's time.
            seconds[name].append(comm.allreduce_scalars([result.wall_time], op="max")[0] / args.epochs)
            losses.setdefault(name, result.losses)
            reading[name].append(read_seconds(make(), args.batch_size, comm, reader))
            steps = result.steps
    same = all(run == losses["tensors"] for run in losses.values())
    base = statistics.median(seconds["tensors"])
    rows: list[dict[str, object]] = [
        {
            "model": model,
            "variant": name,
            "num_workers": variants[name][1][0],
            "read_ahead": variants[name][1][1],
            "ranks": comm.size,
            "steps_per_epoch": steps // args.epochs,
            "seconds_per_epoch": statistics.median(times),
            "ratio": statistics.median(times) / base,
            "read_seconds_per_epoch": statistics.median(reading[name]),
        }
        for name, times in seconds.items()
    ]
    return rows, same


def write_figure(rows: list[dict[str, object]], path: Path, ranks: int, batch_size: int) -> None:
    """Bars of each variant's ratio to the in-memory path, one group per model, the goal as a line."""
    try:
        import matplotlib
    except ImportError:
        print(f"no {path.name}: the figure needs matplotlib (pip install 'hpcopt[plot]')")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_names = list(dict.fromkeys(str(row["model"]) for row in rows))
    variant_names = list(dict.fromkeys(str(row["variant"]) for row in rows))
    width = 0.8 / len(variant_names)
    fig, ax = plt.subplots(figsize=(7, 4))
    for v, variant in enumerate(variant_names):
        ratios = [
            float(str(row["ratio"]))
            for m in model_names
            for row in rows
            if row["model"] == m and row["variant"] == variant
        ]
        bars = ax.bar(
            [m + (v - (len(variant_names) - 1) / 2) * width for m in range(len(model_names))],
            ratios,
            width,
            label=variant,
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.10, color="k", linestyle="--", linewidth=1, label="goal with one reader: 1.10")
    ax.set_xticks(range(len(model_names)), model_names)
    ax.set_ylabel("seconds per epoch / in-memory tensors")
    # Run-to-run spread can put a ratio below 1 (a faster epoch than the baseline's): keep every bar in view.
    every = [float(str(row["ratio"])) for row in rows]
    ax.set_ylim(min(0.9, min(every) - 0.05), max(1.2, max(every) + 0.05))
    plural = "s" if ranks != 1 else ""
    ax.set_title(f"Dataset path on MNIST (60 000 rows), APTS-D, {ranks} rank{plural}, batch {batch_size}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
