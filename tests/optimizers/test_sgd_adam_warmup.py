"""The linear learning-rate warm-up of SGD and Adam against a float64 reference on least squares."""

from __future__ import annotations

import pytest
import torch

from hpcopt.errors import ConfigError
from hpcopt.optimizers import make_config
from hpcopt.optimizers.adam import Adam
from hpcopt.optimizers.sgd import SGD, linear_warmup
from hpcopt.problems.base import Problem
from tests.conftest import ObjectiveFactory

pytestmark = pytest.mark.timeout(60)

OPTIONS = {"n": 200, "dim": 4}
STEPS = 6
WARMUP = 4


def test_linear_warmup_schedule() -> None:
    assert [linear_warmup(1.0, t, 4) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [linear_warmup(0.3, t, 0) for t in range(3)] == [0.3, 0.3, 0.3]
    for name in ("sgd", "adam"):
        with pytest.raises(ConfigError, match="warmup_steps must be >= 0"):
            make_config(name, {"warmup_steps": -1})


def _gradient(problem: Problem, theta: torch.Tensor) -> torch.Tensor:
    """∇ of ½·mean((Xθ − y)²) in float64, θ = weight then bias, over the rows the objective holds."""
    design = torch.cat([problem.train.inputs, torch.ones(len(problem.train), 1)], 1).double()
    targets = problem.train.targets.double()
    return design.T @ (design @ theta - targets) / len(targets)


@pytest.mark.mpi(min_size=1)
def test_sgd_momentum_with_warmup_matches_the_reference(objective_factory: ObjectiveFactory) -> None:
    objective = objective_factory("quadratic", options=OPTIONS)
    if len(objective.problem.train) % objective.comm.size:
        pytest.skip("the reference uses every row")
    optimizer = SGD(objective, make_config("sgd", {"lr": 0.2, "momentum": 0.9, "warmup_steps": WARMUP}))
    theta = optimizer.flat.data.double().clone()
    buffer = torch.zeros_like(theta)
    for t in range(STEPS):
        optimizer.step()
        buffer = 0.9 * buffer + _gradient(objective.problem, theta)
        theta = theta - 0.2 * min(1.0, (t + 1) / WARMUP) * buffer
    torch.testing.assert_close(optimizer.flat.data.double(), theta, rtol=1e-4, atol=1e-6)
    no_warmup = SGD(objective_factory("quadratic", options=OPTIONS), make_config("sgd", {"lr": 0.2, "momentum": 0.9}))
    for _ in range(STEPS):
        no_warmup.step()
    assert float((no_warmup.flat.data.double() - theta).norm()) > 1e-3  # the warm-up changes the iterates


@pytest.mark.mpi(min_size=1)
def test_adam_with_warmup_matches_the_reference(objective_factory: ObjectiveFactory) -> None:
    objective = objective_factory("quadratic", options=OPTIONS)
    if len(objective.problem.train) % objective.comm.size:
        pytest.skip("the reference uses every row")
    optimizer = Adam(objective, make_config("adam", {"lr": 0.05, "warmup_steps": WARMUP}))
    theta = optimizer.flat.data.double().clone()
    first, second = torch.zeros_like(theta), torch.zeros_like(theta)
    for t in range(1, STEPS + 1):
        optimizer.step()
        grad = _gradient(objective.problem, theta)
        first = 0.9 * first + 0.1 * grad
        second = 0.999 * second + 0.001 * grad * grad
        lr = 0.05 * min(1.0, t / WARMUP)
        theta = theta - lr / (1 - 0.9**t) * first / ((second / (1 - 0.999**t)).sqrt() + 1e-8)
    torch.testing.assert_close(optimizer.flat.data.double(), theta, rtol=1e-4, atol=1e-6)
