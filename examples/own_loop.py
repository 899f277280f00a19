"""A training loop of your own with an hpcopt optimizer: your data, your loader, your logging.

Run on 2 ranks (each rank passes its shard of every global batch)::

    mpiexec -n 2 python -m mpi4py examples/own_loop.py
    mpiexec -n 2 python -m mpi4py examples/own_loop.py --optimizer hf --epochs 5
    mpiexec -n 2 python -m mpi4py examples/own_loop.py --resume own_loop.pt   # continue a saved run

The data are two interleaved spirals, a small classification task that a linear model
cannot solve.  APTS-D needs no learning rate: its trust region sets the step length.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import hpcopt


class Spirals(Dataset[tuple[Tensor, Tensor]]):
    """Points on two interleaved spirals, labelled by spiral (any map-style torch Dataset works)."""

    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 2, (size,), generator=generator)
        turn = torch.rand(size, generator=generator) * 2 * math.pi
        angle = turn + math.pi * labels
        radius = turn / (2 * math.pi) + 0.05 * torch.randn(size, generator=generator)
        self.points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.points[index], self.labels[index]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A training loop of your own with an hpcopt optimizer.")
    parser.add_argument("--optimizer", default="apts-d", help="any hpcopt optimizer (default apts-d)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=500, help="the global batch (default 500)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--state", default="own_loop.pt", help="where rank 0 saves the optimizer state")
    parser.add_argument("--resume", default=None, help="continue from a saved state")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = arguments()
    world = MPI.COMM_WORLD
    say = print if world.rank == 0 else (lambda *_: None)
    torch.set_num_threads(1)  # one rank per core

    train_set, val_set = Spirals(4000, seed=args.seed), Spirals(1000, seed=args.seed + 1)
    torch.manual_seed(args.seed)  # the same initial model on every rank
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2))

    opt = hpcopt.optimizer(args.optimizer, model, F.cross_entropy, comm=world, seed=args.seed)
    if args.resume:
        opt.load_state_dict(torch.load(args.resume, weights_only=True))
    # This rank's shard of every global batch, in the order `hpcopt train --seed` uses.
    sampler = opt.sampler(len(train_set), args.batch_size)
    loader = DataLoader(train_set, batch_sampler=sampler)

    start_epoch = opt.steps // len(sampler)  # a resumed run continues where it stopped
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        for batch, (inputs, labels) in enumerate(loader):
            if epoch == start_epoch and batch < opt.steps % len(sampler):
                continue  # done before the saved state
            loss = opt.step(inputs, labels)  # the global batch's loss before the step
            step = opt.last  # what the step recorded: radius, step_norm, ratio, accepted
            assert step is not None  # None only before the first step
            say(f"step {opt.steps:4d}  loss {loss:.4e}  radius {step.radius:.3g}  accepted {step.accepted}")
            if args.max_steps is not None and opt.steps >= args.max_steps:
                break
        # Evaluation is yours too: each rank scores a slice of the validation set, MPI sums.
        with opt.evaluation_parameters() as net, torch.no_grad():
            mine = slice(world.rank, len(val_set), world.size)
            logits = net(val_set.points[mine])
            loss_sum = float(F.cross_entropy(logits, val_set.labels[mine], reduction="sum"))
            correct = float((logits.argmax(1) == val_set.labels[mine]).sum())
        val_loss, accuracy = world.allreduce(loss_sum) / len(val_set), world.allreduce(correct) / len(val_set)
        say(f"epoch {epoch + 1:3d}  val_loss {val_loss:.4f}  accuracy {accuracy:.3f}")
        if args.max_steps is not None and opt.steps >= args.max_steps:
            break

    state = opt.state_dict()  # collective: every rank calls it
    if world.rank == 0:
        torch.save(state, Path(args.state))
        say(f"saved {args.state} after {opt.steps} steps")


if __name__ == "__main__":
    main()
