"""NLCG with M = I and an exact line search on a quadratic is linear CG (docs/algorithms.md §5).

On f(θ) = ½θᵀAθ − bᵀθ, Fletcher–Reeves and Polak–Ribière coincide with linear CG
when every step length is the exact minimiser along d, α = −gᵀd / dᵀAd (successive
gradients are then orthogonal, so rₖᵀrₖ₋₁ = 0).  The optimizer's own direction code
(:meth:`NLCG.search_direction`) is driven with that α, and its iterates are compared
with scipy's linear CG on the normal equations of the least-squares problem.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import cg

from hpcopt.errors import ConfigError
from hpcopt.optimizers import NLCG, make_config
from tests.conftest import ObjectiveFactory

pytestmark = pytest.mark.timeout(60)

OPTIONS = {"n": 400, "dim": 6, "noise": 0.3}


#: Column scales of the inputs: they spread A's eigenvalues over ~0.1 … ~10, so CG needs every iteration.
SCALES = torch.tensor([0.3, 0.5, 1.0, 1.5, 2.0, 3.0])


def _stretched_objective(objective_factory: ObjectiveFactory):
    """The least-squares objective on scaled inputs, this rank's contiguous shard of them."""
    from hpcopt.comm import Communicator
    from hpcopt.problems import make_problem

    comm = Communicator()
    problem = make_problem("quadratic", seed=0, options=OPTIONS)
    size = len(problem.train) // comm.size
    rows = slice(comm.rank * size, (comm.rank + 1) * size)
    batch = problem.train.inputs[rows] * SCALES, problem.train.targets[rows]
    objective = objective_factory(problem, batch=batch, comm=comm)
    return objective, problem.train.inputs[: size * comm.size] * SCALES, problem.train.targets[: size * comm.size]


def _normal_equations(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """A and b of ½·mean((Xθ − y)²) = ½θᵀAθ − bᵀθ + const, in float64 (θ = weight, then bias)."""
    design = np.concatenate([inputs.double().numpy(), np.ones((len(inputs), 1))], axis=1)
    y = targets.double().numpy()
    return design.T @ design / len(y), design.T @ y / len(y)


def _scipy_cg_iterates(matrix: np.ndarray, rhs: np.ndarray, start: np.ndarray, iterations: int) -> list[np.ndarray]:
    iterates: list[np.ndarray] = []
    cg(matrix, rhs, x0=start, rtol=1e-14, atol=0.0, maxiter=iterations, callback=lambda x: iterates.append(x.copy()))
    return iterates


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("beta", ["fr", "pr"])
def test_identity_preconditioner_and_exact_line_search_is_linear_cg(
    objective_factory: ObjectiveFactory, beta: str
) -> None:
    objective, inputs, targets = _stretched_objective(objective_factory)
    # A large beta_max: linear CG's β = ‖rₖ‖²/‖rₖ₋₁‖² may exceed the paper's clip at 1.
    optimizer = NLCG(objective, make_config("nlcg", {"beta": beta, "precondition": False, "beta_max": 1e6}))
    matrix, rhs = _normal_equations(inputs, targets)
    start = optimizer.flat.data.double().numpy().copy()
    dimension = len(rhs)
    expected = _scipy_cg_iterates(matrix, rhs, start, dimension)
    assert len(expected) == dimension  # scipy did not stop early: every iterate is compared

    iterates, betas = [], []
    for _ in range(dimension):
        _, grad = objective.value_and_grad()
        direction, beta_used, _, _ = optimizer.search_direction(grad)
        d = direction.double().numpy()
        length = -float(grad.double().numpy() @ d) / float(d @ matrix @ d)
        optimizer.move(direction, length)
        iterates.append(optimizer.flat.data.double().numpy().copy())
        betas.append(beta_used)

    scale = np.linalg.norm(expected[-1])
    for k, (ours, reference) in enumerate(zip(iterates, expected, strict=True)):
        assert np.linalg.norm(ours - reference) <= 1e-3 * scale, f"iterate {k + 1}"  # float32 gradients
    # n steps of CG on an n-dimensional quadratic reach the solution of Aθ = b.
    solution = np.linalg.solve(matrix, rhs)
    assert np.linalg.norm(iterates[-1] - solution) <= 1e-3 * np.linalg.norm(solution)
    assert np.linalg.norm(iterates[1] - solution) > 1e-2 * np.linalg.norm(solution)  # not solved by one step
    assert all(b > 0 for b in betas[1:])  # the conjugacy term is exercised at every step


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("beta", ["fr", "pr"])
def test_curvature_step_length_on_a_quadratic_is_linear_cg(objective_factory: ObjectiveFactory, beta: str) -> None:
    """``step_length=curvature`` computes the exact α itself: on a linear least-squares
    problem the Gauss–Newton matrix is A, so ``step()`` alone follows scipy's CG."""
    objective, inputs, targets = _stretched_objective(objective_factory)
    options = {"beta": beta, "precondition": False, "beta_max": 1e6, "loss_average": False, "lr": 1.0}
    options |= {"step_length": "curvature", "curvature_fraction": 1.0}
    optimizer = NLCG(objective, make_config("nlcg", options))
    matrix, rhs = _normal_equations(inputs, targets)
    start = optimizer.flat.data.double().numpy().copy()
    expected = _scipy_cg_iterates(matrix, rhs, start, len(rhs))
    scale = np.linalg.norm(expected[-1])
    for k, reference in enumerate(expected):
        result = optimizer.step()
        assert result.extras["restarted"] is False
        ours = optimizer.flat.data.double().numpy()
        # float32 here also in α's curvature product, not only in the gradient: 3e-3, not 1e-3
        assert np.linalg.norm(ours - reference) <= 3e-3 * scale, f"iterate {k + 1}"


@pytest.mark.mpi(min_size=1)
def test_curvature_step_length_restarts_a_direction_that_does_not_descend(
    objective_factory: ObjectiveFactory,
) -> None:
    """A stored direction pointing uphill is replaced by the preconditioned gradient, β by 0."""
    objective, _, _ = _stretched_objective(objective_factory)
    options = {"precondition": False, "loss_average": False, "step_length": "curvature", "curvature_fraction": 1.0}
    optimizer = NLCG(objective, make_config("nlcg", options))
    optimizer.step()
    assert optimizer.direction is not None
    _, grad = objective.value_and_grad()
    optimizer.direction = grad.clone() * 100.0  # uphill, and large enough to dominate z + β·d
    before = optimizer.flat.data.clone()
    result = optimizer.step()
    assert result.extras["restarted"] is True and result.extras["beta"] == 0.0
    assert float(result.extras["slope"]) < 0
    assert objective.value() < float(result.loss)  # the restarted step went downhill
    assert not torch.equal(before, optimizer.flat.data)


@pytest.mark.mpi(min_size=1)
def test_curvature_step_length_damping_adds_lambda_times_the_squared_direction(
    objective_factory: ObjectiveFactory,
) -> None:
    options = {"precondition": False, "loss_average": False, "step_length": "curvature", "curvature_fraction": 1.0}
    plain = NLCG(_stretched_objective(objective_factory)[0], make_config("nlcg", options))
    damped = NLCG(_stretched_objective(objective_factory)[0], make_config("nlcg", {**options, "damping": 0.5}))
    first, second = plain.step(), damped.step()
    assert plain.direction is not None
    squared = float(torch.dot(plain.direction, plain.direction))
    assert float(second.extras["dBd"]) == pytest.approx(float(first.extras["dBd"]) + 0.5 * squared, rel=1e-5)
    assert float(second.extras["alpha"]) < float(first.extras["alpha"])


@pytest.mark.mpi(min_size=1)
def test_fixed_step_lengths_do_not_reach_the_cg_iterates(objective_factory: ObjectiveFactory) -> None:
    """The comparison above can fail: with the configured lr instead of the exact α, NLCG is not CG."""
    objective, inputs, targets = _stretched_objective(objective_factory)
    optimizer = NLCG(objective, make_config("nlcg", {"precondition": False, "loss_average": False, "lr": 0.1}))
    matrix, rhs = _normal_equations(inputs, targets)
    start = optimizer.flat.data.double().numpy().copy()
    expected = _scipy_cg_iterates(matrix, rhs, start, len(rhs))
    for _ in range(len(rhs)):
        optimizer.step()
    ours = optimizer.flat.data.double().numpy()
    assert np.linalg.norm(ours - expected[-1]) > 1e-2 * np.linalg.norm(expected[-1])


def test_step_length_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="step_length must be one of fixed, curvature"):
        make_config("nlcg", {"step_length": "armijo"})
    with pytest.raises(ConfigError, match="curvature_fraction must be in"):
        make_config("nlcg", {"step_length": "curvature", "curvature_fraction": 0.0})
    with pytest.raises(ConfigError, match="damping must be >= 0"):
        make_config("nlcg", {"damping": -1.0})


def test_beta_max_may_exceed_one_but_not_be_negative() -> None:
    assert make_config("nlcg", {"beta_max": 1e6}).beta_max == 1e6
    with pytest.raises(ConfigError, match="beta_max must be >= 0"):
        make_config("nlcg", {"beta_max": -1.0})


def test_search_direction_and_move_are_one_step(objective_factory: ObjectiveFactory) -> None:
    """step() is search_direction() then move(lr·c): the hook drives the same code."""
    first = NLCG(objective_factory("quadratic", options=OPTIONS), make_config("nlcg", {"loss_average": False}))
    second = NLCG(objective_factory("quadratic", options=OPTIONS), make_config("nlcg", {"loss_average": False}))
    for _ in range(4):
        first.step()
        _, grad = second.objective.value_and_grad()
        direction, *_ = second.search_direction(grad)
        second.move(direction, second.config.learning_rate(second.steps))
    assert torch.equal(first.flat.data, second.flat.data)
