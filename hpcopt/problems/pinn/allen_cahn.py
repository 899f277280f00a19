"""Physics-informed networks for the Allen–Cahn equation, steady (1-D) and time-dependent (1-D + time).

Steady (``allen-cahn``): ``-D u'' + u³ - u = 0`` on ``(0,1)``, ``u(0) = 1``, ``u(1) = -1``,
with diffusion ``D`` (option ``diffusion``, default 1 as in the issue's statement).

Time-dependent (``allen-cahn-time``): ``u_t - D u_xx + u³ - u = 0`` on ``(0,1) × (0,T]``,
``u(x,0) = 1 - 2x``, ``u(0,t) = 1``, ``u(1,t) = -1`` (consistent with the initial
condition at the corners).  Default ``D = 0.01`` *(ours)*: with ``D = 1`` diffusion
dominates and the solution stays close to the line ``1 - 2x``; ``D = 0.01`` lets the
reaction sharpen it into the characteristic ``tanh`` interface of width ``≈ √(2D)``
at ``x = 1/2`` by ``T = 1``, which is the regime the equation is studied in.

Neither has a closed form with these boundary values, so the validation targets
come from a fine finite-difference solve in float64: Newton's method on the
second-order central discretisation (steady), or implicit Euler in time with a
Newton solve per step (time-dependent).  Both solvers are tridiagonal.

Rows of ``inputs`` are ``(coordinates..., flag)`` as in :mod:`hpcopt.problems.pinn.poisson`:
flag 1 → the value ``u`` (boundary / initial rows and validation rows), flag 0 → the
PDE residual (target 0).  The loss is the mean squared error over rows.

Options: :class:`AllenCahnOptions` and :class:`AllenCahnTimeOptions`
(``hpcopt options allen-cahn``).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import jvp

from hpcopt.numerics.jets import ScalarJet
from hpcopt.problems import models
from hpcopt.problems.base import Dataset, Net, Problem, ProblemOptions, as_sums, build_options, evaluation_mode
from hpcopt.problems.defaults import TrainingDefaults
from hpcopt.problems.pinn import GAUSS_NEWTON_DEFAULTS
from hpcopt.problems.pinn.poisson import laplacian


def _tridiagonal_newton(
    residual_and_jacobian: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    u: np.ndarray,
    *,
    tol: float = 1e-10,
    max_iter: int = 50,
) -> np.ndarray:
    """Newton on interior unknowns; ``residual_and_jacobian(u) -> (F, banded J (3, m))``."""
    # Imported here, not at the top: every `hpcopt train` imports all problems, and scipy
    # would add about a second to the start of every rank of the problems that never use it.
    from scipy.linalg import solve_banded

    for _ in range(max_iter):
        residual, banded = residual_and_jacobian(u)
        delta = solve_banded((1, 1), banded, -residual)
        u = u + delta
        if np.max(np.abs(delta)) < tol:
            return u
    raise RuntimeError("finite-difference Newton solve did not converge")


def steady_reference(points: int = 4001, diffusion: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(x, u)`` on a uniform grid of ``points`` nodes: FD Newton solve of the steady problem."""
    x = np.linspace(0.0, 1.0, points)
    h = x[1] - x[0]
    m = points - 2
    left, right = 1.0, -1.0

    def residual_and_jacobian(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        full = np.concatenate([[left], u, [right]])
        second = (full[:-2] - 2 * full[1:-1] + full[2:]) / h**2
        residual = -diffusion * second + u**3 - u
        banded = np.zeros((3, m))
        banded[0, 1:] = -diffusion / h**2
        banded[1, :] = 2 * diffusion / h**2 + 3 * u**2 - 1
        banded[2, :-1] = -diffusion / h**2
        return residual, banded

    # Start from the interface profile that solves the equation on the whole line:
    # from the straight line 1 - 2x, Newton diverges for small D.
    interface = -np.tanh((x[1:-1] - 0.5) / np.sqrt(2 * diffusion))
    u = _tridiagonal_newton(residual_and_jacobian, interface)
    return x, np.concatenate([[left], u, [right]])


def time_reference(
    nx: int = 801, nt: int = 2000, diffusion: float = 0.01, final_time: float = 1.0, *, save_every: int = 20
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, t, u[t, x])``: implicit Euler with a Newton solve per step (first order in time).

    ``nt`` steps of ``final_time / nt``; every ``save_every``-th time level is kept.
    """
    x = np.linspace(0.0, 1.0, nx)
    h = x[1] - x[0]
    dt = final_time / nt
    m = nx - 2
    left, right = 1.0, -1.0
    u = 1.0 - 2.0 * x[1:-1]
    saved_t, saved_u = [0.0], [np.concatenate([[left], u, [right]])]
    for step in range(1, nt + 1):
        previous = u

        def residual_and_jacobian(v: np.ndarray, previous: np.ndarray = previous) -> tuple[np.ndarray, np.ndarray]:
            full = np.concatenate([[left], v, [right]])
            second = (full[:-2] - 2 * full[1:-1] + full[2:]) / h**2
            residual = (v - previous) / dt - diffusion * second + v**3 - v
            banded = np.zeros((3, m))
            banded[0, 1:] = -diffusion / h**2
            banded[1, :] = 1.0 / dt + 2 * diffusion / h**2 + 3 * v**2 - 1
            banded[2, :-1] = -diffusion / h**2
            return residual, banded

        u = _tridiagonal_newton(residual_and_jacobian, previous)
        if step % save_every == 0:
            saved_t.append(step * dt)
            saved_u.append(np.concatenate([[left], u, [right]]))
    return x, np.array(saved_t), np.stack(saved_u)


class _AllenCahnOptionDocs(ProblemOptions):
    """What the options of both Allen–Cahn problems mean; each problem's dataclass has its own subset.

    The two dataclasses do not share fields by inheritance because the time problem
    lists ``initial`` and ``final_time`` between the shared ones (error messages list
    the options in field order); this base documents them all once.

    Attributes:
        interior: collocation points of the PDE residual, uniform random.
        boundary: boundary points (both ends; in time, both sides).
        initial: initial-condition points at ``t = 0``.
        diffusion: the diffusion coefficient ``D``.
        final_time: the end ``T`` of the time interval.
        val_grid: validation points per axis.
        width: hidden units per layer of ``pinn-mlp``.
        depth: hidden layers of ``pinn-mlp``.
    """


@dataclass
class AllenCahnOptions(_AllenCahnOptionDocs):
    """Options of ``allen-cahn`` (steady, 1-D)."""

    problem: ClassVar[str] = "allen-cahn"
    # Measured in docs/problems.md ("Defaults for train"): the target ends the run (after
    # ~50 full-batch steps); the epochs and the time limit only cap it.
    train_defaults: ClassVar[TrainingDefaults] = TrainingDefaults(
        epochs=2000, eval_every=10, target=1e-2, time_limit=110, optimizer_options=GAUSS_NEWTON_DEFAULTS
    )
    minimum: ClassVar[Mapping[str, float]] = {
        "interior": 1,
        "boundary": 2,
        "diffusion": 1e-6,
        "val_grid": 2,
        "width": 1,
        "depth": 1,
    }

    interior: int = 256
    boundary: int = 2
    diffusion: float = 1.0
    val_grid: int = 1001
    width: int = 32
    depth: int = 3


@dataclass
class AllenCahnTimeOptions(_AllenCahnOptionDocs):
    """Options of ``allen-cahn-time`` (1-D + time)."""

    problem: ClassVar[str] = "allen-cahn-time"
    # Measured in docs/problems.md ("Defaults for train"): the target ends the run (after ~35 full-batch steps).
    train_defaults: ClassVar[TrainingDefaults] = TrainingDefaults(
        epochs=2000, eval_every=5, target=1e-2, time_limit=110, optimizer_options=GAUSS_NEWTON_DEFAULTS
    )
    minimum: ClassVar[Mapping[str, float]] = {
        "interior": 1,
        "boundary": 2,
        "initial": 1,
        "diffusion": 1e-6,
        "final_time": 1e-6,
        "val_grid": 2,
        "width": 1,
        "depth": 1,
    }

    interior: int = 2000
    boundary: int = 200
    initial: int = 200
    diffusion: float = 0.01
    final_time: float = 1.0
    val_grid: int = 101
    width: int = 32
    depth: int = 3


class _AllenCahnBase(Problem):
    metric_name = "val_rel_l2_error"
    metric_higher_is_better = False
    default_model = "pinn-mlp"
    models = ("pinn-mlp",)
    dim: int
    width: int
    depth: int

    def _make_model(self, name: str) -> nn.Module:
        return models.pinn_mlp(self.dim, self.width, self.depth)

    def criterion(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.mean((outputs - targets) ** 2)

    def jet_points(self, inputs: Tensor) -> Tensor:
        return inputs[:, : self.dim]

    def outputs_from_jet(self, jet: ScalarJet, inputs: Tensor) -> Tensor:
        """``forward``'s outputs from the jet of ``u`` (the pipelined path of APTS-IP)."""
        is_value = inputs[:, self.dim] > 0.5
        return torch.where(is_value, jet.value, self.residual_from_jet(jet))

    @abc.abstractmethod
    def residual_from_jet(self, jet: ScalarJet) -> Tensor:
        """The PDE residual at every row, from ``u``, ``∂_i u`` and ``∂_i² u`` (axis 0 is x)."""

    def eval_sums(self, net: Net, data: Dataset) -> Tensor:
        """``[Σ (u - u_ref)², Σ u_ref², count]`` over validation rows (all value rows)."""
        squared_error, squared_target = 0.0, 0.0
        with torch.no_grad(), evaluation_mode(net):
            for chunk in data.chunks():
                outputs = net(chunk.inputs[:, : self.dim]).squeeze(-1).to(torch.float64)
                targets = chunk.targets.to(torch.float64)
                squared_error += torch.sum((outputs - targets) ** 2).item()
                squared_target += torch.sum(targets**2).item()
        return as_sums(squared_error, squared_target, len(data))

    def eval_metrics(self, sums: Tensor) -> dict[str, float]:
        squared_error, squared_target, count = sums.tolist()
        relative = math.sqrt(squared_error / (squared_target if squared_target > 0 else 1.0))
        return {"val_loss": squared_error / max(count, 1.0), "val_rel_l2_error": relative}

    @staticmethod
    def _dataset(points: Tensor, flag: Tensor, targets: Tensor, generator: torch.Generator) -> Dataset:
        # Shuffled so that contiguous per-rank slices each mix residual and value rows.
        order = torch.randperm(len(points), generator=generator)
        inputs = torch.cat([points, flag[:, None]], dim=1)[order]
        return Dataset(inputs.to(torch.float32), targets[order].to(torch.float32))


class AllenCahnProblem(_AllenCahnBase):
    """Steady 1-D Allen–Cahn PINN (see the module docstring)."""

    name = "allen-cahn"
    dim = 1

    def __init__(
        self, *, data_dir: str | None = None, seed: int = 0, options: Mapping[str, object] | None = None
    ) -> None:
        del data_dir  # the data are generated
        opts = build_options(AllenCahnOptions, options)
        self.diffusion = opts.diffusion
        self.width, self.depth = opts.width, opts.depth
        generator = torch.Generator().manual_seed(seed)
        n_interior, n_boundary = opts.interior, opts.boundary
        interior = torch.rand(n_interior, 1, generator=generator, dtype=torch.float64)
        ends = (torch.arange(n_boundary) % 2).to(torch.float64)[:, None]  # alternately x = 0 and x = 1
        points = torch.cat([interior, ends])
        flag = torch.cat([torch.zeros(n_interior), torch.ones(n_boundary)]).to(torch.float64)
        targets = torch.cat([torch.zeros(n_interior, dtype=torch.float64), 1.0 - 2.0 * ends[:, 0]])
        self.train = self._dataset(points, flag, targets, generator)
        self.default_batch_size = opts.train_defaults.batch_for(len(self.train))
        val_points = opts.val_grid
        # Reference on a grid 4x finer than validation (nodes coincide), at least 4001 nodes.
        refine = max(4, math.ceil(4000 / max(val_points - 1, 1)))
        x, u = steady_reference((val_points - 1) * refine + 1, self.diffusion)
        x_val, u_val = torch.from_numpy(x[::refine]), torch.from_numpy(u[::refine])
        inputs = torch.stack([x_val, torch.ones_like(x_val)], dim=1)
        self.val = Dataset(inputs.to(torch.float32), u_val.to(torch.float32))

    def residual(self, net: Net, points: Tensor) -> Tensor:
        """``-D u'' + u³ - u`` at ``points`` ``(n, 1)``."""
        value = net(points).squeeze(-1)
        return -self.diffusion * laplacian(net, points) + value**3 - value

    def residual_from_jet(self, jet: ScalarJet) -> Tensor:
        value = jet.value
        return -self.diffusion * jet.second[:, 0] + value**3 - value

    def forward(self, net: Net, inputs: Tensor) -> Tensor:
        points = inputs[:, :1]
        is_value = inputs[:, 1] > 0.5
        return torch.where(is_value, net(points).squeeze(-1), self.residual(net, points))


class AllenCahnTimeProblem(_AllenCahnBase):
    """Time-dependent 1-D Allen–Cahn PINN; inputs ``(x, t, flag)`` (see the module docstring)."""

    name = "allen-cahn-time"
    dim = 2

    def __init__(
        self, *, data_dir: str | None = None, seed: int = 0, options: Mapping[str, object] | None = None
    ) -> None:
        del data_dir
        opts = build_options(AllenCahnTimeOptions, options)
        self.diffusion = opts.diffusion
        self.final_time = opts.final_time
        self.width, self.depth = opts.width, opts.depth
        generator = torch.Generator().manual_seed(seed)
        n_interior, n_boundary, n_initial = opts.interior, opts.boundary, opts.initial
        scale = torch.tensor([1.0, self.final_time], dtype=torch.float64)
        interior = torch.rand(n_interior, 2, generator=generator, dtype=torch.float64) * scale
        side = (torch.arange(n_boundary) % 2).to(torch.float64)
        boundary_t = torch.rand(n_boundary, generator=generator, dtype=torch.float64) * self.final_time
        boundary = torch.stack([side, boundary_t], dim=1)
        initial_x = torch.rand(n_initial, generator=generator, dtype=torch.float64)
        initial = torch.stack([initial_x, torch.zeros_like(initial_x)], dim=1)
        points = torch.cat([interior, boundary, initial])
        flag = torch.cat([torch.zeros(n_interior), torch.ones(n_boundary + n_initial)]).to(torch.float64)
        targets = torch.cat([torch.zeros(n_interior, dtype=torch.float64), 1.0 - 2.0 * side, 1.0 - 2.0 * initial_x])
        self.train = self._dataset(points, flag, targets, generator)
        self.default_batch_size = opts.train_defaults.batch_for(len(self.train))
        per_axis = opts.val_grid
        x_refine, t_refine = 4, 10
        x, t, u = time_reference(
            (per_axis - 1) * x_refine + 1,
            (per_axis - 1) * t_refine,
            self.diffusion,
            self.final_time,
            save_every=t_refine,
        )
        x_val = torch.from_numpy(x[::x_refine])
        t_val = torch.from_numpy(t)
        u_val = torch.from_numpy(u[:, ::x_refine])  # (time, x)
        grid_t, grid_x = torch.meshgrid(t_val, x_val, indexing="ij")
        inputs = torch.stack(
            [grid_x.reshape(-1), grid_t.reshape(-1), torch.ones(grid_x.numel(), dtype=torch.float64)], 1
        )
        self.val = Dataset(inputs.to(torch.float32), u_val.reshape(-1).to(torch.float32))

    def residual(self, net: Net, points: Tensor) -> Tensor:
        """``u_t - D u_xx + u³ - u`` at ``points`` ``(n, 2)`` = ``(x, t)``."""
        e_x = torch.zeros_like(points)
        e_x[:, 0] = 1.0
        e_t = torch.zeros_like(points)
        e_t[:, 1] = 1.0
        # torch.func.jvp is annotated as a 2- or 3-tuple whatever has_aux says.
        value, u_t = cast("tuple[Tensor, Tensor]", jvp(net, (points,), (e_t,)))

        def slope_x(at: Tensor) -> Tensor:
            return jvp(net, (at,), (e_x,))[1]

        u_xx = jvp(slope_x, (points,), (e_x,))[1]
        value, u_t, u_xx = value.squeeze(-1), u_t.squeeze(-1), u_xx.squeeze(-1)
        return u_t - self.diffusion * u_xx + value**3 - value

    def residual_from_jet(self, jet: ScalarJet) -> Tensor:
        # Axis 1 is t: its first derivative is u_t (the jet's u_tt and u_x go unused).
        value = jet.value
        return jet.first[:, 1] - self.diffusion * jet.second[:, 0] + value**3 - value

    def forward(self, net: Net, inputs: Tensor) -> Tensor:
        points = inputs[:, :2]
        is_value = inputs[:, 2] > 0.5
        return torch.where(is_value, net(points).squeeze(-1), self.residual(net, points))
