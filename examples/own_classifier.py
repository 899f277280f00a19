"""Your own classifier, on data made in this file, trained by APTS-D through ``hpcopt.problem`` and ``hpcopt.train``.

Run it as one process or on several ranks (each rank runs the whole script)::

    python examples/own_classifier.py
    mpiexec -n 2 python -m mpi4py examples/own_classifier.py --epochs 3

The data: points in the plane from three Gaussian clouds, one per class.  The model: a
small network of your own (any ``torch.nn.Module``; this one is not a ``Sequential``).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import hpcopt


class TwoLayerNet(nn.Module):
    """Two hidden layers with a skip connection: any module works, not only ``nn.Sequential``."""

    def __init__(self, width: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.inner = nn.Linear(2, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x))
        h = h + torch.tanh(self.hidden(h))
        return self.out(h)


def clouds(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` points of three Gaussian clouds and their class labels (the same on every rank: seeded)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (rows,), generator=generator)
    centres = torch.tensor([[0.0, 2.0], [-1.7, -1.0], [1.7, -1.0]])
    points = centres[labels] + 0.8 * torch.randn(rows, 2, generator=generator)
    return points, labels


def make_problem() -> hpcopt.Problem:
    return hpcopt.problem(
        TwoLayerNet,  # a class is a callable returning a fresh module
        F.cross_entropy,  # the mean loss over a batch's rows
        train=clouds(2000, seed=1),
        val=clouds(1000, seed=2),
        metric="accuracy",
        name="clouds",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", help="HDF5 run log to write (hpcopt analyze reads it)")
    args = parser.parse_args()
    result = hpcopt.train(
        make_problem(),
        optimizer="apts-d",
        epochs=args.epochs,
        batch_size=400,
        out=args.out,
        overwrite=True,
        options={"radius": 0.5},
    )
    print(f"{result.steps} steps: val_accuracy {result.metrics['val_accuracy']:.3f}")


if __name__ == "__main__":
    main()
