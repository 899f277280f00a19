"""The Neumann optimizer's inner iteration on a quadratic approximates the Newton step (docs/algorithms.md §6).

Krishnan et al. (§2) write the Newton step of a mini-batch quadratic
f̂(w) = ½wᵀAw − bᵀw as a Neumann series, −A⁻¹ĝ = −η Σₖ (I − ηA)ᵏ ĝ (for ‖I − ηA‖ < 1),
and replace each product A·m by a gradient at a displaced point, ∇f̂(w + m) − ∇f̂(w),
which is exact on a quadratic.  Here the optimizer runs on a least-squares quadratic
with the regularisers off (α = β = 0), a constant η and a constant μ, from a reset at
w₀; after K updates its model w − μm, minus w₀, is compared with

* μ = 0: the K-term partial sum of the Neumann series, computed with powers of A;
* μ > 0: the same recursion written with explicit products A·m in float64;

and the distance to the Newton step −A⁻¹ĝ(w₀) must shrink with K, faster with the
paper's μ = 0.9 than without momentum.  The same recursion is stable exactly while
ηλ_max(A) < 2(1 + μ)/(1 + 2μ), the bound ``benchmarks/neumann_sharpness.py`` measures the
method against on a network.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hpcopt.optimizers import Neumann, make_config
from tests.conftest import ObjectiveFactory, benchmark_script

pytestmark = pytest.mark.timeout(60)

OPTIONS = {"n": 400, "dim": 6, "noise": 0.3}
#: Column scales of the inputs: A's eigenvalues spread over ~0.1 … ~10, so the series needs many terms.
SCALES = torch.tensor([0.3, 0.5, 1.0, 1.5, 2.0, 3.0])
ETA = 0.08  # below 2/λ_max(A): the series converges


def _neumann_on_quadratic(objective_factory: ObjectiveFactory, mu: float, lr: float = ETA):
    """(optimizer, A, b): Neumann with constant η, μ and no regulariser on ½·mean((Xθ − y)²)."""
    from hpcopt.comm import Communicator
    from hpcopt.problems import make_problem

    comm = Communicator()
    problem = make_problem("quadratic", seed=0, options=OPTIONS)
    size = len(problem.train) // comm.size
    rows = slice(comm.rank * size, (comm.rank + 1) * size)
    objective = objective_factory(problem, batch=(problem.train.inputs[rows] * SCALES, problem.train.targets[rows]))
    inputs, targets = problem.train.inputs[: size * comm.size] * SCALES, problem.train.targets[: size * comm.size]
    design = np.concatenate([inputs.double().numpy(), np.ones((len(inputs), 1))], axis=1)
    matrix = design.T @ design / len(inputs)
    rhs = design.T @ targets.double().numpy() / len(inputs)
    # An "epoch" of 10⁹ steps keeps η = lr/(1 + e) and μ = clip(…, μ, μ) constant; warm-up off: step 0 resets.
    options = {"lr": lr, "alpha": 0.0, "beta_scale": 0.0, "mu_min": mu, "mu_max": mu, "epoch_steps": 10**9}
    options |= {"warmup_epochs": 0.0, "reset_epochs": 1.0}
    return Neumann(objective, make_config("neumann", options)), matrix, rhs


def _model_steps(optimizer: Neumann, updates: int) -> list[np.ndarray]:
    """w − μm − w₀ after each of ``updates`` updates following the reset at w₀."""
    start = optimizer.flat.data.double().numpy().copy()
    assert optimizer.step().extras["phase"] == "reset"
    steps = []
    for _ in range(updates):
        assert optimizer.step().extras["phase"] == "neumann"
        with optimizer.evaluation_parameters():
            steps.append(optimizer.flat.data.double().numpy() - start)
    return steps


def _float64_recursion(matrix: np.ndarray, gradient: np.ndarray, mu: float, updates: int) -> list[np.ndarray]:
    """§6's update with each gradient written as ĝ(w₀) + A·(w − w₀): the model's step after each update."""
    displacement = np.zeros_like(gradient)  # w − w₀ of the stored (displaced) weights
    m = -ETA * gradient  # the reset
    steps = []
    for _ in range(updates):
        d = gradient + matrix @ displacement
        m = mu * m - ETA * d
        displacement = displacement + mu * m - ETA * d
        steps.append(displacement - mu * m)
    return steps


@pytest.mark.mpi(min_size=1)
def test_without_momentum_the_steps_are_the_neumann_series_partial_sums(objective_factory: ObjectiveFactory) -> None:
    optimizer, matrix, rhs = _neumann_on_quadratic(objective_factory, mu=0.0)
    w0 = optimizer.flat.data.double().numpy().copy()
    gradient = matrix @ w0 - rhs
    steps = _model_steps(optimizer, 60)
    newton = -np.linalg.solve(matrix, gradient)
    contraction = np.eye(len(rhs)) - ETA * matrix
    term, partial_sum = -ETA * gradient, np.zeros_like(gradient)
    for k, step in enumerate(steps):
        partial_sum = partial_sum + term  # −η Σ_{j ≤ k} (I − ηA)ʲ ĝ
        term = contraction @ term
        assert np.linalg.norm(step - partial_sum) <= 1e-4 * np.linalg.norm(newton), f"update {k + 1}"
        # the series' remainder: Newton step − partial sum = −(I − ηA)^(k+1) A⁻¹ĝ
        remainder = np.linalg.norm(np.linalg.matrix_power(contraction, k + 1) @ newton)
        assert abs(np.linalg.norm(step - newton) - remainder) <= 1e-4 * np.linalg.norm(newton)
    errors = [np.linalg.norm(step - newton) / np.linalg.norm(newton) for step in steps]
    assert errors[0] > 0.9 and errors[-1] < 0.4  # a real approximation, improving with K …
    assert all(later < earlier for earlier, later in itertools.pairwise(errors))  # … at every term


@pytest.mark.mpi(min_size=1)
def test_with_momentum_gradients_at_displaced_points_replace_the_hessian_products(
    objective_factory: ObjectiveFactory,
) -> None:
    optimizer, matrix, rhs = _neumann_on_quadratic(objective_factory, mu=0.9)
    w0 = optimizer.flat.data.double().numpy().copy()
    gradient = matrix @ w0 - rhs
    steps = _model_steps(optimizer, 60)
    expected = _float64_recursion(matrix, gradient, 0.9, 60)
    newton = -np.linalg.solve(matrix, gradient)
    for k, (step, reference) in enumerate(zip(steps, expected, strict=True)):
        assert np.linalg.norm(step - reference) <= 1e-4 * np.linalg.norm(newton), f"update {k + 1}"
    error = np.linalg.norm(steps[-1] - newton) / np.linalg.norm(newton)
    assert error < 0.03  # 60 updates with μ = 0.9 are within 3 % of the Newton step

    plain, *_ = _neumann_on_quadratic(objective_factory, mu=0.0)
    plain_error = np.linalg.norm(_model_steps(plain, 60)[-1] - newton) / np.linalg.norm(newton)
    assert error < 0.1 * plain_error  # momentum accelerates the series (the paper's μ → 0.9)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("mu", [0.5, 0.9])
@pytest.mark.parametrize("fraction", [0.95, 1.05])
def test_the_update_is_stable_exactly_below_the_momentum_bound(
    objective_factory: ObjectiveFactory, mu: float, fraction: float
) -> None:
    _, matrix, rhs = _neumann_on_quadratic(objective_factory, mu)
    sharpest = float(np.linalg.eigvalsh(matrix)[-1])
    lr = fraction * 2 * (1 + mu) / (1 + 2 * mu) / sharpest
    stability_ratio = benchmark_script("neumann_sharpness").stability_ratio
    assert stability_ratio("neumann", lr, mu, lr, sharpest) == pytest.approx(fraction)
    optimizer, *_ = _neumann_on_quadratic(objective_factory, mu, lr=lr)
    minimiser = np.linalg.solve(matrix, rhs)
    w0 = optimizer.flat.data.double().numpy().copy()
    model = w0 + _model_steps(optimizer, 100)[-1]  # w − μm after 100 updates
    start, end = np.linalg.norm(w0 - minimiser), np.linalg.norm(model - minimiser)
    if fraction < 1:
        assert end < start  # every direction contracts, the sharpest one too
    else:
        assert end > 100 * start  # the sharpest direction grows by |root| > 1 per update
