"""Preconditioned nonlinear CG (docs/algorithms.md §5) against a float64 reference, and rank invariance."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from mpi4py import MPI

from hpcopt.comm import Communicator
from hpcopt.errors import ConfigError, NonFiniteError
from hpcopt.optimizers import NLCG, make_config
from hpcopt.optimizers.nlcg import diagonal_bfgs_update
from hpcopt.problems.base import Problem
from hpcopt.training.trainer import TrainConfig, train
from tests.conftest import ObjectiveFactory

pytestmark = pytest.mark.timeout(60)

OPTIONS = {"n": 200, "dim": 4}


@pytest.fixture
def nlcg(objective_factory: ObjectiveFactory) -> Callable[..., NLCG]:
    """NLCG with the given options on the least-squares problem, its samples sharded over every rank."""
    return lambda **options: NLCG(objective_factory("quadratic", options=OPTIONS), make_config("nlcg", options))


def _reference(
    problem: Problem, theta: torch.Tensor, steps: int, lr: float, beta_rule: str, beta_max: float
) -> tuple[torch.Tensor, list[float], list[float], torch.Tensor]:
    """§5 written out in float64 on the full least-squares problem, without the loss-average heuristic."""
    design = torch.cat([problem.train.inputs, torch.ones(len(problem.train), 1)], 1).double()
    targets = problem.train.targets.double()
    theta = theta.double().clone()
    h = torch.ones_like(theta)
    prev_grad: torch.Tensor | None = None
    prev_step: torch.Tensor | None = None
    prev_z: torch.Tensor | None = None
    prev_direction: torch.Tensor | None = None
    prev_rz = 0.0
    betas: list[float] = []
    raw_betas: list[float] = []
    for _ in range(steps):
        grad = design.T @ (design @ theta - targets) / len(targets)
        if prev_grad is not None:
            assert prev_step is not None  # set with prev_grad
            s, y = prev_step, grad - prev_grad
            ys, shs = float(y @ s), float(s @ (h * s))
            if ys > 1e-8 and shs > 1e-8:
                h = (h - (h * s) ** 2 / shs + y * y / ys).abs()
        r = -grad
        z = r / (h + 1e-8)
        rz = float(r @ z)
        if prev_direction is None:
            raw = beta = 0.0
            direction = z
        else:
            assert prev_z is not None  # set with prev_direction
            raw = rz / prev_rz if beta_rule == "fr" else (rz - float(r @ prev_z)) / prev_rz
            beta = min(max(raw, 0.0), beta_max)
            direction = z + beta * prev_direction
        betas.append(beta)
        raw_betas.append(raw)
        step = lr * direction
        theta = theta + step
        prev_grad, prev_step, prev_z, prev_rz, prev_direction = grad, step, z, rz, direction
    return theta, betas, raw_betas, h


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize(("beta", "beta_max"), [("fr", 1.0), ("pr", 1.0), ("pr", 0.0)])
def test_matches_the_float64_reference(nlcg: Callable[..., NLCG], beta: str, beta_max: float) -> None:
    # beta_max = 0 clips β to 0: preconditioned gradient descent, d = M∘(−g).
    optimizer = nlcg(lr=0.3, beta=beta, beta_max=beta_max, loss_average=False)
    problem, flat = optimizer.objective.problem, optimizer.flat
    start = flat.clone()
    extras = [optimizer.step().extras for _ in range(8)]
    betas = [e["beta"] for e in extras]
    expected, expected_betas, expected_raw, expected_h = _reference(problem, start, 8, 0.3, beta, beta_max)
    torch.testing.assert_close(flat.data.double(), expected, rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(betas), torch.tensor(expected_betas), rtol=2e-3, atol=1e-4)
    raw = torch.tensor([e["beta_raw"] for e in extras])
    torch.testing.assert_close(raw, torch.tensor(expected_raw, dtype=raw.dtype), rtol=2e-3, atol=1e-4)
    assert raw.abs().max() > 0.01  # the formula is exercised, not only the preconditioner
    if beta_max == 0.0:
        assert betas == [0.0] * 8
    # h is only updated from the step before the last gradient: compare after 8 updates.
    assert not torch.allclose(expected_h, torch.ones_like(expected_h))


def test_diagonal_bfgs_update_formula_and_skip() -> None:
    h = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    s = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    y = torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64)
    expected = (h - (h * s) ** 2 / (s @ (h * s)) + y * y / (y @ s)).abs()
    assert diagonal_bfgs_update(h, s, y)
    torch.testing.assert_close(h, expected)
    before = h.clone()
    assert not diagonal_bfgs_update(h, s, -y)  # yᵀs < 0: no curvature information, h unchanged
    assert torch.equal(h, before)


def test_loss_average_heuristic_shrinks_on_rising_loss_and_grows_back(nlcg: Callable[..., NLCG]) -> None:
    optimizer = nlcg()
    optimizer.c = 0.5
    for loss in [1.0] * 6:
        optimizer._update_c(loss)
    assert optimizer.c == pytest.approx(0.5 * 1.05)  # flat loss: ratio 1.0 < 1.01
    for loss in [2.0] * 5:
        optimizer._update_c(loss)
    assert optimizer.c == pytest.approx(0.5 * 1.05 * 0.5)  # EMA rose by > 50 %
    optimizer.c = 1e-4
    for loss in [10.0**k for k in range(1, 11)]:
        optimizer._update_c(loss)
    assert optimizer.c == 1e-4  # the floor


def test_schedule_and_validation() -> None:
    config = make_config("nlcg", {"lr": 1.0, "warmup_steps": 4, "decay_every": 10, "decay_factor": 0.5})
    assert [config.learning_rate(t) for t in (0, 3, 9, 10, 25)] == [0.25, 1.0, 1.0, 0.5, 0.25]
    with pytest.raises(ConfigError, match="beta must be one of"):
        make_config("nlcg", {"beta": "hs"})


@pytest.mark.mpi(min_size=1)
def test_non_finite_loss_stops_with_a_clear_error(nlcg: Callable[..., NLCG]) -> None:
    optimizer = nlcg()
    optimizer.flat.copy_(torch.full_like(optimizer.flat.data, math.inf))
    with pytest.raises(NonFiniteError, match="nlcg"):
        optimizer.step()


@pytest.mark.mpi(min_size=1)
def test_one_packed_allreduce_per_step(nlcg: Callable[..., NLCG]) -> None:
    optimizer = nlcg()
    comm, flat = optimizer.objective.comm, optimizer.flat
    calls, nbytes = comm.stats.calls, comm.stats.bytes
    for _ in range(3):
        optimizer.step()
    assert comm.stats.calls - calls == 3
    assert comm.stats.bytes - nbytes == 3 * 4 * (flat.numel + 1)


def _run(comm: Communicator):
    cfg = TrainConfig(problem="logistic", optimizer="nlcg", epochs=3, batch_size=96, quiet=True, seed=5)
    return train(cfg, {"lr": 0.5, "beta": "pr"}, {"n": 480, "dim": 12}, comm=comm)


@pytest.mark.mpi(min_size=1)
def test_rank_invariance_against_the_single_process_run() -> None:
    distributed = _run(Communicator())
    alone = _run(Communicator(MPI.COMM_SELF))
    assert distributed.steps == alone.steps == 15
    torch.testing.assert_close(distributed.parameters, alone.parameters, rtol=1e-4, atol=1e-5)
    assert distributed.losses[-1] < distributed.losses[0]
