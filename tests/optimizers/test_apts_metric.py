"""APTS-D's ellipsoidal trust region (``metric=adam``): the norm, its coordinates, its ranks.

The metric is A = diag(√v̂ + ε)/mean(√v̂ + ε) with v̂ Adam's bias-corrected second
moment; every solve runs in u = A^½ s.  These tests check A against a float64
reference, the step of a first-order model against Adam's direction, the bound
‖s‖_A ≤ Δ of every combined step, and that every rank decides alike.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hpcopt.errors import ConfigError
from hpcopt.numerics.trust_region import make_subproblem_solver
from hpcopt.optimizers import make_config
from hpcopt.optimizers.apts.metric import AdamMetric, EuclideanMetric
from tests.optimizers.apts_support import outer_start
from tests.optimizers.test_apts_d import _all_equal, _setup

pytestmark = pytest.mark.timeout(120)


def _reference_diagonal(gradients: list[np.ndarray], beta: float, eps: float) -> np.ndarray:
    moment = np.zeros_like(gradients[0])
    for g in gradients:
        moment = beta * moment + (1 - beta) * g**2
    diagonal = np.sqrt(moment / (1 - beta ** len(gradients))) + eps
    return diagonal / diagonal.mean()


def test_the_diagonal_is_adams_second_moment_normalised_to_mean_one() -> None:
    rng = np.random.default_rng(0)
    gradients = [rng.standard_normal(50) * np.linspace(0.01, 3.0, 50) for _ in range(4)]
    metric = AdamMetric(beta=0.9, eps=1e-8)
    for g in gradients:
        metric.update(torch.tensor(g, dtype=torch.float64))
    expected = _reference_diagonal(gradients, 0.9, 1e-8)
    assert metric.inverse_root is not None
    np.testing.assert_allclose(metric.inverse_root.numpy() ** -2, expected, rtol=1e-12)
    assert abs(float(metric.inverse_root.pow(-2).mean()) - 1.0) < 1e-12


def test_a_first_order_model_steps_along_adams_direction_to_the_ellipsoids_edge() -> None:
    # The Cauchy step of the scaled model is u = −Δ A^-½g/‖A^-½g‖, so s = A^-½u ∝ −A⁻¹g
    # (Adam's direction) with ‖s‖_A = ‖u‖ = Δ.
    rng = np.random.default_rng(1)
    g = torch.tensor(rng.standard_normal(40) * np.geomspace(1e-3, 1.0, 40), dtype=torch.float64)
    metric = AdamMetric(beta=0.999)
    metric.update(g)
    radius = 0.3
    result = make_subproblem_solver("cauchy").solve(metric.gradient(g), radius)
    step = metric.step(result.step)
    diagonal = metric.inverse_root.pow(-2)  # type: ignore[union-attr]
    adam_direction = -g / diagonal
    cosine = float(step.dot(adam_direction) / (step.norm() * adam_direction.norm()))
    assert cosine > 1 - 1e-12
    assert math.isclose(float((diagonal * step * step).sum().sqrt()), radius, rel_tol=1e-12)
    # After one gradient v̂ = g², so Adam's first step is −g/(|g| + ε): the signs of −g
    # (up to ε/|g| ≤ 1e-3 here).
    np.testing.assert_allclose((adam_direction / adam_direction.abs().max()).numpy(), -np.sign(g.numpy()), atol=1e-3)


def test_the_scaled_curvature_is_a_half_b_a_half() -> None:
    rng = np.random.default_rng(2)
    m = rng.standard_normal((6, 6))
    b = torch.tensor(m @ m.T, dtype=torch.float64)
    metric = AdamMetric()
    metric.update(torch.tensor(rng.standard_normal(6), dtype=torch.float64))
    inverse_root = metric.inverse_root
    assert inverse_root is not None
    dense = torch.diag(inverse_root) @ b @ torch.diag(inverse_root)
    v = torch.tensor(rng.standard_normal(6), dtype=torch.float64)
    assert torch.allclose(metric.curvature(lambda x: b @ x)(v), dense @ v, rtol=1e-12)
    # A pair (s, y) in scaled coordinates: u = A^½ s, A^-½ y, so uᵀ(A^-½y) = sᵀy.
    s, y = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    u, y_u = metric.pair(s, y)
    assert math.isclose(float(u.dot(y_u)), float(s.dot(y)), rel_tol=1e-12)


def test_the_euclidean_metric_changes_nothing() -> None:
    metric = EuclideanMetric()
    v = torch.randn(5)
    metric.update(v)
    assert metric.step(v) is v and metric.gradient(v) is v


def test_state_dict_rebuilds_the_same_metric() -> None:
    metric = AdamMetric(beta=0.99)
    for _ in range(3):
        metric.update(torch.randn(30))
    restored = AdamMetric(beta=0.99)
    restored.load_state_dict(metric.state_dict())
    assert torch.equal(restored.inverse_root, metric.inverse_root)  # type: ignore[arg-type]
    fresh = AdamMetric()
    fresh.load_state_dict(AdamMetric().state_dict())
    assert fresh.inverse_root is None


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("local_solver", ["cauchy", "lsr1", "steihaug"])
def test_the_combined_step_stays_in_the_ellipsoid(local_solver: str) -> None:
    _comm, _, flat, objective, optimizer = _setup(
        "logistic", {"n": 400, "dim": 10}, local_solver=local_solver, metric="adam", radius=0.5
    )
    theta, loss_local, grad_local, grad = outer_start(flat, objective)
    optimizer.metric.update(grad)  # what step() does first
    step, _pred, scaled_norm, _raw, _counts = optimizer._combined_step(theta, loss_local, grad_local, grad)
    metric = optimizer.metric
    assert isinstance(metric, AdamMetric)
    inverse_root = metric.inverse_root
    assert inverse_root is not None
    # ‖s‖_A = ‖A^½ s‖ is the norm the ratio test and the radius see, and it is ≤ Δ.
    assert math.isclose(float((step / inverse_root).norm()), scaled_norm, rel_tol=1e-4)
    assert 0 < scaled_norm <= optimizer.radius * (1 + 1e-5)
    # A is anisotropic here, so the step is not the Euclidean one of the same length.
    assert float(inverse_root.max() / inverse_root.min()) > 2


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("local_solver", ["lsr1", "steihaug"])
def test_every_rank_decides_alike_with_the_ellipsoid(local_solver: str) -> None:
    comm, _, flat, _, optimizer = _setup(
        "logistic", {"n": 400, "dim": 10}, local_solver=local_solver, metric="adam", radius=0.5
    )
    losses = []
    for _ in range(8):
        result = optimizer.step()
        losses.append(result.loss)
        assert result.extras["combined_norm"] <= result.radius * (1 + 1e-5)
        assert _all_equal(comm, (result.accepted, result.ratio, optimizer.radius, flat.data.sum().item()))
    assert losses[-1] < losses[0]


@pytest.mark.mpi(min_size=1)
def test_apts_d_with_the_ellipsoid_reaches_the_known_minimiser() -> None:
    from hpcopt.problems import make_problem
    from hpcopt.problems.synthetic import QuadraticProblem
    from hpcopt.training.trainer import TrainConfig, train

    problem = make_problem("quadratic", options={"n": 400, "dim": 5})
    assert isinstance(problem, QuadraticProblem)
    result = train(
        TrainConfig(problem="quadratic", epochs=60, quiet=True), {"radius": 1.0, "metric": "adam"}, {"n": 400, "dim": 5}
    )
    exact = problem.exact_minimizer()
    error = float((result.parameters.double() - exact).norm() / exact.norm())
    assert error < 2e-3, f"relative distance to the minimiser {error:.2e}"


def test_metric_options_are_validated() -> None:
    for bad in (
        {"metric": "diagonal"},
        {"metric": "adam", "metric_beta": 1.0},
        {"metric": "adam", "metric_eps": 0.0},
        {"metric": "adam", "global_solver": "subspace"},
    ):
        with pytest.raises(ConfigError):
            make_config("apts-d", bad)
    with pytest.raises(ConfigError, match="metric"):
        make_config("apts-p", {"metric": "adam"})
