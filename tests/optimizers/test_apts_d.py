"""APTS-D: the invariants of docs/algorithms.md §1, each a failure seen in the published code.

The multi-rank tests run under ``mpiexec -n 2`` and ``-n 4`` (``make test``); on one
rank the same tests check the P = 1 case.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from hpcopt.comm import Communicator
from hpcopt.distributed.curvature_batch import sampled_local_objective
from hpcopt.distributed.data_parallel import DistributedObjective
from hpcopt.numerics.flat import FlatParameters
from hpcopt.numerics.trust_region.subproblem import LSR1Solver
from hpcopt.optimizers import APTSD, APTSDConfig, make_config
from hpcopt.problems import make_problem
from hpcopt.problems.base import Problem
from hpcopt.problems.synthetic import LogisticProblem, QuadraticProblem
from hpcopt.training.trainer import TrainConfig, train
from tests.conftest import benchmark_script
from tests.optimizers.apts_support import outer_start

pytestmark = pytest.mark.timeout(120)


def _setup(
    problem_name: str,
    options: dict,
    *,
    seed: int = 0,
    model: str | None = None,
    comm: Communicator | None = None,
    **apts: object,
) -> tuple[Communicator, Problem, FlatParameters, DistributedObjective, APTSD]:
    comm = Communicator() if comm is None else comm
    problem = make_problem(problem_name, seed=seed, options=options)
    torch.manual_seed(seed)
    net = problem.build_model(model)
    flat = FlatParameters(net)
    objective = DistributedObjective(problem, flat, comm)
    shard_size = len(problem.train) // comm.size
    shard = problem.train.subset(slice(comm.rank * shard_size, (comm.rank + 1) * shard_size))
    objective.set_batch(shard.inputs, shard.targets, shard_size * comm.size, noise_seed=seed)
    optimizer = APTSD(objective, make_config("apts-d", apts))
    return comm, problem, flat, objective, optimizer


def _all_equal(comm: Communicator, value: object) -> bool:
    # repr: NaN ratios (rejected for pred <= 0) must compare equal to themselves.
    return all(repr(v) == repr(value) for v in comm.allgather_object(value))


@pytest.mark.mpi(min_size=1)
def test_first_order_consistent_model_has_the_global_gradient() -> None:
    # With FOC, every rank's first local Cauchy step is along −g (the global gradient),
    # not along its own −g_r: the correction must change the gradient, not just the value.
    # §1's local ball Δ/P, entered at its edge.
    comm, _, flat, objective, optimizer = _setup(
        "logistic",
        {"n": 400, "dim": 10},
        local_solver="cauchy",
        local_iterations=1,
        global_passes=0,
        combine="sum",
        local_start="ball",
    )
    theta, loss_local, grad_local, grad = outer_start(flat, objective)
    step_r, pred_r, _, _ = optimizer._local_phase(theta, loss_local, grad_local, grad)
    ball = optimizer.radius / comm.size
    expected = -ball * grad / grad.norm()
    assert torch.allclose(step_r, expected, rtol=1e-5, atol=1e-7) or pred_r <= 0
    assert torch.equal(flat.data, theta)  # the local phase leaves θ_k in place
    if comm.size > 1:
        # The local gradients differ, so without FOC the steps would differ from −g.
        assert not torch.allclose(grad_local, grad, rtol=1e-3)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("local_solver", ["cauchy", "lsr1", "steihaug"])
def test_combined_step_never_exceeds_the_radius(local_solver: str) -> None:
    _comm, _, _, _, optimizer = _setup(
        "logistic",
        {"n": 400, "dim": 10},
        local_solver=local_solver,
        radius=0.5,
    )
    for _ in range(8):
        result = optimizer.step()
        raw = result.extras["combined_norm"]
        assert raw <= result.radius * (1 + 1e-5), f"‖Σ s_r‖ = {raw} > Δ = {result.radius}"


@pytest.mark.mpi(min_size=1)
def test_radius_grows_after_very_successful_steps() -> None:
    # A well-conditioned quadratic far from its minimiser: every step is very
    # successful and uses the whole radius, so Δ must expand from its small start.
    _comm, _, _, _, optimizer = _setup("quadratic", {"n": 400, "dim": 5}, radius=0.01, global_passes=0)
    radii = []
    for _ in range(6):
        result = optimizer.step()
        radii.append(result.radius)
        assert result.accepted
    assert optimizer.radius > 0.01 * 1.2**3
    assert radii == sorted(radii)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("local_solver", ["steihaug", "lsr1"])
def test_singular_or_indefinite_local_model_never_crashes(local_solver: str) -> None:
    # All-zero weights make the ReLU MLP's Hessian singular (and the gradient of the
    # hidden layers zero); a random MLP's Hessian is indefinite.  Neither may crash.
    for zero in (True, False):
        _comm, _problem, flat, _, optimizer = _setup(
            "logistic",
            {"n": 200, "dim": 6},
            local_solver=local_solver,
            global_solver=local_solver,
        )
        if zero:
            flat.copy_(torch.zeros_like(flat.data))
        for _ in range(3):
            result = optimizer.step()
            assert math.isfinite(result.loss)
            assert torch.isfinite(flat.data).all()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"local_stop": "settled", "local_solver": "steihaug", "local_iterations": 4, "global_passes": 0},
        {"local_fraction": 0.25, "local_solver": "steihaug", "combine": "scaled", "global_passes": 0},
    ],
    ids=["defaults", "local-stop-settled", "local-fraction"],
)
def test_every_decision_and_radius_is_identical_on_every_rank(options: dict[str, Any]) -> None:
    # With local_stop=settled each rank's local phase may end after a different number of
    # iterations; the combination and the decision must still be the same everywhere.
    comm, _, flat, _, optimizer = _setup("logistic", {"n": 400, "dim": 10}, radius=1.0, **options)
    for _ in range(10):
        result = optimizer.step()
        decision = (result.accepted, result.ratio, result.radius, optimizer.radius)
        assert _all_equal(comm, decision)
        assert _all_equal(comm, flat.data.sum().item())


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("problem_name", ["quadratic", "logistic"])
@pytest.mark.parametrize(
    ("global_solver", "metric", "local_stop"),
    [
        ("steihaug", "adam", "iterations"),
        ("steihaug", "euclidean", "iterations"),
        ("subspace", "euclidean", "iterations"),
        ("steihaug", "adam", "settled"),
    ],
)
def test_apts_d_reaches_the_known_minimiser(
    problem_name: str, global_solver: str, metric: str, local_stop: str
) -> None:
    problem = make_problem(problem_name, options={"n": 400, "dim": 5})
    assert isinstance(problem, (QuadraticProblem, LogisticProblem))
    result = train(
        TrainConfig(problem=problem_name, epochs=60, quiet=True),
        {"radius": 1.0, "global_solver": global_solver, "metric": metric, "local_stop": local_stop},
        {"n": 400, "dim": 5},
    )
    exact = problem.exact_minimizer()
    error = float((result.parameters.double() - exact).norm() / exact.norm())
    assert error < 2e-3, f"relative distance to the minimiser {error:.2e}"


@pytest.mark.mpi(min_size=1)
def test_traffic_per_outer_iteration_is_packed() -> None:
    # Without the global pass: [g; f] and [s; pred] (2n+2 floats) and the trial value (1);
    # with one global pass the trial gradient rides with the trial value (3n+3) plus the
    # pass's trial value (1).
    first_order: dict[str, Any] = {"global_solver": "lsr1", "local_solver": "lsr1", "combine": "average"}
    comm, _, flat, _, optimizer = _setup("logistic", {"n": 400, "dim": 10}, **first_order)
    n = flat.numel
    for passes, floats in ((0, 2 * n + 3), (1, 3 * n + 4)):
        optimizer.config.global_passes = passes
        before = comm.stats.bytes
        optimizer.step()
        assert comm.stats.bytes - before == 4 * floats


@pytest.mark.parametrize(("options", "extra_bytes"), [({"combine": "scaled"}, 8), ({"local_start": "local"}, 4)])
def test_scaled_combination_and_local_start_add_a_scalar_only(options: dict, extra_bytes: int) -> None:
    # combine=scaled: one float64 allreduce for ūᵀBū; local_start=local: Σ‖s_r‖ rides in [s; pred].
    apts = {"global_passes": 0, "combine": "average", "local_start": "step", **options}
    comm, _, flat, _, optimizer = _setup("logistic", {"n": 400, "dim": 10}, **apts)
    before = comm.stats.bytes
    optimizer.step()
    assert comm.stats.bytes - before == 4 * (2 * flat.numel + 3) + extra_bytes


def test_config_rejects_bad_values() -> None:
    from hpcopt.errors import ConfigError

    for bad in ({"radius": -1}, {"local_solver": "newton"}, {"radius_min": 3.0}, {"local_iterations": -1}):
        with pytest.raises(ConfigError):
            make_config("apts-d", bad)
    with pytest.raises(ConfigError, match="apts-d: local_stop must be one of iterations, settled, got 'never'"):
        make_config("apts-d", {"local_stop": "never"})
    assert make_config("apts-d", {}) == APTSDConfig()


@pytest.mark.mpi(min_size=1)
def test_apts_d_learns_mnist() -> None:
    from tests.conftest import mnist_dir

    data = str(mnist_dir())
    result = train(
        TrainConfig(problem="mnist", model="mlp", data_dir=data, epochs=3, batch_size=500, quiet=True),
        {},
        {"limit": 2000},
    )
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert result.metrics["val_accuracy"] >= 0.7, result.metrics  # chance: 0.1; P = 4 is the slowest


@pytest.mark.mpi(min_size=1)
def test_model_predicted_decrease_is_the_global_models_decrease_at_the_combined_step() -> None:
    # predicted=model: pred = −(gᵀs + ½ sᵀBs) for the combined s.  Give the global L-SR1
    # the exact Hessian of a quadratic (pairs (e_i, H e_i) from gradient differences):
    # then pred must equal the true decrease f(θ) − f(θ + s) of the combined step, at
    # any P, which Σ pred_r does not promise.
    comm, _, flat, objective, optimizer = _setup(
        "quadratic", {"n": 400, "dim": 3}, predicted="model", global_solver="lsr1", radius=0.5, memory=5
    )
    theta, loss_local, grad_local, grad = outer_start(flat, objective)
    loss = objective.value()
    n = flat.numel
    for i in range(n):
        basis = torch.zeros(n, dtype=flat.data.dtype)
        basis[i] = 1.0
        flat.copy_(theta + basis)
        _, shifted = objective.value_and_grad()
        optimizer.global_solver.update(basis, shifted.clone() - grad)
    flat.copy_(theta)
    step, pred, _, _, _ = optimizer._combined_step(theta, loss_local, grad_local, grad)
    flat.copy_(theta + step)
    actual = loss - objective.value()
    flat.copy_(theta)
    assert pred == pytest.approx(actual, rel=1e-3, abs=1e-6)
    solver = optimizer.global_solver
    assert isinstance(solver, LSR1Solver)
    dense = torch.stack([solver.operator.matvec(col) for col in torch.eye(n, dtype=grad.dtype)])
    assert pred == pytest.approx(-float(grad @ step + 0.5 * step @ dense @ step), rel=1e-5)
    assert _all_equal(comm, pred)


def test_predicted_model_needs_the_lsr1_global_solver() -> None:
    from hpcopt.errors import ConfigError

    with pytest.raises(ConfigError, match=r"predicted=model.*global_solver=lsr1"):
        make_config("apts-d", {"predicted": "model", "global_solver": "steihaug"})
    with pytest.raises(ConfigError, match="predicted must be sum or model"):
        make_config("apts-d", {"predicted": "local"})


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("window", [1, 4])
def test_nonmonotone_decisions_are_identical_on_every_rank_and_reach_the_minimiser(window: int) -> None:
    comm, problem, flat, _, optimizer = _setup("quadratic", {"n": 400, "dim": 5}, radius=1.0, nonmonotone=window)
    for _ in range(60):
        result = optimizer.step()
        assert _all_equal(comm, (result.accepted, result.ratio, optimizer.radius, optimizer.window.state()))
    assert len(optimizer.window.state()) == window - 1
    assert isinstance(problem, QuadraticProblem)
    exact = problem.exact_minimizer()
    error = float((flat.data.double() - exact).norm() / exact.norm())
    assert error < 2e-3, f"relative distance to the minimiser {error:.2e}"


@pytest.mark.mpi(min_size=1)
def test_nonmonotone_accepts_a_rise_below_the_window_maximum() -> None:
    # Feed the window a large past value: a combined step that raises f a little is then
    # accepted (ρ_ref ≥ η₁) where the monotone rule would reject it.
    comm, _, flat, objective, optimizer = _setup("logistic", {"n": 400, "dim": 10}, radius=1.0, nonmonotone=3)
    loss = objective.value()
    optimizer.window.record(loss + 10.0)
    theta = flat.clone()
    # Replace the combined step by an uphill one of small predicted decrease.
    _, grad = objective.value_and_grad()
    uphill = grad.clone() * (0.05 / float(grad.norm()))
    optimizer._combined_step = lambda *args: (uphill, 1e-3, float(uphill.norm()), float(uphill.norm()), {})  # type: ignore[method-assign]
    optimizer.config.global_passes = 0
    result = optimizer.step()
    assert float(result.extras["trial_loss"]) > loss  # the step raised f ...
    assert result.accepted  # ... and was accepted against the window's maximum
    torch.testing.assert_close(flat.data, theta + uphill)
    assert _all_equal(comm, float(flat.data.sum()))


def _global_pass_run(comm: Communicator, fraction: float) -> torch.Tensor:
    # No local phase: the outer iteration is the global Gauss–Newton pass alone, whose
    # products on the strided sub-batch must not depend on how the rows are split.
    options = {
        "local_iterations": 0,
        "global_passes": 1,
        "combine": "average",
        "max_cg_iterations": 20,
        "cg_rtol": None,
        "global_solver": "steihaug",
        "curvature": "ggn",
        "curvature_fraction": fraction,
        "radius": 1.0,
        # §0's radius factors: with APTS-D's ×2 / ×0.5 the whole batch's and the
        # sub-batch's runs end bit for bit equal on this problem (curvature-blind steps).
        "gamma_inc": 1.2,
        "gamma_dec": 0.9,
    }
    cfg = TrainConfig(problem="logistic", optimizer="apts-d", epochs=2, batch_size=96, quiet=True, seed=5)
    return train(cfg, options, {"n": 480, "dim": 12}, comm=comm).parameters


@pytest.mark.mpi(min_size=1)
def test_global_pass_on_a_curvature_sub_batch_is_rank_count_invariant() -> None:
    from mpi4py import MPI

    distributed = _global_pass_run(Communicator(), 0.25)
    alone = _global_pass_run(Communicator(MPI.COMM_SELF), 0.25)
    torch.testing.assert_close(distributed, alone, rtol=1e-4, atol=1e-5)
    whole = _global_pass_run(Communicator(MPI.COMM_SELF), 1.0)
    assert float((whole - alone).norm()) > 1e-4  # the sub-batch is really used


def test_curvature_fraction_and_window_are_validated() -> None:
    from hpcopt.errors import ConfigError

    with pytest.raises(ConfigError, match="curvature_fraction"):
        make_config("apts-d", {"curvature_fraction": 0.0})
    with pytest.raises(ConfigError, match="curvature_sampling"):
        make_config("apts-d", {"curvature_sampling": "random"})
    with pytest.raises(ConfigError, match="nonmonotone"):
        make_config("apts-d", {"nonmonotone": 0})


def _proposed_step(optimizer: APTSD, theta: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The combined step and pred that one outer iteration from ``theta`` proposes."""
    captured = []
    combined_step = optimizer._combined_step

    def spy(*args):
        captured.append(combined_step(*args))
        return captured[-1]

    optimizer._combined_step = spy  # type: ignore[method-assign]
    optimizer.flat.copy_(theta)
    optimizer.step()
    return captured[0][0], captured[0][1]


@pytest.mark.mpi(min_size=1)
def test_local_phases_on_a_local_fraction_keep_the_global_gradient() -> None:
    # With FOC the rows' model has the whole batch's gradient at θ_k: each rank's first
    # Cauchy step to the edge of its ball Δ/P is along −g, so their sum is −Δ g/‖g‖,
    # although the rows' own gradient differs from g even on one rank.
    comm, _, flat, objective, optimizer = _setup(
        "logistic", {"n": 400, "dim": 10}, local_solver="cauchy", local_iterations=1,
        global_passes=0, combine="sum", local_start="ball", metric="euclidean", local_fraction=0.25,
    )  # fmt: skip
    theta, _, _, grad = outer_start(flat, objective)
    with objective.local_rows(sampled_local_objective(objective, 0.25, "strided")):
        _, grad_rows = objective.local_value_and_grad()
        assert not torch.allclose(grad_rows, grad, rtol=1e-3)
    step, pred = _proposed_step(optimizer, theta)
    torch.testing.assert_close(step, -optimizer.config.radius * grad / grad.norm(), rtol=1e-5, atol=1e-7)
    assert pred > 0 and _all_equal(comm, float(step.sum()))


@pytest.mark.mpi(min_size=1)
def test_local_fraction_is_validated() -> None:
    from hpcopt.errors import ConfigError

    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match=rf"apts-d: local_fraction must be in \(0, 1\], got {bad}"):
            make_config("apts-d", {"local_fraction": bad})


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("local_solver", ["steihaug", "lsr1"])
def test_local_phases_on_a_local_fraction_see_only_its_rows(local_solver: str) -> None:
    # Without the first-order term a local phase depends on its own rows only: on a
    # quarter of each shard it proposes the step that APTS-D proposes on a batch made
    # of those rows alone (the global gradient and the decision see the whole batch).
    from hpcopt.distributed.curvature_batch import curvature_rows

    options: dict[str, Any] = dict(
        radius=0.5, foc=False, combine="average", metric="euclidean", global_passes=0,
        local_solver=local_solver, curvature="hessian", local_iterations=3, curvature_fraction=1.0,
    )  # fmt: skip
    comm, problem, flat, _, on_quarter = _setup("logistic", {"n": 400, "dim": 10}, local_fraction=0.25, **options)
    theta = flat.clone()
    shard_size = len(problem.train) // comm.size
    rows, total = curvature_rows(shard_size, comm.rank * shard_size, shard_size * comm.size, 0.25, "strided")
    shard = problem.train.subset(slice(comm.rank * shard_size, (comm.rank + 1) * shard_size))
    alone = DistributedObjective(problem, flat, comm)
    alone.set_batch(shard.inputs[rows], shard.targets[rows], total, noise_seed=0)
    on_rows = APTSD(alone, make_config("apts-d", {**options, "local_fraction": 1.0}))

    step, pred = _proposed_step(on_quarter, theta)
    reference_step, reference_pred = _proposed_step(on_rows, theta)
    assert len(rows) == shard_size // 4 and float(step.norm()) > 0
    torch.testing.assert_close(step, reference_step, rtol=1e-5, atol=1e-7)
    assert pred == pytest.approx(reference_pred, rel=1e-5)
    assert _all_equal(comm, float(step.sum()))


@pytest.mark.mpi(min_size=1)
def test_state_dict_carries_the_nonmonotone_window() -> None:
    _, _, _, objective, optimizer = _setup("logistic", {"n": 400, "dim": 10}, radius=1.0, nonmonotone=3)
    for _ in range(4):
        optimizer.step()
    state = optimizer.state_dict()
    assert len(state["window"]) == 2
    fresh = APTSD(objective, make_config("apts-d", {"radius": 1.0, "nonmonotone": 3}))
    fresh.load_state_dict(state)
    assert fresh.window.state() == optimizer.window.state()


@pytest.mark.mpi(min_size=1)
def test_local_products_on_the_curvature_sub_batch_are_this_ranks_rows_and_local() -> None:
    from hpcopt.distributed.curvature_batch import curvature_rows

    comm, problem, flat, _, optimizer = _setup(
        "logistic",
        {"n": 400, "dim": 10},
        local_solver="steihaug",
        curvature="hessian",
        curvature_fraction=0.25,
        local_fraction=1.0,
    )
    theta = flat.clone()
    matvec = optimizer._local_matvec(theta, torch.zeros_like(theta))
    v = torch.linspace(-1, 1, flat.numel)
    calls = comm.stats.calls
    product = matvec(v)
    assert comm.stats.calls == calls  # the local phase never communicates
    # Reference in float64: the mean Hessian over this rank's strided rows of the global batch.
    shard_size = len(problem.train) // comm.size
    rows, _ = curvature_rows(shard_size, comm.rank * shard_size, shard_size * comm.size, 0.25, "strided")
    inputs = problem.train.inputs[comm.rank * shard_size : (comm.rank + 1) * shard_size][rows]
    design = torch.cat([inputs, torch.ones(len(rows), 1)], 1).double()
    probability = torch.sigmoid(design @ theta.double())
    hessian = design.T @ (design * (probability * (1 - probability))[:, None]) / len(rows)
    torch.testing.assert_close(product.double(), hessian @ v.double(), rtol=1e-4, atol=1e-6)
    assert len(rows) == shard_size // 4


@pytest.mark.mpi(min_size=1)
def test_local_start_follows_the_combined_step_and_is_the_same_on_every_rank() -> None:
    comm, _, flat, _, optimizer = _setup(
        "logistic", {"n": 400, "dim": 10}, radius=1.0, combine="average", local_start="step"
    )
    cfg = optimizer.config
    for _ in range(8):
        before = optimizer.local_start
        result = optimizer.step()
        combined = float(result.extras["combined_norm"])
        if result.extras["pred"] > 0 and combined > 0:
            expected = cfg.local_gamma_inc * combined
        else:
            expected = before * cfg.local_gamma_dec**cfg.local_iterations
        assert optimizer.local_start == pytest.approx(max(cfg.radius_min, expected), rel=1e-12)
        assert _all_equal(comm, (optimizer.local_start, result.accepted, float(flat.data.sum())))


@pytest.mark.mpi(min_size=1)
def test_local_start_local_follows_the_mean_local_step_and_is_the_same_on_every_rank() -> None:
    comm, _, flat, _, optimizer = _setup(
        "logistic", {"n": 400, "dim": 10}, radius=1.0, combine="average", local_start="local"
    )
    cfg = optimizer.config
    phase = optimizer._local_phase
    lengths: list[float] = []

    def recorded(*args: Any) -> Any:
        outcome = phase(*args)
        lengths.append(float(outcome[0].norm()))
        return outcome

    optimizer._local_phase = recorded  # type: ignore[method-assign,assignment]
    for _ in range(8):
        before = optimizer.local_start
        result = optimizer.step()
        mean = sum(comm.allgather_object(lengths[-1])) / comm.size
        if result.extras["pred"] > 0 and mean > 0:
            expected = cfg.local_gamma_inc * mean
        else:
            expected = before * cfg.local_gamma_dec**cfg.local_iterations
        # The lengths are summed in the float32 buffer of the combination.
        assert optimizer.local_start == pytest.approx(max(cfg.radius_min, expected), rel=1e-6)
        # The mean of the local lengths bounds the length of their mean (the triangle inequality).
        assert float(result.extras["combined_norm"]) <= mean * (1 + 1e-6)
        assert _all_equal(comm, (optimizer.local_start, result.accepted, float(flat.data.sum())))


@pytest.mark.mpi(min_size=1)
def test_local_phase_starts_from_the_local_start_not_the_ball() -> None:
    # From a start of 1e-3 three local iterations (radius ×1.5 at most per success) stay
    # within 1e-3·(1 + 1.5 + 2.25) in the Euclidean norm; from the whole ball (Δ = 1) the
    # local steps are longer.
    _, _, flat, objective, optimizer = _setup(
        "logistic",
        {"n": 400, "dim": 10},
        radius=1.0,
        combine="average",
        local_start="step",
        local_iterations=3,
        metric="euclidean",
    )
    theta, loss_local, grad_local, grad = outer_start(flat, objective)
    optimizer.local_start = 1e-3
    short, _, _, _ = optimizer._local_phase(theta, loss_local, grad_local, grad)
    assert float(short.norm()) <= 4.75e-3 * (1 + 1e-6)
    optimizer.config.local_start = "ball"
    long, _, _, _ = optimizer._local_phase(theta, loss_local, grad_local, grad)
    assert float(long.norm()) > 4.75e-3


@pytest.mark.mpi(min_size=1)
def test_state_dict_carries_the_local_start() -> None:
    _, _, _, objective, optimizer = _setup(
        "logistic", {"n": 400, "dim": 10}, radius=1.0, combine="average", local_start="step"
    )
    for _ in range(3):
        optimizer.step()
    fresh = APTSD(objective, make_config("apts-d", {"radius": 1.0, "combine": "average", "local_start": "step"}))
    fresh.load_state_dict(optimizer.state_dict())
    assert fresh.local_start == optimizer.local_start != 1.0


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("local_solver", ["lsr1", "steihaug"])
@pytest.mark.parametrize("radius", [1.0, 1e-3])
def test_scaled_combination_is_the_minimiser_of_the_whole_batch_model_along_the_average(
    radius: float, local_solver: str
) -> None:
    # combine=scaled: s = α ū with α = −gᵀū / ūᵀHū, capped at min(P, Δ/‖ū‖), and pred the
    # model's decrease there; checked against the whole batch's Hessian in float64.  A
    # Steihaug local phase builds B_r at θ_k first, and the scaling reuses that operator.
    comm, problem, flat, _, optimizer = _setup(
        "logistic",
        {"n": 400, "dim": 10},
        radius=radius,
        combine="scaled",
        global_passes=0,
        local_solver=local_solver,
        curvature_fraction=1.0,
        local_fraction=1.0,
        metric="euclidean",
        curvature="hessian",
        # Local solves that stop short of the local models' minimisers (the forcing term, up
        # to five iterations): a plain average of them is not the minimiser on its line.
        local_iterations=5,
        local_stop="iterations",
        max_cg_iterations=20,
        cg_rtol=None,
    )
    builds_at_theta_k: list[int] = []
    build = optimizer._local_matvec

    def counted(theta_k: torch.Tensor, step_r: torch.Tensor):
        builds_at_theta_k.append(int(not bool(step_r.any())))
        return build(theta_k, step_r)

    optimizer._local_matvec = counted  # type: ignore[method-assign]
    scale = optimizer._scaled_along
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]] = []

    def recorded(theta_k: torch.Tensor, mean: torch.Tensor, grad: torch.Tensor, pred: float, operator=None):
        step, model_pred = scale(theta_k, mean, grad, pred, operator)
        seen.append((theta_k.clone(), mean.clone(), step.clone(), model_pred, optimizer.radius))
        return step, model_pred

    optimizer._scaled_along = recorded  # type: ignore[method-assign]
    rows = (len(problem.train) // comm.size) * comm.size
    design = torch.cat([problem.train.inputs[:rows], torch.ones(rows, 1)], 1).double()
    labels = problem.train.targets[:rows].double()
    alphas = []
    for _ in range(3):
        optimizer.step()
        theta_k, mean, step, pred, trust_radius = seen[-1]
        probability = torch.sigmoid(design @ theta_k.double())
        grad = design.T @ (probability - labels) / rows
        hessian = design.T @ (design * (probability * (1 - probability))[:, None]) / rows
        u = mean.double()
        slope, curvature = float(grad @ u), float(u @ hessian @ u)
        assert slope < 0
        alpha = min(-slope / curvature, comm.size, trust_radius / float(u.norm()))
        torch.testing.assert_close(step.double(), alpha * u, rtol=1e-4, atol=1e-8)
        alphas.append(alpha)
        assert pred == pytest.approx(-(alpha * slope + 0.5 * alpha**2 * curvature), rel=1e-3)
        assert _all_equal(comm, (pred, float(flat.data.sum())))
    # One operator at θ_k per outer iteration: the local phase's (Steihaug) or the scaling's own (L-SR1).
    assert sum(builds_at_theta_k) == 3
    if radius == 1.0:
        assert max(abs(alpha - 1) for alpha in alphas) > 0.01  # the scaling is not the plain average
    else:
        # The model's minimiser lies far outside so small a trust region: its edge caps α.
        assert float(seen[0][2].norm()) == pytest.approx(seen[0][4], rel=1e-5)


def test_local_start_is_validated() -> None:
    from hpcopt.errors import ConfigError

    with pytest.raises(ConfigError, match="local_start must be one of ball, step, local"):
        make_config("apts-d", {"local_start": "half"})
    with pytest.raises(ConfigError, match="combine must be one of sum, average, scaled"):
        make_config("apts-d", {"combine": "mean"})
    with pytest.raises(ConfigError, match="apts-p: local_start must be 'ball'"):
        make_config("apts-p", {"local_start": "step"})


# -- the subspace global pass -------------------------------------------------


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_batch_gram_is_the_products_gram_on_any_rank_count(fraction: float) -> None:
    """The subspace solver's k × k curvature: one allreduce of k² float64, equal to the products'."""
    from mpi4py import MPI

    from hpcopt.distributed.curvature_batch import BatchCurvature
    from hpcopt.numerics.curvature import CurvatureKind

    grams = []
    for comm in (Communicator(), Communicator(MPI.COMM_SELF)):
        _, _, flat, objective, _ = _setup("logistic", {"n": 400, "dim": 10}, comm=comm)
        generator = torch.Generator().manual_seed(11)
        vectors = [torch.randn(flat.numel, generator=generator) for _ in range(3)]
        before = comm.stats.bytes
        gram = BatchCurvature(objective, CurvatureKind.GGN, fraction, "strided").gram(vectors)
        if comm.size > 1:
            assert comm.stats.bytes - before == 8 * 9  # one allreduce of 3 × 3 float64
        operator = BatchCurvature(objective, CurvatureKind.GGN, fraction, "strided")  # products, built on use
        products = torch.stack([operator(v) for v in vectors]).double()
        reference = torch.stack(vectors).double() @ products.T
        torch.testing.assert_close(gram, 0.5 * (reference + reference.T), rtol=1e-5, atol=1e-6)
        assert _all_equal(comm, gram.tolist())
        grams.append(gram)
    torch.testing.assert_close(grams[0], grams[1], rtol=1e-5, atol=1e-6)  # P ranks = one process


@pytest.mark.mpi(min_size=1)
def test_subspace_global_pass_moves_three_n_floats_and_decides_alike_on_every_rank() -> None:
    # [g; f], [s; pred], the trial [g; f] (3n + 3 float32), the 3 × 3 Gram (9 float64) and
    # the pass's trial value (1): no n-float collective per curvature product.
    comm, _, flat, _, optimizer = _setup(
        "logistic",
        {"n": 400, "dim": 10},
        global_solver="subspace",
        global_passes=1,
        local_solver="lsr1",
        combine="average",
        curvature="ggn",
        radius=1.0,
        metric="euclidean",
    )
    n = flat.numel
    for _ in range(6):
        before = comm.stats.bytes
        result = optimizer.step()
        moved = comm.stats.bytes - before
        assert 4 * (3 * n + 3) < moved <= 4 * (3 * n + 4) + 8 * 9
        assert _all_equal(comm, (result.accepted, result.radius, float(flat.data.sum())))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("metric", ["euclidean", "adam"])
def test_deferred_trial_gradients_change_nothing_but_the_backward_count(
    metric: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Steihaug local phase finishes a trial's gradient only when it goes on from the
    # trial: the iterates are bit-identical to evaluating every gradient at once.
    from hpcopt.optimizers.apts import apts_d

    options: dict[str, Any] = dict(
        global_passes=0,
        local_solver="steihaug",
        local_iterations=4,
        local_stop="settled",
        max_cg_iterations=3,
        combine="scaled",
        curvature="ggn",
        metric=metric,
        radius=0.5,
    )
    runs = {}
    plain = apts_d.first_order_consistent
    for deferred in (True, False):
        if not deferred:  # the model without value_then_grad: every trial's backward at once
            monkeypatch.setattr(apts_d, "first_order_consistent", lambda *args: plain(*args[:4]))
        comm, _, flat, objective, optimizer = _setup("logistic", {"n": 400, "dim": 10}, **options)
        backward = {"count": 0}
        finishing = objective.local_value_then_grad

        def counted(finishing=finishing, backward=backward):
            value, finish = finishing()
            return value, lambda: backward.__setitem__("count", backward["count"] + 1) or finish()

        objective.local_value_then_grad = counted  # type: ignore[method-assign]
        immediate = objective.local_value_and_grad

        def counted_now(immediate=immediate, backward=backward):
            backward["count"] += 1
            return immediate()

        objective.local_value_and_grad = counted_now  # type: ignore[method-assign]
        outcomes = [optimizer.step() for _ in range(4)]
        runs[deferred] = (flat.data.clone(), [(o.loss, o.accepted) for o in outcomes], backward["count"])
    assert torch.equal(runs[True][0], runs[False][0])
    assert runs[True][1] == runs[False][1]
    assert runs[True][2] < runs[False][2]
    assert _all_equal(comm, float(runs[True][0].sum()))


def test_cg_rtol_is_validated() -> None:
    from hpcopt.errors import ConfigError

    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError, match=rf"apts-d: cg_rtol must be in \(0, 1\) or None, got {bad}"):
            make_config("apts-d", {"cg_rtol": bad})
    assert make_config("apts-d", {"cg_rtol": "none"}).cg_rtol is None


@pytest.mark.mpi(min_size=1)
def test_cg_rtol_takes_the_local_solve_to_the_newton_step() -> None:
    # One local iteration on a least-squares shard, inside a ball much larger than the
    # Newton step: with cg_rtol 1e-10 its CG runs to the minimiser of the rank's model,
    # −H_r⁻¹ g_r (float64 reference from the dense local Hessian), which the shard's loss
    # accepts (it is that quadratic); the default forcing term (0.5 here, as ‖g_r‖ > 0.25)
    # stops the CG earlier, short of it.
    options: dict[str, Any] = dict(
        foc=False, metric="euclidean", local_solver="steihaug", curvature="hessian", local_iterations=1,
        global_passes=0, radius=50.0, radius_max=100.0, max_cg_iterations=100, local_start="ball",
    )  # fmt: skip
    steps = {}
    for rtol in (1e-10, None):
        _, _, flat, objective, optimizer = _setup("quadratic", {"n": 400, "dim": 10}, cg_rtol=rtol, **options)
        theta, loss_local, grad_local, grad = outer_start(flat, objective)
        steps[rtol] = optimizer._local_phase(theta, loss_local, grad_local, grad)[0]
    operator = objective.local_curvature(optimizer.curvature)
    columns = [operator(e) for e in torch.eye(theta.numel(), dtype=theta.dtype)]
    hessian = torch.stack(columns, dim=1).double()
    newton = torch.linalg.solve(0.5 * (hessian + hessian.T), -grad_local.double())
    assert float(grad_local.norm()) > 0.25
    torch.testing.assert_close(steps[1e-10].double(), newton, rtol=1e-4, atol=1e-5)
    assert float((steps[None].double() - newton).norm()) > 0.05 * float(newton.norm())


def test_the_defaults_are_the_measured_set() -> None:
    """APTS-D's defaults are the set docs/results-apts-d.md measured under its benchmark name."""
    study = benchmark_script("apts_scaling_accuracy")
    measured = study.VARIANTS["metric-adam-gn-local-l3-cg5-f35-sc-lf25-rt1"]
    assert make_config("apts-d", measured) == make_config("apts-d", {})
    # The previous defaults are a different set, so the check above can fail.
    assert make_config("apts-d", study.VARIANTS["metric-adam-l5"]) != make_config("apts-d", {})
