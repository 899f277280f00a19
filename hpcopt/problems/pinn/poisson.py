"""Physics-informed network for the Poisson equation on the unit cube, in any dimension ``d``.

Problem: ``-Laplace(u) = f`` on ``(0,1)^d`` with ``u = 0`` on the boundary and
``f(x) = d * pi^2 * prod_i sin(pi x_i)``, whose exact solution is
``u*(x) = prod_i sin(pi x_i)``.

Rows of ``inputs`` are ``(x_1, ..., x_d, flag)``.  The flag says which quantity the
row constrains: 1.0 -> the value ``u(x)`` (boundary rows, target 0; validation rows,
target ``u*``), 0.0 -> the residual ``-Laplace(u)(x)`` (interior rows, target ``f(x)``).
Keeping the selector in the data lets one ``forward`` serve any mix of rows, so ranks
can take arbitrary slices of the training set.

Options: :class:`PoissonOptions`, whose defaults depend on ``d``
(:func:`poisson_options`; ``hpcopt options poisson2d``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap

from hpcopt.numerics.jets import ScalarJet
from hpcopt.problems import models
from hpcopt.problems.base import Dataset, Net, Problem, ProblemOptions, as_sums, build_options, evaluation_mode
from hpcopt.problems.defaults import TrainingDefaults
from hpcopt.problems.pinn import APTS_D_GAUSS_NEWTON, APTS_IP_GAUSS_NEWTON, GAUSS_NEWTON_DEFAULTS


@dataclass
class PoissonOptions(ProblemOptions):
    """Options of the Poisson problems; the defaults are those of ``d = 3``, each dimension's class sets its own.

    Attributes:
        interior: interior collocation points, uniform random.
        boundary: boundary points, spread evenly over the 2d faces.
        val_grid: validation grid points per axis (endpoints included).
        width: hidden units per layer of ``pinn-mlp``.
        depth: hidden layers of ``pinn-mlp``.
        normalize_residual: divide the residual rows (−Δu and f) by dπ², the largest
            |f|, so that they weigh like the boundary rows (same solution).
    """

    minimum: ClassVar[Mapping[str, float]] = {"interior": 1, "boundary": 1, "val_grid": 2, "width": 1, "depth": 1}
    # Those of poisson3d (docs/problems.md, "Defaults for train"): batches of 600 rows and
    # four Gauss-Newton passes per step, with the residual normalised, reach 1e-2 within
    # two minutes on one core (without the normalisation 0.05 at ~110 s).
    train_defaults: ClassVar[TrainingDefaults] = TrainingDefaults(
        epochs=500,
        batch_size=600,
        eval_every=1,
        target=1e-2,
        time_limit=100,
        optimizer_options={
            "apts-d": {**APTS_D_GAUSS_NEWTON, "global_passes": 4},
            "apts-p": APTS_D_GAUSS_NEWTON,
            "apts-ip": APTS_IP_GAUSS_NEWTON,
        },
    )

    interior: int = 4000
    boundary: int = 600
    val_grid: int = 21
    width: int = 32
    depth: int = 3
    # f reaches d pi^2 (30 in 3-d): unscaled, the residual rows outweigh the boundary rows,
    # whose values set the error and then converge last.  Scaled, both kinds of row have
    # targets of order 1.  The solution is the same; only the weights of the loss change.
    normalize_residual: bool = True


@dataclass
class Poisson1DOptions(PoissonOptions):
    """Options of ``poisson1d``: those of :class:`PoissonOptions` with 1-d defaults."""

    problem: ClassVar[str] = "poisson1d"
    # The target ends the run (after ~50 full-batch steps); the epochs and the time limit only cap it.
    train_defaults: ClassVar[TrainingDefaults] = TrainingDefaults(
        epochs=2000, eval_every=10, target=1e-2, time_limit=110, optimizer_options=GAUSS_NEWTON_DEFAULTS
    )

    interior: int = 200
    boundary: int = 2
    val_grid: int = 1001
    # Off: these defaults reach the target without it (measured before it existed).
    normalize_residual: bool = False


@dataclass
class Poisson2DOptions(PoissonOptions):
    """Options of ``poisson2d``: those of :class:`PoissonOptions` with 2-d defaults."""

    problem: ClassVar[str] = "poisson2d"
    # Batches of 600 of the 2400 rows: four cheaper steps per epoch reached 1e-2 in ~80 s
    # on one core, where full-batch steps were at 2.6e-2 after 100 s.
    train_defaults: ClassVar[TrainingDefaults] = TrainingDefaults(
        epochs=500,
        batch_size=600,
        eval_every=2,
        target=1e-2,
        time_limit=110,
        optimizer_options=GAUSS_NEWTON_DEFAULTS,
    )

    interior: int = 2000
    boundary: int = 400
    val_grid: int = 101
    # On, as in 3-d: unscaled (f up to 2π² ≈ 20), APTS-D and APTS-P sat near 1.1e-1 for a
    # minute at P = 2 before the boundary rows caught up (1e-2 after 96 s or not within
    # 110 s); scaled, both reach 1e-2 within 7 s (docs/problems.md, "Defaults for train").
    normalize_residual: bool = True


@dataclass
class Poisson3DOptions(PoissonOptions):
    """Options of ``poisson3d``: those of :class:`PoissonOptions`, whose defaults are the 3-d ones."""

    problem: ClassVar[str] = "poisson3d"


_OPTIONS_BY_DIM: dict[int, type[PoissonOptions]] = {1: Poisson1DOptions, 2: Poisson2DOptions, 3: Poisson3DOptions}


def poisson_options(dim: int) -> type[PoissonOptions]:
    """The options dataclass of the ``dim``-dimensional problem.

    Dimensions above 3 are not registered problems, but :class:`PoissonProblem` takes
    any ``dim``: they get the 3-d defaults but ``boundary = 200 * dim``.
    """
    if dim in _OPTIONS_BY_DIM:
        return _OPTIONS_BY_DIM[dim]
    return dataclasses.make_dataclass(
        f"Poisson{dim}DOptions",
        [("boundary", int, dataclasses.field(default=200 * dim))],
        bases=(PoissonOptions,),
        namespace={"problem": f"poisson{dim}d", "__doc__": f"Options of the {dim}-d Poisson problem."},
    )


def exact_solution(points: Tensor) -> Tensor:
    """``u*(x) = prod_i sin(pi x_i)`` for points ``(n, d)``, shape ``(n,)``."""
    return torch.sin(math.pi * points).prod(dim=-1)


def source(points: Tensor) -> Tensor:
    """Right-hand side ``f = -Laplace(u*) = d pi^2 u*`` for points ``(n, d)``, shape ``(n,)``."""
    return points.shape[-1] * math.pi**2 * exact_solution(points)


def laplacian(net: Net, points: Tensor) -> Tensor:
    """``Laplace(u)`` at each row of ``points`` ``(n, d)`` for ``u = net`` mapping ``(n, d) -> (n, 1)``.

    Each ``d^2 u / dx_i^2`` is a forward-over-forward ``jvp`` of the whole batch along
    the unit vector ``e_i``, valid because the network treats rows independently (no
    batch norm); ``vmap`` over the ``d`` axes runs them as one batched pass, which
    measured ~1.4x faster than a Python loop over axes and faster than a per-point
    Hessian.  Being plain ``torch.func``, it nests inside the optimizer's own
    ``jvp``/``grad``/``vmap`` and supports ordinary double backward.
    """
    basis = torch.eye(points.shape[-1], dtype=points.dtype, device=points.device)

    def second_derivative(axis: Tensor) -> Tensor:
        direction = axis.expand_as(points)

        def slope(at: Tensor) -> Tensor:
            return jvp(net, (at,), (direction,))[1]

        return jvp(slope, (points,), (direction,))[1].squeeze(-1)

    return vmap(second_derivative)(basis).sum(dim=0)


class PoissonProblem(Problem):
    """PINN for ``-Laplace(u) = f`` on ``(0,1)^dim``; mean squared residual loss."""

    metric_name = "val_rel_l2_error"
    metric_higher_is_better = False
    default_model = "pinn-mlp"
    models = ("pinn-mlp",)

    def __init__(
        self, *, dim: int, data_dir: str | None = None, seed: int = 0, options: Mapping[str, object] | None = None
    ) -> None:
        del data_dir  # the data are generated
        self.dim = dim
        self.name = f"poisson{dim}d"
        opts = build_options(poisson_options(dim), options)
        self.width, self.depth = opts.width, opts.depth
        # -Laplace(u) = f divided through by d pi^2 when normalised: same solution, other weights.
        self.residual_scale = 1.0 / (dim * math.pi**2) if opts.normalize_residual else 1.0
        generator = torch.Generator().manual_seed(seed)
        self.train = self._collocation(opts.interior, opts.boundary, generator)
        self.val = self._grid(opts.val_grid)
        self.default_batch_size = opts.train_defaults.batch_for(len(self.train))

    def _collocation(self, n_interior: int, n_boundary: int, generator: torch.Generator) -> Dataset:
        dim = self.dim
        interior = torch.rand(n_interior, dim, generator=generator, dtype=torch.float64)
        boundary = torch.rand(n_boundary, dim, generator=generator, dtype=torch.float64)
        # Point k lies on face k mod 2d, so the faces get equal shares (and 1-d gets both ends).
        face = torch.arange(n_boundary) % (2 * dim)
        boundary[torch.arange(n_boundary), face // 2] = (face % 2).to(torch.float64)
        points = torch.cat([interior, boundary])
        flag = torch.cat([torch.zeros(n_interior), torch.ones(n_boundary)]).to(torch.float64)
        targets = torch.cat([source(interior) * self.residual_scale, torch.zeros(n_boundary, dtype=torch.float64)])
        # Shuffled so that contiguous per-rank slices each mix interior and boundary rows.
        order = torch.randperm(len(points), generator=generator)
        inputs = torch.cat([points, flag[:, None]], dim=1)[order]
        return Dataset(inputs.to(torch.float32), targets[order].to(torch.float32))

    def _grid(self, per_axis: int) -> Dataset:
        axis = torch.linspace(0.0, 1.0, per_axis, dtype=torch.float64)
        mesh = torch.meshgrid(*([axis] * self.dim), indexing="ij")
        points = torch.stack([m.reshape(-1) for m in mesh], dim=1)
        inputs = torch.cat([points, torch.ones(len(points), 1, dtype=torch.float64)], dim=1)
        return Dataset(inputs.to(torch.float32), exact_solution(points).to(torch.float32))

    def _make_model(self, name: str) -> nn.Module:
        return models.pinn_mlp(self.dim, self.width, self.depth)

    def forward(self, net: Net, inputs: Tensor) -> Tensor:
        points = inputs[:, : self.dim]
        is_value = inputs[:, self.dim] > 0.5
        value = net(points).squeeze(-1)
        # Both branches are computed for every row: torch.where keeps this free of
        # data-dependent control flow, which vmap and jvp cannot trace through.
        return torch.where(is_value, value, -laplacian(net, points) * self.residual_scale)

    def jet_points(self, inputs: Tensor) -> Tensor:
        return inputs[:, : self.dim]

    def outputs_from_jet(self, jet: ScalarJet, inputs: Tensor) -> Tensor:
        """``forward``'s outputs from ``u`` and ``∂_i² u`` (the pipelined path of APTS-IP)."""
        is_value = inputs[:, self.dim] > 0.5
        return torch.where(is_value, jet.value, -jet.second.sum(dim=1) * self.residual_scale)

    def criterion(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.mean((outputs - targets) ** 2)

    def eval_sums(self, net: Net, data: Dataset) -> Tensor:
        """``[sum (out - target)^2, sum target^2, count]``; on the grid, out = u and target = u*."""
        squared_error, squared_target = 0.0, 0.0
        with torch.no_grad(), evaluation_mode(net):
            for chunk in data.chunks():
                if bool((chunk.inputs[:, self.dim] > 0.5).all()):
                    outputs = net(chunk.inputs[:, : self.dim]).squeeze(-1)  # no derivatives needed
                else:
                    outputs = self.forward(net, chunk.inputs)  # forward-mode jvp works under no_grad
                targets = chunk.targets.to(torch.float64)
                squared_error += torch.sum((outputs.to(torch.float64) - targets) ** 2).item()
                squared_target += torch.sum(targets**2).item()
        return as_sums(squared_error, squared_target, len(data))

    def eval_metrics(self, sums: Tensor) -> dict[str, float]:
        squared_error, squared_target, count = sums.tolist()
        # An all-zero target would make the ratio undefined; fall back to the absolute error.
        relative = math.sqrt(squared_error / (squared_target if squared_target > 0 else 1.0))
        return {"val_loss": squared_error / max(count, 1.0), "val_rel_l2_error": relative}
