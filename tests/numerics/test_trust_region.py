"""Radius policy, L-SR1, subproblem solvers and the trust-region loop (local-phase rules; serial reference vs scipy)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import TypedDict, Unpack

import numpy as np
import pytest
import scipy.optimize
import torch

from hpcopt.errors import ConfigError, NonFiniteError
from hpcopt.numerics.krylov.cg import default_dot
from hpcopt.numerics.trust_region import (
    CauchySolver,
    LoopResult,
    LSR1Operator,
    LSR1Solver,
    RadiusPolicy,
    SteihaugSolver,
    SubproblemSolver,
    TrustRegionModel,
    decide,
    make_subproblem_solver,
    minimize_trust_region,
    trust_region_loop,
)

NAN = float("nan")
INF = float("inf")

# ---------------------------------------------------------------- radius policy

DEFAULT = RadiusPolicy()

# (radius, loss, trial_loss, pred, step_norm) -> (accepted, radius, reason); default policy.
DECIDE_CASES = [
    pytest.param(1.0, 10.0, 9.0, 1.0, 1.0, True, 1.2, "expanded", id="ratio-1-full-step-expands"),
    pytest.param(1.0, 10.0, 9.0, 1.0, 0.9, True, 1.2, "expanded", id="step-exactly-0.9-radius-expands"),
    pytest.param(1.0, 10.0, 9.0, 1.0, 0.89, True, 1.0, "accepted", id="short-step-keeps-radius"),
    pytest.param(1.0, 10.0, 9.5, 1.0, 1.0, True, 1.0, "accepted", id="ratio-0.5-keeps-radius"),
    pytest.param(1.0, 10.0, 9.25, 1.0, 1.0, True, 1.0, "accepted", id="ratio-eta2-no-expand"),
    pytest.param(1.0, 10.0, 9.75, 1.0, 1.0, True, 1.0, "accepted", id="ratio-exactly-eta1-accepts"),
    pytest.param(1.0, 10.0, 9.8, 1.0, 1.0, False, 0.9, "rejected_ratio", id="ratio-0.2-rejects"),
    pytest.param(1.0, 10.0, 11.0, 1.0, 1.0, False, 0.9, "rejected_ratio", id="increase-rejects"),
    pytest.param(1.0, 10.0, 9.0, 0.0, 1.0, False, 0.9, "rejected_pred", id="pred-zero"),
    pytest.param(1.0, 10.0, 9.0, -1.0, 1.0, False, 0.9, "rejected_pred", id="pred-negative"),
    pytest.param(1.0, 10.0, 9.0, NAN, 1.0, False, 0.9, "rejected_pred", id="pred-nan"),
    pytest.param(1.0, 10.0, 9.0, INF, 1.0, False, 0.9, "rejected_pred", id="pred-inf"),
    pytest.param(1.0, 10.0, NAN, 1.0, 1.0, False, 0.9, "rejected_nonfinite", id="trial-nan"),
    pytest.param(1.0, 10.0, INF, 1.0, 1.0, False, 0.9, "rejected_nonfinite", id="trial-inf"),
    pytest.param(1.0, 10.0, -INF, 1.0, 1.0, False, 0.9, "rejected_nonfinite", id="trial-minus-inf"),
    pytest.param(1.0, 1e308, -1e308, 1e-10, 1.0, False, 0.9, "rejected_nonfinite", id="ratio-overflow"),
    pytest.param(1.9, 10.0, 9.0, 1.0, 1.9, True, 2.0, "expanded", id="clamped-at-radius-max"),
    pytest.param(1.05e-3, 10.0, 11.0, 1.0, 1e-3, False, 1e-3, "rejected_ratio", id="clamped-at-radius-min"),
    pytest.param(1e-3, 10.0, NAN, 1.0, 1e-3, False, 1e-3, "rejected_nonfinite", id="min-stays-min"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("radius", "loss", "trial_loss", "pred", "step_norm", "accepted", "new_radius", "reason"), DECIDE_CASES
)
def test_decide_branches(
    radius: float,
    loss: float,
    trial_loss: float,
    pred: float,
    step_norm: float,
    accepted: bool,
    new_radius: float,
    reason: str,
) -> None:
    decision = decide(DEFAULT, radius, loss, trial_loss, pred, step_norm)
    assert decision.accepted is accepted
    assert decision.radius == pytest.approx(new_radius, rel=1e-12)
    assert decision.reason == reason
    if reason in ("accepted", "expanded", "rejected_ratio"):
        assert decision.ratio == pytest.approx((loss - trial_loss) / pred)


@pytest.mark.timeout(60)
def test_policy_presets() -> None:
    local = RadiusPolicy.local_defaults()
    assert (local.eta1, local.eta2, local.gamma_inc, local.gamma_dec) == (0.3, 0.7, 1.5, 0.6)
    assert (local.radius_min, local.radius_max) == (DEFAULT.radius_min, DEFAULT.radius_max)
    classic = RadiusPolicy.classic()
    assert (classic.eta1, classic.eta2, classic.gamma_inc, classic.gamma_dec) == (0.15, 0.75, 2.0, 0.25)
    for policy in (DEFAULT, local, classic):
        policy.validate()
    # Local policy: shrink x0.6, expand x1.5.
    assert decide(local, 1.0, 1.0, 1.0, 1.0, 1.0).radius == pytest.approx(0.6)
    assert decide(local, 1.0, 1.0, 0.0, 1.0, 1.0).radius == pytest.approx(1.5)


def test_shrink_to_step_shrinks_from_the_shorter_of_radius_and_step() -> None:
    to_step = dataclasses.replace(DEFAULT, shrink_to_step=True, gamma_dec=0.5)
    # A rejected interior step of length 0.2 inside radius 10: the next radius is 0.1, not 5.
    assert decide(to_step, 10.0, 1.0, 2.0, 1.0, 0.2).radius == pytest.approx(0.1)
    assert decide(dataclasses.replace(to_step, shrink_to_step=False), 10.0, 1.0, 2.0, 1.0, 0.2).radius == 5.0
    # A boundary step shrinks as before; the floor still holds; acceptance is unchanged.
    assert decide(to_step, 1.0, 1.0, 2.0, 1.0, 1.0).radius == pytest.approx(0.5)
    assert decide(to_step, 1.0, 1.0, 2.0, 1.0, 1e-9).radius == DEFAULT.radius_min
    assert decide(to_step, 10.0, 1.0, 0.0, 1.0, 0.2) == decide(DEFAULT, 10.0, 1.0, 0.0, 1.0, 0.2)
    # A zero step (nothing to shrink to) falls back to the radius.
    assert decide(to_step, 1.0, 1.0, 2.0, 1.0, 0.0).radius == pytest.approx(0.5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "changes",
    [
        {"eta1": 0.0},
        {"eta1": -0.1},
        {"eta1": 0.8, "eta2": 0.7},
        {"eta2": 1.0},
        {"gamma_dec": 0.0},
        {"gamma_dec": 1.0},
        {"gamma_inc": 0.9},
        {"radius_min": 0.0},
        {"radius_min": 3.0, "radius_max": 2.0},
        {"radius_max": INF},
        {"expand_fraction": 0.0},
        {"expand_fraction": 1.5},
        {"eta1": NAN},
        {"gamma_inc": "2"},
        {"eta2": True},
        {"shrink_to_step": 1},
    ],
)
def test_policy_validate_rejects(changes: dict) -> None:
    with pytest.raises(ConfigError):
        dataclasses.replace(DEFAULT, **changes).validate()


# ---------------------------------------------------------------------- L-SR1


def _symmetric(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(n, n, dtype=torch.float64, generator=generator)
    return (q + q.T) / 2


def _recursive_sr1(gamma: float, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Dense SR1 updates in order from gamma*I, the definition the compact form must match."""
    n = pairs[0][0].numel()
    b = gamma * torch.eye(n, dtype=torch.float64)
    for s, y in pairs:
        mismatch = y - b @ s
        b = b + torch.outer(mismatch, mismatch) / (mismatch @ s)
    return b


@pytest.mark.timeout(60)
def test_lsr1_secant_equations_and_compact_form() -> None:
    a = _symmetric(12, seed=0)
    generator = torch.Generator().manual_seed(1)
    steps = [torch.randn(12, dtype=torch.float64, generator=generator) for _ in range(7)]
    operator = LSR1Operator(memory=5)
    assert all(operator.update(s, a @ s) for s in steps)
    assert operator.size == 5
    for s in steps[-5:]:
        torch.testing.assert_close(operator.matvec(s), a @ s, rtol=1e-8, atol=1e-8)
    # The oldest pairs were dropped: their secant equations no longer hold.
    assert float((operator.matvec(steps[0]) - a @ steps[0]).norm()) > 1e-3
    dense = _recursive_sr1(operator.gamma, [(s, a @ s) for s in steps[-5:]])
    v = torch.randn(12, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(operator.matvec(v), dense @ v, rtol=1e-9, atol=1e-9)
    y = a @ steps[-1]
    assert operator.gamma == pytest.approx(float(y @ y / (steps[-1] @ y)))


@pytest.mark.timeout(60)
def test_lsr1_compact_form_equals_recursive_sr1_for_general_pairs() -> None:
    # Independent random pairs: S'Y is not symmetric, so only the lower triangle of
    # S'Y in M reproduces the recursive updates, and only the newest secant holds.
    generator = torch.Generator().manual_seed(7)
    pairs = [
        (
            torch.randn(8, dtype=torch.float64, generator=generator),
            torch.randn(8, dtype=torch.float64, generator=generator),
        )
        for _ in range(3)
    ]
    operator = LSR1Operator(memory=3)
    stored = [pair for pair in pairs if operator.update(*pair)]
    assert len(stored) == 3
    dense = _recursive_sr1(operator.gamma, stored)
    v = torch.randn(8, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(operator.matvec(v), dense @ v, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(operator.matvec(pairs[-1][0]), pairs[-1][1], rtol=1e-9, atol=1e-9)


@pytest.mark.timeout(60)
def test_lsr1_empty_is_zero_and_reset() -> None:
    operator = LSR1Operator(memory=3)
    v = torch.ones(4, dtype=torch.float32)
    assert operator.size == 0
    assert torch.count_nonzero(operator.matvec(v)) == 0
    assert operator.update(torch.tensor([1.0, 0, 0, 0]), torch.tensor([2.0, 1.0, 0, 0]))
    out = operator.matvec(v)
    assert out.dtype == torch.float32 and torch.count_nonzero(out) > 0
    operator.reset()
    assert operator.size == 0 and operator.gamma == 1.0
    assert torch.count_nonzero(operator.matvec(v)) == 0


@pytest.mark.timeout(60)
def test_lsr1_skip_rule() -> None:
    # First pair s = e0, y = (1, a): gamma = 1 + a^2 and y - gamma*s = (-a^2, a), whose
    # cosine with s is |a| / sqrt(1 + a^2): skipped below skip_tol = 1e-8, stored above.
    s = torch.tensor([1.0, 0.0], dtype=torch.float64)
    operator = LSR1Operator(memory=3)
    assert not operator.update(s, torch.tensor([1.0, 1e-9], dtype=torch.float64))
    assert operator.size == 0
    assert operator.update(s, torch.tensor([1.0, 1e-6], dtype=torch.float64))
    assert operator.size == 1
    loose = LSR1Operator(memory=3, skip_tol=0.5)
    assert not loose.update(s, torch.tensor([1.0, 0.5], dtype=torch.float64))  # cosine 0.447
    assert loose.update(s, torch.tensor([1.0, 0.6], dtype=torch.float64))  # cosine 0.514


@pytest.mark.timeout(60)
def test_lsr1_degenerate_pairs_never_raise() -> None:
    a = _symmetric(6, seed=2)
    generator = torch.Generator().manual_seed(3)
    s = torch.randn(6, dtype=torch.float64, generator=generator)
    operator = LSR1Operator(memory=4)
    assert operator.update(s, a @ s)
    # Duplicates and parallel copies carry no new information: y = B s already.
    assert not operator.update(s, a @ s)
    assert not operator.update(2 * s, 2 * (a @ s))
    assert not operator.update(torch.zeros(6, dtype=torch.float64), a @ s)
    assert not operator.update(s, torch.full((6,), NAN, dtype=torch.float64))
    assert not operator.update(torch.full((6,), INF, dtype=torch.float64), a @ s)
    assert operator.size == 1
    t = torch.randn(6, dtype=torch.float64, generator=generator)
    operator.update(t, torch.zeros(6, dtype=torch.float64))  # y = 0 may be stored or skipped
    for _ in range(5):
        operator.update(t, torch.zeros(6, dtype=torch.float64))
        operator.update(s, a @ s)
        operator.update(s + 1e-12 * t, a @ s)
    v = torch.randn(6, dtype=torch.float64, generator=generator)
    assert torch.isfinite(operator.matvec(v)).all()
    assert 1 <= operator.size <= 4
    with pytest.raises(ValueError, match="lsr1 memory"):
        LSR1Operator(memory=0)
    with pytest.raises(ValueError, match="lsr1 pair"):
        operator.update(s, torch.zeros(5, dtype=torch.float64))


@pytest.mark.timeout(60)
def test_lsr1_uses_custom_dot() -> None:
    calls = [0]

    def dot(x: torch.Tensor, y: torch.Tensor) -> float:
        calls[0] += 1
        return default_dot(x, y)

    a = _symmetric(5, seed=4)
    operator = LSR1Operator(memory=2, dot=dot)
    s = torch.arange(1.0, 6.0, dtype=torch.float64)
    operator.update(s, a @ s)
    assert calls[0] > 0
    before = calls[0]
    operator.matvec(s)
    assert calls[0] - before == 2 * operator.size


# ------------------------------------------------------------ subproblem solvers


@pytest.mark.timeout(60)
def test_cauchy_solver() -> None:
    solver = CauchySolver()
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)
    result = solver.solve(g, 0.5)
    torch.testing.assert_close(result.step, torch.tensor([-0.3, -0.4], dtype=torch.float64))
    assert result.pred == pytest.approx(2.5)
    assert result.exit == "boundary" and result.iterations == 0
    zero = solver.solve(torch.zeros(2), 0.5)
    assert zero.pred == 0.0 and torch.count_nonzero(zero.step) == 0
    assert isinstance(solver, SubproblemSolver)


@pytest.mark.timeout(60)
def test_factory_and_solver_contracts() -> None:
    assert isinstance(make_subproblem_solver("cauchy"), CauchySolver)
    steihaug = make_subproblem_solver("steihaug", max_iter=7)
    assert isinstance(steihaug, SteihaugSolver) and steihaug.needs_matvec and steihaug.max_iter == 7
    lsr1 = make_subproblem_solver("lsr1", memory=3)
    assert isinstance(lsr1, LSR1Solver) and not lsr1.needs_matvec and lsr1.operator.memory == 3
    message = r"unknown subproblem solver 'newton' \(choose from cauchy, steihaug, lsr1, subspace\)"
    with pytest.raises(ConfigError, match=message):
        make_subproblem_solver("newton")
    with pytest.raises(TypeError, match="needs a curvature product"):
        steihaug.solve(torch.ones(3), 1.0)
    # Empty L-SR1 memory means B = 0: the step is the Cauchy step.
    g = torch.tensor([1.0, -2.0, 2.0], dtype=torch.float64)
    lsr1_result = lsr1.solve(g, 0.3)
    cauchy_result = CauchySolver().solve(g, 0.3)
    torch.testing.assert_close(lsr1_result.step, cauchy_result.step)
    assert lsr1_result.pred == pytest.approx(cauchy_result.pred)
    # Steihaug reports negative curvature and keeps the direction.
    result = steihaug.solve(g, 0.3, lambda v: -v)
    assert result.exit == "negative_curvature"
    assert steihaug.negative_curvature_direction is not None


# --------------------------------------------------------------- reference loop


def _rosenbrock_problem():
    def fun(x: torch.Tensor) -> float:
        return float(scipy.optimize.rosen(x.numpy()))

    def grad(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(scipy.optimize.rosen_der(x.numpy()))

    def hessp(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(scipy.optimize.rosen_hess_prod(x.numpy(), v.numpy()))

    return fun, grad, hessp


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [2, 10])
def test_rosenbrock_steihaug_matches_scipy_trust_ncg(n: int) -> None:
    fun, grad, hessp = _rosenbrock_problem()
    x0 = np.tile([-1.2, 1.0], n // 2)
    reference = scipy.optimize.minimize(
        scipy.optimize.rosen,
        x0,
        jac=scipy.optimize.rosen_der,
        hessp=scipy.optimize.rosen_hess_prod,
        method="trust-ncg",
        options={"gtol": 1e-8},
    )
    assert reference.success
    np.testing.assert_allclose(reference.x, np.ones(n), atol=1e-6)

    # Classic policy, initial radius 1 as in scipy.  The iteration counts agree only
    # loosely: §0 keeps the radius after an accepted step with 0.15 <= ratio < 0.25
    # (scipy shrinks it), and expands when ||s|| >= 0.9 radius (scipy: on the boundary).
    x, history = minimize_trust_region(
        fun,
        grad,
        torch.tensor(x0),
        solver=make_subproblem_solver("steihaug"),
        policy=RadiusPolicy.classic(),
        radius=1.0,
        hessp=hessp,
        max_iter=500,
    )
    np.testing.assert_allclose(x.numpy(), np.ones(n), atol=1e-6)
    assert abs(len(history) - reference.nit) <= max(5, 0.2 * reference.nit)

    # Default (APTS) policy from radius 0.1: slower radius growth, same minimiser.
    x, history = minimize_trust_region(
        fun,
        grad,
        torch.tensor(x0),
        solver=make_subproblem_solver("steihaug"),
        policy=RadiusPolicy(),
        radius=0.1,
        hessp=hessp,
        max_iter=500,
    )
    np.testing.assert_allclose(x.numpy(), np.ones(n), atol=1e-6)
    assert len(history) <= 2 * reference.nit + 20


def _quadratic(n: int, seed: int):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = torch.from_numpy((q * np.geomspace(1.0, 20.0, n)) @ q.T)
    b = torch.from_numpy(rng.standard_normal(n))
    solution = torch.linalg.solve(a, b)

    def fun(x: torch.Tensor) -> float:
        return float(0.5 * x @ a @ x - b @ x)

    def grad(x: torch.Tensor) -> torch.Tensor:
        return a @ x - b

    return fun, grad, (lambda x, v: a @ v), solution


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("name", "gtol"), [("steihaug", 1e-10), ("lsr1", 1e-6)])
def test_quadratic_converges(name: str, gtol: float) -> None:
    # L-SR1 converges superlinearly at best; below ||g|| ~ 1e-6 the actual reduction
    # f(x) - f(x + s) ~ ||g||^2 drowns in float64 rounding of f and ratios become noise.
    fun, grad, hessp, solution = _quadratic(15, seed=5)
    x, history = minimize_trust_region(
        fun,
        grad,
        torch.zeros(15, dtype=torch.float64),
        solver=make_subproblem_solver(name),
        policy=RadiusPolicy(),
        radius=0.1,
        hessp=hessp,
        max_iter=300,
        gtol=gtol,
    )
    torch.testing.assert_close(x, solution, rtol=0.0, atol=100 * gtol)
    assert len(history) < 150
    assert all(record.subproblem_iterations <= 15 for record in history)


@pytest.mark.timeout(60)
def test_lsr1_memory_update_on_reject() -> None:
    fun, grad, _, solution = _quadratic(10, seed=6)
    pairs: list[bool] = []

    class Recording(LSR1Solver):
        def update(self, step: torch.Tensor, grad_change: torch.Tensor) -> None:
            pairs.append(True)
            super().update(step, grad_change)

    runs = [(None, RadiusPolicy(), 0.1), (False, RadiusPolicy.classic(), 1.0)]
    for update_on_reject, policy, radius in runs:
        pairs.clear()
        x, history = minimize_trust_region(
            fun,
            grad,
            torch.zeros(10, dtype=torch.float64),
            solver=Recording(memory=5),
            policy=policy,
            radius=radius,
            max_iter=300,
            gtol=1e-6,
            update_on_reject=update_on_reject,
        )
        torch.testing.assert_close(x, solution, rtol=0.0, atol=1e-4)
        accepted = sum(record.accepted for record in history)
        expected = len(history) if update_on_reject is None else accepted
        assert len(pairs) == expected
        assert len(history) < 150


@pytest.mark.timeout(60)
def test_cauchy_decreases_monotonically() -> None:
    fun, grad, _, solution = _quadratic(8, seed=7)
    x, history = minimize_trust_region(
        fun,
        grad,
        torch.zeros(8, dtype=torch.float64),
        solver=CauchySolver(),
        policy=RadiusPolicy(),
        radius=0.5,
        max_iter=150,
    )
    losses = [record.loss for record in history] + [fun(x)]
    assert all(later <= earlier for earlier, later in itertools.pairwise(losses))
    assert losses[-1] < losses[0]
    for record in history:
        assert record.exit == "boundary"
        assert record.step_norm == pytest.approx(record.radius)
        if not record.accepted:
            assert record.trial_loss > record.loss - record.pred * 0.25
    assert fun(x) - fun(solution) < 1e-2 * (losses[0] - fun(solution))


@pytest.mark.timeout(60)
def test_rejected_steps_leave_point_unchanged_and_bad_input() -> None:
    fun_q, grad, _, _ = _quadratic(4, seed=8)
    x0 = torch.full((4,), 0.1, dtype=torch.float64)

    def fun(x: torch.Tensor) -> float:
        # Non-finite outside a small ball: the first, large steps must be rejected.
        return fun_q(x) if float(x.norm()) < 0.3 else NAN

    x, history = minimize_trust_region(
        fun, grad, x0, solver=CauchySolver(), policy=RadiusPolicy(), radius=2.0, max_iter=5
    )
    # Radii 2.0, 1.8, 1.62, ... all reach NaN territory: every step is rejected.
    assert [record.reason for record in history] == ["rejected_nonfinite"] * 5
    assert [record.radius for record in history] == pytest.approx([2.0 * 0.9**k for k in range(5)])
    assert torch.equal(x, x0)

    with pytest.raises(ConfigError):
        minimize_trust_region(fun_q, grad, x0, solver=SteihaugSolver(), policy=RadiusPolicy(), radius=1.0)
    with pytest.raises(ConfigError):
        minimize_trust_region(fun_q, grad, x0, solver=CauchySolver(), policy=RadiusPolicy(), radius=0.0)
    with pytest.raises(ConfigError):
        minimize_trust_region(fun_q, grad, x0, solver=CauchySolver(), policy=RadiusPolicy(eta1=2.0), radius=1.0)
    with pytest.raises(NonFiniteError):
        minimize_trust_region(lambda x: math.inf, grad, x0, solver=CauchySolver(), policy=RadiusPolicy(), radius=1.0)


# ---------------------------------------------------------------- the loop's local-phase rules


def _local_model(n: int, seed: int, calls: dict[str, int]) -> tuple[TrustRegionModel, float, torch.Tensor]:
    # A quadratic as a function of the step s from a centre away from its minimiser.
    fun, grad, hessp, _ = _quadratic(n, seed)
    centre = torch.full((n,), 0.3, dtype=torch.float64)

    def value(step: torch.Tensor) -> float:
        calls["value"] += 1
        return fun(centre + step)

    def value_and_grad(step: torch.Tensor) -> tuple[float, torch.Tensor]:
        calls["value_and_grad"] += 1
        return fun(centre + step), grad(centre + step)

    def curvature(step: torch.Tensor):
        return lambda v: hessp(centre + step, v)

    return TrustRegionModel(value, value_and_grad, curvature=curvature), fun(centre), grad(centre)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["cauchy", "steihaug", "lsr1"])
def test_loop_evaluates_the_last_trial_for_its_value_alone_unless_the_solver_learns(name: str) -> None:
    calls = {"value": 0, "value_and_grad": 0}
    model, value0, grad0 = _local_model(6, 9, calls)
    solver = make_subproblem_solver(name)
    result = trust_region_loop(
        model,
        solver,
        RadiusPolicy.local_defaults(),
        x0=torch.zeros(6, dtype=torch.float64),
        value0=value0,
        grad0=grad0,
        radius=0.01,
        ball=1.0,
        max_iter=4,
    )
    # Steps of at most 0.01·(1 + 1.5 + 1.5² + 1.5³) never fill the ball: all four iterations run.
    assert result.accepted + result.rejected == 4
    assert calls == {"value": 0 if solver.has_memory else 1, "value_and_grad": 4 if solver.has_memory else 3}
    assert result.value < value0 and float(result.x.norm()) <= 1.0
    assert result.history == []


class _Start(TypedDict):
    """The start of the loop: ``trust_region_loop``'s ``x0``, ``value0`` and ``max_iter``."""

    x0: torch.Tensor
    value0: float
    max_iter: int


@pytest.mark.timeout(60)
def test_loop_stops_when_the_ball_is_full_or_the_model_is_stationary() -> None:
    calls = {"value": 0, "value_and_grad": 0}
    model, value0, grad0 = _local_model(6, 10, calls)
    zero = torch.zeros(6, dtype=torch.float64)
    common: _Start = {"x0": zero, "value0": value0, "max_iter": 5}
    # A Cauchy step lies on the boundary: the first accepted one leaves no room.
    full = trust_region_loop(model, CauchySolver(), RadiusPolicy(), grad0=grad0, radius=0.05, ball=0.05, **common)
    assert (full.accepted, full.rejected) == (1, 0)
    assert float(full.x.norm()) == pytest.approx(0.05)
    # A model that predicts no decrease is not evaluated at all ...
    calls.update(value=0, value_and_grad=0)
    flat = trust_region_loop(model, CauchySolver(), RadiusPolicy(), grad0=zero, radius=0.05, **common)
    assert (flat.accepted, flat.rejected, calls["value"] + calls["value_and_grad"]) == (0, 0, 0)
    assert flat.x is zero and flat.value == value0
    # ... unless its trials are to be rejected by the ratio test.
    model.grad = lambda step: grad0
    rejected = trust_region_loop(
        model,
        CauchySolver(),
        RadiusPolicy(),
        grad0=zero,
        radius=0.05,
        stop_on_no_decrease=False,
        fused_gradient=False,
        record=True,
        **common,
    )
    assert [record.reason for record in rejected.history] == ["rejected_pred"] * 5
    assert calls["value"] == 5 and rejected.x is zero


@pytest.mark.timeout(60)
def test_loop_stops_at_a_float32_balls_edge_after_one_evaluation() -> None:
    # In float32 a step to the edge leaves ~1e-7·ball of room, not 0: no iteration on that.
    calls = {"value": 0, "value_and_grad": 0}
    model, value0, grad0 = _local_model(6, 10, calls)
    value_and_grad = model.value_and_grad
    assert value_and_grad is not None
    model.value_and_grad = lambda step: (lambda pair: (pair[0], pair[1].float()))(value_and_grad(step.double()))
    model.value = lambda step: value_and_grad(step.double())[0]
    zero = torch.zeros(6, dtype=torch.float32)
    result = trust_region_loop(
        model,
        CauchySolver(),
        RadiusPolicy(),
        x0=zero,
        value0=value0,
        grad0=grad0.float(),
        radius=0.3,
        ball=0.3,
        max_iter=5,
    )
    assert (result.accepted, result.rejected) == (1, 0)
    assert calls["value"] + calls["value_and_grad"] == 1
    assert float(result.x.norm()) == pytest.approx(0.3, rel=1e-6)


def _scripted_model(spoiled: set[int]) -> tuple[TrustRegionModel, float, torch.Tensor, list[int]]:
    # A quadratic whose trial values are worse than the start on the evaluations in ``spoiled``.
    calls = {"value": 0, "value_and_grad": 0}
    model, value0, grad0 = _local_model(6, 11, calls)
    value_and_grad = model.value_and_grad
    assert value_and_grad is not None
    evaluations: list[int] = []

    def scripted(step: torch.Tensor) -> tuple[float, torch.Tensor]:
        evaluations.append(len(evaluations))
        value, grad = value_and_grad(step)
        return (value0 + 1.0 if evaluations[-1] in spoiled else value), grad

    model.value_and_grad = scripted
    model.value = lambda step: scripted(step)[0]
    return model, value0, grad0, evaluations


class _Flags(TypedDict, total=False):
    """The flags of ``trust_region_loop`` that the scripted runs set."""

    record: bool
    stop_when_settled: bool


def _run_scripted(
    model: TrustRegionModel,
    value0: float,
    grad0: torch.Tensor,
    *,
    products: int,
    radius: float,
    **options: Unpack[_Flags],
) -> LoopResult:
    """The scripted quadratic's loop: Steihaug, the local rules, five iterations in a ball of 100."""
    return trust_region_loop(
        model,
        SteihaugSolver(max_iter=products),
        RadiusPolicy.local_defaults(),
        x0=torch.zeros(6, dtype=torch.float64),
        value0=value0,
        grad0=grad0,
        radius=radius,
        ball=100.0,
        max_iter=5,
        **options,
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("spoiled", "settled_iterations", "pattern"),
    [
        pytest.param(set(), 1, [True], id="solved-inside-the-ball"),
        pytest.param({1}, 2, [True, False], id="rejection-after-progress"),
        pytest.param({0, 2}, 3, [False, True, False], id="rejection-before-progress-goes-on"),
    ],
)
def test_loop_stop_when_settled(spoiled: set[int], settled_iterations: int, pattern: list[bool]) -> None:
    # Steihaug solves the 6-dimensional quadratic in 6 products, inside a ball of 100: its
    # step is the model's interior minimiser (exit converged).  A small first radius makes
    # the first steps boundary steps, so only the script decides where the loop stops.
    for settled in (True, False):
        model, value0, grad0, evaluations = _scripted_model(spoiled)
        radius = 100.0 if not spoiled else 0.05
        result = _run_scripted(model, value0, grad0, products=20, radius=radius, record=True, stop_when_settled=settled)
        accepted = [record.accepted for record in result.history]
        if settled:
            assert accepted == pattern
            assert len(evaluations) == settled_iterations
        else:
            assert accepted[: len(pattern)] == pattern and len(accepted) > settled_iterations


@pytest.mark.timeout(60)
@pytest.mark.parametrize("settled", [False, True])
@pytest.mark.parametrize("spoiled", [set(), {1}, {0, 2}, {1, 2, 3}])
def test_loop_finishes_a_trial_gradient_only_to_go_on_from_it(spoiled: set[int], settled: bool) -> None:
    # value_then_grad defers a trial's backward: with a memoryless solver the loop takes
    # the same steps as with value_and_grad, and finishes a gradient only for an accepted
    # trial that it goes on from (never for a rejected one, nor for the last accepted one).
    runs = {}
    for deferred in (False, True):
        model, value0, grad0, evaluations = _scripted_model(spoiled)
        scripted = model.value_and_grad
        assert scripted is not None
        finished: list[int] = []

        def value_then_grad(step: torch.Tensor, scripted=scripted, finished=finished, evaluations=evaluations):
            value, grad = scripted(step)
            index = len(evaluations) - 1
            return value, lambda: finished.append(index) or grad

        if deferred:
            model.value_then_grad = value_then_grad
        result = _run_scripted(model, value0, grad0, products=2, radius=0.05, stop_when_settled=settled)
        runs[deferred] = (result, len(evaluations), finished)
    (plain, plain_evaluations, _), (lazy, lazy_evaluations, finished) = runs[False], runs[True]
    assert torch.equal(plain.x, lazy.x) and plain.value == lazy.value
    assert (plain.accepted, plain.rejected, plain_evaluations) == (lazy.accepted, lazy.rejected, lazy_evaluations)
    accepted_trials = [i for i in range(lazy_evaluations) if i not in spoiled]
    # An accepted trial followed by another evaluation was gone on from; the last one was not.
    assert finished == [i for i in accepted_trials if i < lazy_evaluations - 1]
