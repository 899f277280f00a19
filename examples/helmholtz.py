"""A PDE of your own: the 1-D Helmholtz equation as a physics-informed network, through ``forward=``.

Problem: ``-u''(x) - k² u(x) = f(x)`` on ``(0, 1)`` with ``u(0) = u(1) = 0`` and
``f = (4π² − k²) sin(2πx)``, whose solution is ``u*(x) = sin(2πx)``.  None of this is
built into hpcopt: the rows, the residual and the exact solution are all in this file.

Each input row is ``(x, flag)``: flag 0 asks for the residual ``-u'' - k²u`` at ``x``
(target ``f(x)``), flag 1 for the value ``u(x)`` (target 0 on the boundary; ``u*(x)``
on the validation grid).  One ``forward`` serves any mix of rows, so the ranks can take
any slice of a batch.

Train it from Python (one process, or ``mpiexec -n 2 python -m mpi4py examples/helmholtz.py``)::

    python examples/helmholtz.py

or name its factory on the command line, with its options as ``--set problem.KEY=VALUE``::

    mpiexec -n 2 python -m mpi4py -m hpcopt train --problem examples/helmholtz.py:make_problem --set problem.k=3
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp

import hpcopt


def exact(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * math.pi * x)


def source(x: torch.Tensor, k: float) -> torch.Tensor:
    return (4 * math.pi**2 - k**2) * exact(x)


Net = Callable[[torch.Tensor], torch.Tensor]


def helmholtz_forward(k: float) -> Callable[[Net, torch.Tensor], torch.Tensor]:
    """``forward(net, inputs)``: the residual on flag-0 rows and the value on flag-1 rows."""

    def forward(net: Net, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs[:, :1]
        is_value = inputs[:, 1] > 0.5
        direction = torch.ones_like(x)

        # u' and u'' by forward-mode derivatives (torch.func.jvp): they nest inside the
        # optimizers' own torch.func transforms and support double backward.  The network
        # treats rows independently, so one jvp along ones gives every row's derivative.
        def slope(at: torch.Tensor) -> torch.Tensor:
            return jvp(net, (at,), (direction,))[1]

        u = net(x)
        u_xx = jvp(slope, (x,), (direction,))[1]
        residual = -u_xx - k**2 * u
        # Both are computed for every row: torch.where, not an if, keeps the forward traceable.
        return torch.where(is_value, u.squeeze(-1), residual.squeeze(-1))

    return forward


def rows(points: torch.Tensor, flag: float) -> torch.Tensor:
    return torch.cat([points, torch.full_like(points, flag)], dim=1)


def make_problem(seed: int = 0, k: float = 4.0, interior: int = 256, width: int = 32) -> hpcopt.Problem:
    """The Helmholtz problem; ``hpcopt train --problem examples/helmholtz.py:make_problem`` calls this.

    ``seed`` (passed by ``hpcopt train``) draws the collocation points; ``k``, ``interior``
    and ``width`` are options (``--set problem.k=3``).
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(interior, 1, generator=generator)
    boundary = torch.tensor([[0.0], [1.0]]).repeat(interior // 16, 1)  # weight the two boundary rows
    inputs = torch.cat([rows(x, 0.0), rows(boundary, 1.0)])
    targets = torch.cat([source(x, k).squeeze(-1), torch.zeros(len(boundary))])
    order = torch.randperm(len(inputs), generator=generator)  # every slice mixes both kinds of rows
    grid = torch.linspace(0, 1, 201).unsqueeze(-1)

    def network() -> nn.Module:
        return nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))

    return hpcopt.problem(
        network,
        F.mse_loss,
        train=(inputs[order], targets[order]),
        val=(rows(grid, 1.0), exact(grid).squeeze(-1)),
        metric="rel_l2",
        forward=helmholtz_forward(k),
        least_squares=True,  # a mean of squared residuals: Gauss-Newton global passes
        name="helmholtz1d",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--out", help="HDF5 run log to write (hpcopt analyze reads it)")
    args = parser.parse_args()
    result = hpcopt.train(
        make_problem(),
        optimizer="apts-d",
        epochs=args.epochs,
        target=1e-2,  # stop once the relative L2 error is below 1 %
        eval_every=10,
        out=args.out,
        overwrite=True,
    )
    print(f"{result.steps} steps: relative L2 error {result.metrics['val_rel_l2_error']:.3g}")


if __name__ == "__main__":
    main()
