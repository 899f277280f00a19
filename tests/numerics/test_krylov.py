"""CG and Steihaug-Toint CG against numpy / scipy in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

from hpcopt.numerics.krylov.cg import SteihaugExit, cg, default_dot, steihaug_cg

N = 30


def _spd(n: int, seed: int, condition: float = 100.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigenvalues = np.geomspace(1.0, condition, n)
    return (q * eigenvalues) @ q.T


def _symmetric(eigenvalues: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return (q * eigenvalues) @ q.T


def _matvec(a: np.ndarray, counter: list[int] | None = None):
    matrix = torch.from_numpy(a)

    def apply(v: torch.Tensor) -> torch.Tensor:
        if counter is not None:
            counter[0] += 1
        return matrix.to(v.dtype) @ v

    return apply


def _model_decrease(a: np.ndarray, g: np.ndarray, s: np.ndarray) -> float:
    return float(-(g @ s + 0.5 * s @ a @ s))


class CountingDot:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.calls += 1
        return default_dot(x, y)


@pytest.mark.timeout(60)
def test_cg_matches_numpy_and_scipy() -> None:
    a = _spd(N, seed=0, condition=10.0)
    b = np.random.default_rng(1).standard_normal(N)
    result = cg(_matvec(a), torch.from_numpy(b), rtol=1e-10)
    expected = np.linalg.solve(a, b)
    scipy_iterations: list[int] = []
    scipy_x, info = scipy.sparse.linalg.cg(
        a, b, rtol=1e-10, maxiter=10 * N, callback=lambda x: scipy_iterations.append(1)
    )
    assert info == 0
    assert result.converged
    assert result.iterations <= N
    assert abs(result.iterations - len(scipy_iterations)) <= 1
    assert result.solution.dtype == torch.float64
    np.testing.assert_allclose(result.solution.numpy(), expected, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(result.solution.numpy(), scipy_x, rtol=1e-7, atol=1e-9)
    assert result.residual_norm <= 1e-10 * np.linalg.norm(b) * 1.0001


@pytest.mark.timeout(60)
def test_cg_uses_custom_dot_warm_start_and_callback() -> None:
    a = _spd(N, seed=2)
    b = torch.from_numpy(np.random.default_rng(3).standard_normal(N))
    dot = CountingDot()
    seen: list[int] = []
    x0 = torch.from_numpy(np.linalg.solve(a, b.numpy())) + 1e-3
    x0_copy = x0.clone()
    result = cg(_matvec(a), b, dot=dot, x0=x0, rtol=1e-12, callback=lambda k, x: seen.append(k))
    assert dot.calls >= 2 * result.iterations
    assert seen == list(range(1, result.iterations + 1))
    assert torch.equal(x0, x0_copy)
    assert result.converged
    np.testing.assert_allclose(result.solution.numpy(), np.linalg.solve(a, b.numpy()), rtol=1e-8)


@pytest.mark.timeout(60)
def test_cg_atol_max_iter_and_float32() -> None:
    a = _spd(N, seed=4)
    b = torch.from_numpy(np.random.default_rng(5).standard_normal(N))
    limited = cg(_matvec(a), b, rtol=0.0, atol=0.0, max_iter=3)
    assert limited.iterations == 3 and not limited.converged
    loose = cg(_matvec(a), b, rtol=0.0, atol=1e3)
    assert loose.converged and loose.iterations == 0
    single = cg(_matvec(a), b.float(), rtol=1e-4)
    assert single.solution.dtype == torch.float32
    assert single.converged


@pytest.mark.timeout(60)
def test_cg_stops_on_non_positive_curvature() -> None:
    a = -np.eye(4)
    result = cg(_matvec(a), torch.ones(4, dtype=torch.float64))
    assert not result.converged
    assert result.iterations == 0
    with pytest.raises(ValueError, match="cg tolerances"):
        cg(_matvec(a), torch.ones(4, dtype=torch.float64), rtol=-1.0)
    # Internal contract, not user input: ordinary exceptions that keep their traceback.
    with pytest.raises(ValueError, match="rhs must be a flat 1-D tensor"):
        cg(_matvec(a), torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="rhs must be a flat 1-D tensor"):
        cg(_matvec(a), [1.0, 1.0, 1.0, 1.0])  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_steihaug_interior_equals_newton_step() -> None:
    a = _spd(N, seed=6)
    g = np.random.default_rng(7).standard_normal(N)
    newton = np.linalg.solve(a, -g)
    counter = [0]
    dot = CountingDot()
    result = steihaug_cg(
        _matvec(a, counter),
        torch.from_numpy(g),
        float(10 * np.linalg.norm(newton)),
        dot=dot,
        rtol=1e-12,
        max_iter=3 * N,
    )
    assert result.exit is SteihaugExit.CONVERGED
    assert result.negative_curvature_direction is None
    np.testing.assert_allclose(result.step.numpy(), newton, rtol=1e-8, atol=1e-10)
    assert result.pred == pytest.approx(_model_decrease(a, g, result.step.numpy()), rel=1e-10)
    # pred comes from tracked quantities: no matvec beyond the CG iterations.
    assert counter[0] == result.iterations
    assert dot.calls <= 2 * result.iterations + 3


@pytest.mark.timeout(60)
def test_steihaug_leaving_ball_stops_on_boundary() -> None:
    a = _spd(N, seed=8)
    g = np.random.default_rng(9).standard_normal(N)
    radius = 0.3 * np.linalg.norm(np.linalg.solve(a, -g))
    result = steihaug_cg(_matvec(a), torch.from_numpy(g), float(radius))
    step = result.step.numpy()
    assert result.exit is SteihaugExit.BOUNDARY
    assert np.linalg.norm(step) == pytest.approx(radius, rel=1e-6)
    assert result.pred > 0
    assert result.pred == pytest.approx(_model_decrease(a, g, step), rel=1e-10)


@pytest.mark.timeout(60)
def test_steihaug_negative_curvature_in_first_direction() -> None:
    a = np.diag([-2.0, 1.0, 3.0, 4.0])
    g = np.array([1.0, 0.1, -0.2, 0.05])
    assert g @ a @ g < 0
    radius = 0.7
    result = steihaug_cg(_matvec(a), torch.from_numpy(g), radius)
    step = result.step.numpy()
    assert result.exit is SteihaugExit.NEGATIVE_CURVATURE
    assert result.iterations == 1
    assert np.linalg.norm(step) == pytest.approx(radius, rel=1e-6)
    np.testing.assert_allclose(step, -radius * g / np.linalg.norm(g), rtol=1e-10)
    assert result.pred > 0
    assert result.pred == pytest.approx(_model_decrease(a, g, step), rel=1e-10)
    direction = result.negative_curvature_direction
    assert direction is not None
    assert float(direction.numpy() @ a @ direction.numpy()) < 0


@pytest.mark.timeout(60)
def test_steihaug_negative_curvature_later_picks_lower_root() -> None:
    eigenvalues = np.concatenate([np.linspace(1.0, 5.0, N - 3), [-0.5, -1.0, -3.0]])
    a = _symmetric(eigenvalues, seed=10)
    # A gradient with little weight on the negative eigenvectors makes CG take a few
    # positive-curvature steps before it meets negative curvature.
    _, vectors = np.linalg.eigh(a)
    weights = np.ones(N)
    weights[:3] = 1e-2
    g = vectors @ weights
    radius = 50.0
    result = steihaug_cg(_matvec(a), torch.from_numpy(g), radius, rtol=1e-12, max_iter=N)
    step = result.step.numpy()
    assert result.exit is SteihaugExit.NEGATIVE_CURVATURE
    assert result.iterations > 1
    assert np.linalg.norm(step) == pytest.approx(radius, rel=1e-6)
    assert result.pred > 0
    assert result.pred == pytest.approx(_model_decrease(a, g, step), rel=1e-9)
    assert result.negative_curvature_direction is not None
    direction = result.negative_curvature_direction.numpy()
    assert direction @ a @ direction <= 0
    # The other point where the line through the step along d meets the sphere
    # (||s + t d|| = radius has roots 0 and -2 s'd / d'd) must not be better.
    other = step - 2.0 * (step @ direction) / (direction @ direction) * direction
    assert np.linalg.norm(other) == pytest.approx(radius, rel=1e-9)
    assert _model_decrease(a, g, other) <= result.pred + 1e-9


@pytest.mark.timeout(60)
def test_steihaug_matches_scipy_subproblem() -> None:
    trust_ncg = pytest.importorskip("scipy.optimize._trustregion_ncg")
    for seed, eigenvalues, radius in [
        (12, np.geomspace(1.0, 50.0, N), 100.0),
        (13, np.geomspace(1.0, 50.0, N), 0.2),
        (14, np.concatenate([np.linspace(0.5, 4.0, N - 2), [-1.0, -2.0]]), 2.0),
    ]:
        a = _symmetric(eigenvalues, seed)
        g = np.random.default_rng(seed).standard_normal(N)
        subproblem = trust_ncg.CGSteihaugSubproblem(np.zeros(N), lambda x: 0.0, lambda x, g=g: g, hess=lambda x, a=a: a)
        expected, _ = subproblem.solve(radius)
        result = steihaug_cg(_matvec(a), torch.from_numpy(g), radius, max_iter=10 * N)
        np.testing.assert_allclose(result.step.numpy(), expected, rtol=1e-7, atol=1e-9)


@pytest.mark.timeout(60)
def test_steihaug_degenerate_inputs() -> None:
    a = _spd(6, seed=15)
    zero = steihaug_cg(_matvec(a), torch.zeros(6, dtype=torch.float64), 1.0)
    assert zero.exit is SteihaugExit.CONVERGED and zero.pred == 0.0 and zero.iterations == 0
    assert torch.count_nonzero(zero.step) == 0

    nan_result = steihaug_cg(lambda v: v * float("nan"), torch.ones(6, dtype=torch.float64), 1.0)
    assert nan_result.exit is SteihaugExit.NONFINITE
    assert torch.isfinite(nan_result.step).all()
    assert math.isfinite(nan_result.pred)

    g = torch.from_numpy(np.random.default_rng(16).standard_normal(6))
    limited = steihaug_cg(_matvec(a), g, 1e6, rtol=0.0, max_iter=2)
    assert limited.exit is SteihaugExit.MAX_ITERS and limited.iterations == 2
    assert limited.pred == pytest.approx(_model_decrease(a, g.numpy(), limited.step.numpy()), rel=1e-10)

    single = steihaug_cg(_matvec(a), g.float(), 0.5)
    assert single.step.dtype == torch.float32
    assert float(single.step.norm()) <= 0.5 * (1 + 1e-5)

    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="trust-region radius"):
            steihaug_cg(_matvec(a), g, bad)
