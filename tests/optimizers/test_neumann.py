"""The Neumann optimizer (docs/algorithms.md §6): displaced iterate, regulariser, schedules, rank invariance."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch
from mpi4py import MPI

from hpcopt.comm import Communicator
from hpcopt.errors import ConfigError, NonFiniteError
from hpcopt.optimizers import Neumann, make_config
from hpcopt.optimizers.neumann import PAPER_SHELL_RATIO, regularizer, relative_beta, schedule_epochs
from hpcopt.training.trainer import TrainConfig, train
from tests.conftest import ObjectiveFactory

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def neumann(objective_factory: ObjectiveFactory) -> Callable[..., Neumann]:
    """Neumann with the given options on a logistic problem, its samples sharded over every rank."""
    return lambda **options: Neumann(objective_factory(options={"n": 200, "dim": 6}), make_config("neumann", options))


@pytest.mark.mpi(min_size=1)
def test_evaluated_and_stored_weights_differ_exactly_by_mu_m(neumann: Callable[..., Neumann]) -> None:
    optimizer = neumann(lr=0.5, epoch_steps=2, warmup_epochs=1, reset_epochs=3)
    flat = optimizer.flat
    phases = [optimizer.step().extras["phase"] for _ in range(6)]
    assert phases == ["sgd", "sgd", "reset", "neumann", "neumann", "neumann"]
    stored = flat.clone()
    assert optimizer.mu >= 0.5 and float(optimizer.m.norm()) > 0
    with optimizer.evaluation_parameters():
        evaluated = flat.clone()
    assert torch.equal(flat.data, stored)  # restored bit for bit
    torch.testing.assert_close(stored - evaluated, optimizer.mu * optimizer.m, rtol=1e-6, atol=1e-7)
    assert float((stored - evaluated).norm()) > 1e-4


def test_regularizer_gradient_matches_finite_differences() -> None:
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(5, generator=generator, dtype=torch.float64)
    v = w + 0.3 * torch.randn(5, generator=generator, dtype=torch.float64)
    alpha, beta = 0.7, 0.02
    _, grad = regularizer(w, v, alpha, beta)
    eps = 1e-6
    fd = torch.stack(
        [
            torch.tensor(
                (regularizer(w + eps * e, v, alpha, beta)[0] - regularizer(w - eps * e, v, alpha, beta)[0]) / (2 * eps)
            )
            for e in torch.eye(5, dtype=torch.float64)
        ]
    )
    torch.testing.assert_close(grad, fd.double(), rtol=1e-6, atol=1e-9)
    assert regularizer(v, v, alpha, beta)[0] == 0.0  # w = v: no direction, no force


def test_schedules_follow_the_paper() -> None:
    options = {"lr": 1.0, "epoch_steps": 10, "warmup_epochs": 1, "schedule_origin": "burn-in"}
    config = make_config("neumann", options)
    etas, mus = zip(*(config.schedule(t) for t in (10, 20, 30, 110, 1000)))
    assert mus[0] == 0.5 and mus[-1] == 0.9 and list(mus) == sorted(mus)
    assert etas == pytest.approx([1.0, 0.5, 1 / 3, 1 / 11, 1 / 100])
    config = make_config("neumann", {})
    assert (config.alpha, config.beta_scale, config.gamma, config.mu_min, config.mu_max) == (1e-7, 1e-5, 0.99, 0.5, 0.9)


def test_schedule_origin_start_counts_the_burn_in_and_hands_over_at_the_burn_ins_step() -> None:
    options = {"lr": 0.3, "epoch_steps": 10, "warmup_epochs": 2}
    burn_in = make_config("neumann", options | {"schedule_origin": "burn-in"})
    start = make_config("neumann", options)
    assert start.schedule_origin == "start"  # the default
    # at the first reset (step 20): e = 0 from the burn-in's end, e = 2 from step 0
    assert burn_in.schedule(20) == (0.3, 0.5)  # effective step η/(1 − μ) = 2·lr
    eta, mu = start.schedule(20)
    assert eta == pytest.approx(0.1) and mu == pytest.approx(2 / 3)
    assert eta / (1 - mu) == pytest.approx(0.3)  # = lr: the burn-in's SGD step
    # later the two clocks differ by the burn-in's epochs
    assert start.schedule(120) == pytest.approx(burn_in.schedule(140))
    with pytest.raises(ConfigError, match="schedule_origin must be one of burn-in, start, got 'end'"):
        make_config("neumann", {"schedule_origin": "end"})


@pytest.mark.mpi(min_size=1)
def test_ramp_epochs_warms_the_burn_ins_rate_up_linearly(neumann: Callable[..., Neumann]) -> None:
    # burn-in of 4 steps, its rate rising over the first 3: lr/3, 2lr/3, lr, lr
    optimizer = neumann(lr=0.4, epoch_steps=2, warmup_epochs=2, ramp_epochs=1.5)
    flat = optimizer.flat
    for factor in (1 / 3, 2 / 3, 1.0, 1.0):
        before = flat.data.clone()
        _, grad = optimizer.objective.value_and_grad()  # the fixed batch: the step's own gradient
        result = optimizer.step()
        assert result.extras["phase"] == "sgd"
        torch.testing.assert_close(flat.data, before - 0.4 * factor * grad, rtol=1e-6, atol=1e-7)
        assert result.step_norm == pytest.approx(0.4 * factor * float(grad.norm()), rel=1e-6)
    assert optimizer.step().extras["phase"] == "reset"
    assert make_config("neumann", {}).ramp_epochs == 0  # Algorithm 2 as printed: no ramp
    with pytest.raises(ConfigError, match=r"ramp_epochs must be in \[0, warmup_epochs = 1\], got 2"):
        make_config("neumann", {"warmup_epochs": 1, "ramp_epochs": 2})


@pytest.mark.mpi(min_size=1)
def test_resets_come_with_a_doubling_period(neumann: Callable[..., Neumann]) -> None:
    optimizer = neumann(lr=0.1, epoch_steps=1, warmup_epochs=2, reset_epochs=2)
    flat = optimizer.flat
    phases = [optimizer.step().extras["phase"] for _ in range(12)]
    resets = [t for t, phase in enumerate(phases) if phase == "reset"]
    assert resets == [2, 4, 8]  # warm-up 2, then K = 2, 4, 8
    assert phases[:2] == ["sgd", "sgd"] and torch.isfinite(flat.data).all()


@pytest.mark.mpi(min_size=1)
def test_a_fractional_epoch_scales_every_schedule(neumann: Callable[..., Neumann]) -> None:
    # 40 steps as the paper's 230 epochs (benchmarks/large_batch.py, neumann-scaled): burn-in
    # round(5·0.1739) = 1 step, reset periods round(10·0.1739) = 2, 4, 8, 16 steps.
    optimizer = neumann(lr=0.1, epoch_steps=0.1739, warmup_epochs=5, reset_epochs=10, schedule_origin="burn-in")
    phases = [optimizer.step().extras["phase"] for _ in range(32)]
    assert [t for t, phase in enumerate(phases) if phase == "reset"] == [1, 3, 7, 15, 31]
    eta, mu = optimizer.config.schedule(39)
    assert eta == pytest.approx(0.1 / (1 + 38 / 0.1739)) and mu == 0.9
    with pytest.raises(ConfigError, match="epoch_steps must be > 0, got 0"):
        make_config("neumann", {"epoch_steps": 0})


@pytest.mark.mpi(min_size=1)
def test_non_finite_loss_stops_with_a_clear_error(neumann: Callable[..., Neumann]) -> None:
    optimizer = neumann(epoch_steps=10)
    optimizer.flat.copy_(torch.full_like(optimizer.flat.data, math.nan))
    with pytest.raises(NonFiniteError, match="neumann"):
        optimizer.step()


def _run(comm: Communicator):
    cfg = TrainConfig(problem="logistic", optimizer="neumann", epochs=3, batch_size=96, quiet=True, seed=5)
    options = {"lr": 0.5, "epoch_steps": 5, "warmup_epochs": 1, "reset_epochs": 1}
    return train(cfg, options, {"n": 480, "dim": 12}, comm=comm)


@pytest.mark.mpi(min_size=1)
def test_rank_invariance_and_the_trainer_reports_w_minus_mu_m(monkeypatch: pytest.MonkeyPatch) -> None:
    entered = []
    original = Neumann.evaluation_parameters

    def spy(self: Neumann) -> AbstractContextManager[None]:
        entered.append(self.mu * float(self.m.norm()))
        return original(self)

    monkeypatch.setattr(Neumann, "evaluation_parameters", spy)
    distributed = _run(Communicator())
    alone = _run(Communicator(MPI.COMM_SELF))
    assert distributed.steps == alone.steps == 15
    torch.testing.assert_close(distributed.parameters, alone.parameters, rtol=1e-4, atol=1e-5)
    assert distributed.losses[-1] < distributed.losses[0]
    # Three evaluations and the final parameters per run, with a real displacement μm.
    assert len(entered) == 8 and entered[-1] > 0


@pytest.mark.mpi(min_size=1)
def test_relative_beta_puts_the_shell_at_a_fraction_of_the_weight_norm(neumann: Callable[..., Neumann]) -> None:
    paper = neumann(epoch_steps=2, warmup_epochs=1, beta_rule="paper")
    assert paper.beta == pytest.approx(1e-5 * paper.flat.numel)  # the published constant, selectable
    optimizer = neumann(lr=0.5, epoch_steps=2, warmup_epochs=1, alpha=1e-3, shell_ratio=0.5)  # relative: the default
    assert optimizer.beta == 0.0  # fixed at the first reset, from the weights the burn-in left
    optimizer.step()
    optimizer.step()
    weight_norm = float(optimizer.flat.data.norm())
    assert optimizer.step().extras["phase"] == "reset"
    assert optimizer.beta == pytest.approx(1e-3 * (0.5 * weight_norm) ** 4, rel=1e-6)
    # the regulariser's minimum (β/α)^¼ sits at shell_ratio·‖w‖
    assert (optimizer.beta / 1e-3) ** 0.25 == pytest.approx(0.5 * weight_norm, rel=1e-6)
    # On the paper's ResNet-50 (n = 25 557 032, ‖w₀‖ ≈ 268.2) the rule gives back the paper's β = 1e-5·n.
    assert relative_beta(1e-7, PAPER_SHELL_RATIO, 268.2) == pytest.approx(1e-5 * 25_557_032, rel=1e-2)


@pytest.mark.parametrize(
    ("run_epochs", "expected"),
    [(10, (1.0, 2.0)), (20, (2.0, 4.0)), (230, (5.0, 10.0)), (1000, (5.0, 10.0)), (None, (5.0, 10.0))],
)
def test_burn_in_and_first_reset_are_the_papers_at_most_a_tenth_and_a_fifth_of_the_run(
    run_epochs: int | None, expected: tuple[float, float]
) -> None:
    # the paper's 5 and 10 epochs of its 230-epoch runs; the large-batch study's 1 and 2 of 10
    assert schedule_epochs(run_epochs) == pytest.approx(expected)
    config = Neumann.resolve_config(make_config("neumann", {}), 4, run_epochs)
    assert (config.epoch_steps, config.warmup_epochs, config.reset_epochs) == pytest.approx((4, *expected))


def test_schedule_options_given_are_kept_and_a_ramp_must_fit_the_derived_burn_in() -> None:
    given = make_config("neumann", {"warmup_epochs": 3, "reset_epochs": 7, "epoch_steps": 2})
    config = Neumann.resolve_config(given, 4, 10)
    assert (config.epoch_steps, config.warmup_epochs, config.reset_epochs) == (2, 3, 7)
    ramp = make_config("neumann", {"ramp_epochs": 2})  # fits the paper's 5 epochs ...
    with pytest.raises(ConfigError, match=r"ramp_epochs must be in \[0, warmup_epochs = 1\], got 2"):
        Neumann.resolve_config(ramp, 4, 10)  # ... not a 10-epoch run's 1


def test_beta_rule_is_validated() -> None:
    with pytest.raises(ConfigError, match="beta_rule must be one of paper, relative"):
        make_config("neumann", {"beta_rule": "shell"})
    with pytest.raises(ConfigError, match="shell_ratio must be > 0"):
        make_config("neumann", {"shell_ratio": 0.0})
