"""Distributed Hessian-free (docs/algorithms.md §4): solvers, negative curvature, damping, traffic, rank invariance.

Multi-rank tests run at 1 rank in the serial pass and under ``mpiexec -n 2|4``;
the COMM_SELF trick compares the distributed run with a single-process one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from hpcopt.comm import Communicator
from hpcopt.distributed.curvature_batch import curvature_rows
from hpcopt.distributed.data_parallel import DistributedCurvature
from hpcopt.errors import ConfigError, NonFiniteError
from hpcopt.numerics.krylov.martens import bicgstab, martens_cg
from hpcopt.optimizers import HessianFree, make_config
from hpcopt.problems import make_problem
from hpcopt.problems.base import Net
from hpcopt.problems.synthetic import QuadraticProblem
from hpcopt.training.trainer import TrainConfig, train
from tests.conftest import ObjectiveFactory

pytestmark = pytest.mark.timeout(60)

Q, C = 0.1, 5.0  # saddle f = x² + Q(y² − C)²: f(0, 0) = Q·C² = 2.5, Hessian diag(2, −4QC = −2)


@pytest.fixture
def hessian_free(objective_factory: ObjectiveFactory) -> Callable[..., HessianFree]:
    """HF with the options ``hf`` on the problem ``name`` with ``options``, its samples sharded over every rank."""

    def build(name: str, options: dict, **hf: object) -> HessianFree:
        return HessianFree(objective_factory(name, options=options), make_config("hf", hf))

    return build


class _Point(nn.Module):
    """Every row of the batch sees the parameter vector itself."""

    def __init__(self, start: list[float]) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(start, dtype=torch.float64))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.p.expand(inputs.shape[0], -1)


class _Saddle:
    """f(x, y) = x² + Q(y² − C)² through outputs z = (x, y²) and a convex criterion.

    The Gauss–Newton matrix diag(2, 8Qy²) is PSD and vanishes along y at the saddle,
    while the Hessian diag(2, 4Q(3y² − C)) has the eigenvalue −2 there.
    """

    def forward(self, net: Net, inputs: torch.Tensor) -> torch.Tensor:
        p = net(inputs)
        return torch.stack([p[:, 0], p[:, 1] ** 2], 1)

    def criterion(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.mean(outputs[:, 0] ** 2 + Q * (outputs[:, 1] - C) ** 2 + 0 * targets)


class _IndefiniteQuadratic:
    """f(θ) = ½θᵀAθ + bᵀθ with A = diag(3, 1, −1): unbounded below, its stationary point a saddle."""

    A = torch.tensor([3.0, 1.0, -1.0], dtype=torch.float64)
    b = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)

    def forward(self, net: Net, inputs: torch.Tensor) -> torch.Tensor:
        return net(inputs)

    def criterion(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.mean(0.5 * (outputs**2 * self.A).sum(1) + outputs @ self.b + 0 * targets)


@pytest.fixture
def toy_hf(objective_factory: ObjectiveFactory) -> Callable[..., HessianFree]:
    """HF with the options ``hf`` on a toy ``problem`` of the parameters ``start`` (``_Point``), 4 rows per rank."""

    def build(problem: object, start: list[float], **hf: object) -> HessianFree:
        objective = objective_factory(problem, model=_Point(start), batch=(torch.zeros(4, 1), torch.zeros(4)))
        return HessianFree(objective, make_config("hf", hf))

    return build


# -- solvers against dense references -------------------------------------------------


def test_martens_cg_and_bicgstab_match_a_dense_solve() -> None:
    generator = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator, dtype=torch.float64))
    spd = basis @ torch.diag(torch.linspace(0.5, 4.0, 8, dtype=torch.float64)) @ basis.T
    indefinite = basis @ torch.diag(torch.tensor([-3.0, -1.0, 0.5, 1, 2, 3, 4, 5], dtype=torch.float64)) @ basis.T
    grad = torch.randn(8, generator=generator, dtype=torch.float64)
    cg_result = martens_cg(lambda v: spd @ v, grad, max_iter=30, rtol=1e-12)
    expected = np.linalg.solve(spd.numpy(), -grad.numpy())
    np.testing.assert_allclose(cg_result.step.numpy(), expected, rtol=1e-8, atol=1e-10)
    # m(p) = gᵀp + ½pᵀAp from the recurrence, without an extra product.
    model = float(grad @ cg_result.step + 0.5 * cg_result.step @ spd @ cg_result.step)
    assert cg_result.model_value == pytest.approx(model, rel=1e-10)
    assert [s.iteration for s in cg_result.stored][:4] == [1, 2, 3, 4]
    bi = bicgstab(lambda v: indefinite @ v, grad, max_iter=40, rtol=1e-12)
    np.testing.assert_allclose(bi.step.numpy(), np.linalg.solve(indefinite.numpy(), -grad.numpy()), rtol=1e-7)
    assert bi.exit == "converged" and bi.products == bi.iterations


def test_martens_cg_warm_start_and_progress_rule() -> None:
    # An ill-conditioned SPD system: the relative-progress rule stops long before max_iter.
    n = 200
    diagonal = torch.logspace(-4, 0, n, dtype=torch.float64)
    grad = torch.ones(n, dtype=torch.float64)
    result = martens_cg(lambda v: diagonal * v, grad, max_iter=n, rtol=0.0, progress_tol=5e-3)
    assert result.exit == "progress" and result.iterations < n
    warm = martens_cg(lambda v: diagonal * v, grad, x0=0.95 * result.step, max_iter=5, rtol=0.0)
    assert warm.products == warm.iterations + 1  # the warm start's residual costs one product
    assert warm.model_value < result.model_value  # starting near the old solution pays off


def test_config_rejects_bad_options() -> None:
    with pytest.raises(ConfigError, match="solver"):
        make_config("hf", {"solver": "gmres"})
    with pytest.raises(ConfigError, match="curvature_fraction"):
        make_config("hf", {"curvature_fraction": 0})
    with pytest.raises(ConfigError, match="curvature"):
        make_config("hf", {"curvature": "fisher"})


def test_strided_curvature_rows_do_not_depend_on_the_rank_count() -> None:
    for fraction in (0.1, 0.15, 0.5, 1.0):
        single, total = curvature_rows(120, 0, 120, fraction, "strided")
        assert total == math.ceil(120 * fraction) == len(single)
        for world in (2, 4):
            size = 120 // world
            parts = [curvature_rows(size, r * size, 120, fraction, "strided") for r in range(world)]
            assert torch.equal(torch.cat([rows + r * size for r, (rows, _) in enumerate(parts)]), single)
            assert all(t == total for _, t in parts)


# -- the optimizer ----------------------------------------------------------------------


@pytest.mark.mpi(min_size=1)
def test_exact_cg_step_lands_on_the_minimiser_of_a_convex_quadratic(hessian_free: Callable[..., HessianFree]) -> None:
    optimizer = hessian_free(
        "quadratic", {"n": 400, "dim": 5}, damping=0.0, curvature_fraction=1.0, max_iterations=30, rtol=1e-7
    )
    problem, flat = optimizer.objective.problem, optimizer.flat
    assert isinstance(problem, QuadraticProblem)
    result = optimizer.step()
    exact = problem.exact_minimizer()
    error = float((flat.data.double() - exact).norm() / exact.norm())
    assert error < 1e-4, f"relative distance to the minimiser {error:.2e}"
    assert result.extras["chosen"] == "newton" and result.extras["line_search_t"] == 1.0
    assert result.ratio == pytest.approx(1.0, abs=1e-2)  # the quadratic model is exact


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize(("solver", "curvature"), [("cg", "ggn"), ("bicgstab", "hessian"), ("steihaug", "hessian")])
def test_exactly_one_collective_per_krylov_iteration(
    hessian_free: Callable[..., HessianFree], solver: str, curvature: str
) -> None:
    optimizer = hessian_free(
        "logistic", {"n": 400, "dim": 10}, solver=solver, curvature=curvature, curvature_fraction=0.25
    )
    comm, flat = optimizer.objective.comm, optimizer.flat
    n = flat.numel
    for _ in range(2):  # the second step of cg/bicgstab has a warm start
        calls, nbytes = comm.stats.calls, comm.stats.bytes
        result = optimizer.step()
        products = result.extras["curvature_products"]
        evaluations = result.extras["value_evaluations"]
        warm = products - result.extras["krylov_iterations"]
        assert warm in ((0,) if solver == "steihaug" else (0, 1))
        assert products >= 1
        # [g; f], one n-vector per product (no other collective in the solve), one scalar per trial value.
        assert comm.stats.calls - calls == 1 + products + evaluations
        assert comm.stats.bytes - nbytes == 4 * ((n + 1) + products * n + evaluations)


@pytest.mark.mpi(min_size=1)
def test_distributed_product_is_the_weighted_sum_of_local_products(hessian_free: Callable[..., HessianFree]) -> None:
    optimizer = hessian_free("logistic", {"n": 400, "dim": 10}, curvature="hessian")
    objective, flat = optimizer.objective, optimizer.flat
    comm = objective.comm
    matvec = optimizer.curvature_operator(damping=0.5)
    v = torch.linspace(-1, 1, flat.numel)
    calls = comm.stats.calls
    product = matvec(v)
    assert comm.stats.calls - calls == 1
    # Reference: the Hessian of the whole global batch in float64, on COMM_SELF.
    problem = make_problem("logistic", options={"n": 400, "dim": 10})
    rows = curvature_rows(len(problem.train), 0, len(problem.train), 0.1, "strided")[0]
    design = torch.cat([problem.train.inputs[rows], torch.ones(len(rows), 1)], 1).double()
    probability = torch.sigmoid(design @ flat.data.double())
    hessian = design.T @ (design * (probability * (1 - probability))[:, None]) / len(rows)
    expected = hessian @ v.double() + 0.5 * v.double()
    torch.testing.assert_close(product.double(), expected, rtol=1e-4, atol=1e-6)
    assert isinstance(matvec, DistributedCurvature) and objective.weight == 1 / comm.size


@pytest.mark.mpi(min_size=1)
def test_negative_curvature_leaves_the_saddle_where_gauss_newton_cg_stalls(
    toy_hf: Callable[..., HessianFree],
) -> None:
    start = [0.5, 1e-3]
    saddle_value = Q * C * C
    ggn = toy_hf(_Saddle(), start, solver="cg", curvature="ggn", damping=10.0)
    flat, objective = ggn.flat, ggn.objective
    for _ in range(3):
        ggn.step()
    assert objective.value() > saddle_value - 1e-3, "GGN-CG cannot see the negative curvature"
    assert abs(float(flat.data[1])) < 1e-2
    for solver in ("bicgstab", "steihaug"):
        hf = toy_hf(_Saddle(), start, solver=solver, curvature="hessian", damping=10.0)
        flat, objective = hf.flat, hf.objective
        for _ in range(3):
            result = hf.step()
        assert objective.value() < saddle_value - 2.0, f"{solver} stayed at the saddle"
        assert result.extras["curvature_steps"] >= 1
        assert abs(float(flat.data[1])) > 1.0


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("solver", ["bicgstab", "cg"])
def test_indefinite_quadratic_takes_the_curvature_step(toy_hf: Callable[..., HessianFree], solver: str) -> None:
    # Near the saddle in the third coordinate: BiCGSTAB's Newton step heads for the saddle
    # point, Martens' CG stops at the negative curvature; the step along ±d goes far below both.
    problem = _IndefiniteQuadratic()
    hf = toy_hf(problem, [0.2, 0.3, 1e-3], solver=solver, curvature="hessian", damping=1e-3, curvature_step_scale=4.0)
    flat, objective = hf.flat, hf.objective
    before = objective.value()
    result = hf.step()
    after = objective.value()
    newton_point = -problem.b / problem.A  # the stationary point: a saddle of f
    newton_value = float(0.5 * (newton_point**2 * problem.A).sum() + newton_point @ problem.b)
    assert result.extras["negative_curvature"] < -0.9  # d is close to the −1 eigenvector
    assert result.extras["chosen"] == "curvature" and result.extras["curvature_steps"] == 1
    assert after < min(before, newton_value) - 5.0
    assert torch.isfinite(flat.data).all()


class _Overconfident(HessianFree):
    """HF whose curvature model is 100x too flat: its steps overshoot, so ρ is bad."""

    scale = 0.01

    def curvature_operator(self, damping: float) -> DistributedCurvature:
        operator = super().curvature_operator(damping)
        operator.weight *= self.scale
        return operator


@pytest.mark.mpi(min_size=1)
def test_damping_rises_on_bad_ratios_and_falls_on_good_ones(hessian_free: Callable[..., HessianFree]) -> None:
    options = {"curvature_fraction": 1.0, "curvature": "hessian", "backtrack_iterates": False, "warm_start": 0.0}
    good = hessian_free("quadratic", {"n": 200, "dim": 4}, damping=1e-2, **options)
    objective = good.objective
    result = good.step()
    assert result.ratio > 0.75 and good.damping == pytest.approx(1e-2 * 2 / 3)
    bad = _Overconfident(objective, make_config("hf", {"damping": 1e-3, **options}))
    result = bad.step()
    assert not result.ratio > 0.25
    assert bad.damping == pytest.approx(1e-3 * 1.5)


@pytest.mark.mpi(min_size=1)
def test_non_finite_loss_is_a_clear_error(hessian_free: Callable[..., HessianFree]) -> None:
    optimizer = hessian_free("logistic", {"n": 200, "dim": 5})
    optimizer.flat.copy_(torch.full_like(optimizer.flat.data, math.nan))
    with pytest.raises(NonFiniteError, match="hf: the mini-batch loss is nan"):
        optimizer.step()


def _run(options: dict, comm: Communicator):
    cfg = TrainConfig(problem="logistic", optimizer="hf", epochs=2, batch_size=96, quiet=True, seed=5)
    return train(cfg, options, {"n": 480, "dim": 12}, comm=comm)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize(
    "options",
    [
        # Tolerances above float32 noise: a solve iterated into rounding noise amplifies the
        # different summation orders of 1, 2 and 4 ranks.
        {"solver": "cg", "curvature": "ggn", "curvature_fraction": 0.25, "rtol": 1e-3, "max_iterations": 10},
        {"solver": "bicgstab", "curvature": "hessian", "curvature_fraction": 0.5, "rtol": 1e-3, "max_iterations": 10},
        {"solver": "steihaug", "curvature": "hessian", "max_iterations": 10},
    ],
)
def test_rank_invariance_against_the_single_process_run(options: dict) -> None:
    distributed = _run(options, Communicator())
    alone = _run(options, Communicator(MPI.COMM_SELF))
    assert distributed.steps == alone.steps == 10
    torch.testing.assert_close(distributed.parameters, alone.parameters, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(distributed.losses), torch.tensor(alone.losses), rtol=1e-5, atol=1e-6)
    assert distributed.losses[-1] < distributed.losses[0]
