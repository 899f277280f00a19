"""``hpcopt.optimizer`` in a loop of the user's own: the trajectory of ``hpcopt train``, restarts, bad input.

The multi-rank tests run in every launch (1, 2 and 4 ranks): each compares the API at
that rank count with the built-in trainer at the same rank count, so together they
check 1, 2 and 4 ranks.  Errors must be raised on every rank, and the per-test
timeout turns a hang into a failure.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hpcopt
from hpcopt.comm import Communicator
from hpcopt.errors import ConfigError
from hpcopt.optimizers import OPTIMIZERS
from hpcopt.problems import make_problem
from hpcopt.problems.base import Problem
from hpcopt.training.trainer import TrainConfig, train
from tests.conftest import BIN, REPO

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

DATA = {"n": 256, "dim": 8}
BATCH = 64
SEED = 4


def _problem() -> Problem:
    return make_problem("logistic", seed=SEED, options=DATA)


def _mlp(seed: int = SEED, dropout: float = 0.0) -> nn.Sequential:
    """Four layers with parameters, so APTS-IP can cut it into up to four stages."""
    torch.manual_seed(seed)
    hidden = [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(
        nn.Linear(DATA["dim"], 12),
        nn.Tanh(),
        *hidden,
        nn.Linear(12, 12),
        nn.Tanh(),
        nn.Linear(12, 6),
        nn.Tanh(),
        nn.Linear(6, 1),
    )


def _logistic_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(outputs.squeeze(-1), targets)


def _parameters(opt: hpcopt.Optimizer) -> Tensor:
    with opt.evaluation_parameters() as model:
        return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def _run_epochs(opt: hpcopt.Optimizer, problem: Problem, epochs: range) -> list[float]:
    sampler = opt.sampler(len(problem.train), BATCH)
    losses = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        for rows in sampler:
            losses.append(opt.step(problem.train.inputs[rows], problem.train.targets[rows]))
    return losses


# -- the same trajectory as hpcopt train ------------------------------------------------


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize(("name", "options"), [("apts-d", {}), ("hf", {"max_iterations": 10})])
def test_same_losses_and_parameters_as_hpcopt_train(name: str, options: dict[str, object]) -> None:
    comm = Communicator()
    cfg = TrainConfig(problem="logistic", optimizer=name, epochs=2, batch_size=BATCH, seed=SEED, quiet=True)
    reference = train(cfg, dict(options), dict(DATA), comm=comm)

    problem = _problem()
    torch.manual_seed(SEED)  # as the trainer initialises its model
    model = problem.build_model()
    opt = hpcopt.optimizer(name, model, problem.criterion, forward=problem.forward, comm=comm, seed=SEED, **options)
    losses = _run_epochs(opt, problem, range(2))

    assert len(losses) == reference.steps == 8
    assert losses == reference.losses  # bit for bit: the same objective, batches and dropout seeds
    assert torch.equal(_parameters(opt), reference.parameters)
    assert opt.steps == 8 and opt.last is not None and opt.last.loss == losses[-1]
    assert losses[-1] < losses[0]


@pytest.mark.mpi(min_size=1)
def test_hpcopt_train_counts_neumanns_epochs_in_the_datas() -> None:
    # hpcopt train fills in the data's 256 / 64 = 4 steps per epoch where epoch_steps is unset:
    # burn-in 4 steps, a reset at step 4, Neumann's own update from step 5.
    comm = Communicator()
    options = {"lr": 0.05, "warmup_epochs": 1, "reset_epochs": 1}
    cfg = TrainConfig(problem="logistic", optimizer="neumann", epochs=2, batch_size=BATCH, seed=SEED, quiet=True)
    reference = train(cfg, dict(options), dict(DATA), comm=comm)

    def own_loop(epoch_steps: float) -> list[float]:
        problem = _problem()
        torch.manual_seed(SEED)
        model = problem.build_model()
        opt = hpcopt.optimizer(
            "neumann",
            model,
            problem.criterion,
            forward=problem.forward,
            comm=comm,
            seed=SEED,
            epoch_steps=epoch_steps,
            **options,
        )
        return _run_epochs(opt, problem, range(2))

    assert own_loop(4) == reference.losses
    assert own_loop(2) != reference.losses  # another epoch: another trajectory


@pytest.mark.mpi(min_size=1)
def test_hpcopt_train_sizes_neumanns_burn_in_and_first_reset_to_the_run() -> None:
    # A 5-epoch run: burn-in a tenth of it (0.5 epoch, 2 steps), the first reset period a fifth
    # (1 epoch, 4 steps); a loop of the user's own, which does not know the run's length,
    # keeps the paper's 5 and 10 epochs.
    comm = Communicator()
    cfg = TrainConfig(problem="logistic", optimizer="neumann", epochs=5, batch_size=BATCH, seed=SEED, quiet=True)
    reference = train(cfg, {"lr": 0.05}, dict(DATA), comm=comm)

    def own_loop(**options: float) -> tuple[list[float], Any]:
        problem = _problem()
        torch.manual_seed(SEED)
        model = problem.build_model()
        opt = hpcopt.optimizer(
            "neumann", model, problem.criterion, forward=problem.forward, comm=comm, seed=SEED, lr=0.05, **options
        )
        return _run_epochs(opt, problem, range(5)), opt.config

    losses, config = own_loop(epoch_steps=4, warmup_epochs=0.5, reset_epochs=1)
    assert losses == reference.losses
    losses, config = own_loop(epoch_steps=4)
    assert (config.warmup_epochs, config.reset_epochs, config.beta_rule) == (5.0, 10.0, "relative")
    assert losses != reference.losses  # 20 steps of SGD: a burn-in as long as the run


# -- restart bit for bit --------------------------------------------------------------


def _options(name: str) -> dict[str, Any]:
    # Small solves keep the test fast; APTS-IP at 4 ranks cuts the 4 layers into 4 stages.
    # Neumann: burn-in 2 steps, resets at steps 2, 4, 8: its own update runs from step 3.
    neumann = {"epoch_steps": 2, "warmup_epochs": 1, "reset_epochs": 1}
    return {"hf": {"max_iterations": 5}, "apts-d": {"local_iterations": 3}, "neumann": neumann}.get(name, {})


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize(
    ("name", "dropout"),
    # With dropout, each step's masks come from the seed and the step count, which the state restores.
    [(name, 0.0) for name in sorted(OPTIMIZERS)] + [("apts-d", 0.3), ("hf", 0.3)],
)
def test_state_dict_restarts_bit_for_bit(name: str, dropout: float) -> None:
    comm = Communicator()
    problem = _problem()

    def fresh_optimizer(seed: int) -> hpcopt.Optimizer:
        return hpcopt.optimizer(name, _mlp(seed, dropout), _logistic_loss, comm=comm, seed=SEED, **_options(name))

    first = fresh_optimizer(SEED)
    _run_epochs(first, problem, range(1))  # 4 steps
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    continued = _run_epochs(first, problem, range(1, 2))

    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    # Load before the first step (the optimizer is built then) and after steps of its own.
    fresh = fresh_optimizer(99)
    fresh.load_state_dict(state)
    stepped = fresh_optimizer(98)
    _run_epochs(stepped, problem, range(3, 4))
    stepped.load_state_dict(state)

    for restarted in (fresh, stepped):
        assert restarted.steps == 4
        assert _run_epochs(restarted, problem, range(1, 2)) == continued
        assert torch.equal(_parameters(restarted), _parameters(first))
        assert restarted.steps == first.steps == 8


# -- every optimizer takes a step -----------------------------------------------------


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize(
    ("name", "options"),
    [(name, _options(name)) for name in sorted(OPTIMIZERS)] + [("apts-ip", {"replicas": 2})],
)
def test_every_optimizer_steps_from_the_global_batch_loss(name: str, options: dict[str, Any]) -> None:
    comm = Communicator()
    if comm.size % int(str(options.get("replicas", 1))):
        pytest.skip(f"{options} needs a rank count it divides")
    problem = _problem()
    model = _mlp()
    batch = problem.train.subset(slice(0, BATCH))
    with torch.no_grad():
        initial = float(_logistic_loss(model(batch.inputs), batch.targets))
    opt = hpcopt.optimizer(name, model, _logistic_loss, comm=comm, **options)
    rows = next(iter(opt.sampler(BATCH, BATCH)))  # this rank's shard of the one global batch
    losses = [opt.step(batch.inputs[rows], batch.targets[rows]) for _ in range(4)]
    # The first loss is the whole global batch's mean loss, whichever rank passed which rows.
    assert losses[0] == pytest.approx(initial, rel=1e-6)
    assert losses[-1] < losses[0]


# -- bad input: one clear error on every rank -----------------------------------------


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("apts-x", {}, "unknown optimizer 'apts-x'"),
        ("apts-d", {"radius_typo": 1.0}, "unknown apts-d option 'radius_typo'"),
        ("sgd", {"lr": "fast"}, "option 'lr': expected float"),
        ("sgd", {"lr": -1.0}, "lr must be > 0"),
        # Its schedules count epochs, and a loop of the user's own does not say how long one is.
        ("neumann", {}, "neumann: epoch_steps is not set: give the steps of one epoch of your data"),
    ],
)
def test_bad_name_or_option_fails_at_construction(name: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        hpcopt.optimizer(name, _mlp(), _logistic_loss, comm=Communicator(), **options)


@pytest.mark.mpi(min_size=1)
def test_model_without_parameters_fails_at_construction() -> None:
    frozen = nn.Linear(3, 1).requires_grad_(False)
    for model in (nn.Sequential(nn.Tanh()), frozen):
        with pytest.raises(ConfigError, match="no trainable parameters"):
            hpcopt.optimizer("apts-d", model, _logistic_loss, comm=Communicator())


@pytest.mark.mpi(min_size=1)
def test_apts_ip_says_it_needs_a_sequential() -> None:
    class NotSequential(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(3, 1)

        def forward(self, x: Tensor) -> Tensor:
            return self.layer(x)

    with pytest.raises(ConfigError, match=r"nn\.Sequential"):
        hpcopt.optimizer("apts-ip", NotSequential(), _logistic_loss, comm=Communicator())


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (
            lambda outputs, targets: (outputs.squeeze(-1) - targets) ** 2,
            r"a tensor of shape \(4,\); it must return a scalar",
        ),
        (lambda outputs, targets: 1.0, "the loss returned a float; it must return a scalar tensor"),
        (lambda outputs, targets: outputs @ targets, "the loss failed on the model's outputs: RuntimeError"),
        (lambda outputs, targets: outputs.detach().mean(), "does not depend on the model's parameters"),
    ],
)
def test_a_bad_loss_fails_at_the_first_step_on_every_rank(loss, message: str) -> None:
    comm = Communicator()
    problem = _problem()
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = hpcopt.optimizer("apts-d", model, loss, comm=comm)
    rows = next(iter(opt.sampler(len(problem.train), BATCH)))
    with pytest.raises(ConfigError, match=message):
        opt.step(problem.train.inputs[rows], problem.train.targets[rows])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing moved


@pytest.mark.mpi(min_size=2)
def test_shards_of_different_sizes_fail_on_every_rank() -> None:
    comm = Communicator()
    problem = _problem()
    opt = hpcopt.optimizer("apts-d", _mlp(), _logistic_loss, comm=comm)
    rows = 8 + comm.rank  # rank r passes 8 + r rows
    with pytest.raises(ConfigError, match=f"differ in size \\(8 to {8 + comm.size - 1} rows\\)"):
        opt.step(problem.train.inputs[:rows], problem.train.targets[:rows])


@pytest.mark.mpi(min_size=2)
def test_one_rank_with_a_malformed_shard_fails_every_rank() -> None:
    comm = Communicator()
    problem = _problem()
    opt = hpcopt.optimizer("hf", _mlp(), _logistic_loss, comm=comm)
    targets = problem.train.targets[:8] if comm.rank != 1 else problem.train.targets[:7]
    expected = "one row per sample" + ("" if comm.rank == 1 else r".*\(on rank 1\)")
    with pytest.raises(ConfigError, match=expected):
        opt.step(problem.train.inputs[:8], targets)


@pytest.mark.mpi(min_size=2)
def test_pipeline_ranks_given_different_rows_fail_on_every_rank() -> None:
    """With one replica every APTS-IP rank must pass the whole batch; per-rank shards would train on nonsense."""
    comm = Communicator()
    problem = _problem()
    opt = hpcopt.optimizer("apts-ip", _mlp(), _logistic_loss, comm=comm)
    assert (opt.shard, opt.shards) == (0, 1)
    mine = slice(8 * comm.rank, 8 * comm.rank + 8)  # a data-parallel shard: wrong here
    with pytest.raises(ConfigError, match="the ranks of shard 0 passed different rows"):
        opt.step(problem.train.inputs[mine], problem.train.targets[mine])


@pytest.mark.mpi(min_size=1)
def test_a_state_of_another_optimizer_is_refused() -> None:
    comm = Communicator()
    problem = _problem()
    sgd = hpcopt.optimizer("sgd", _mlp(), _logistic_loss, comm=comm)
    _run_epochs(sgd, problem, range(1))
    adam = hpcopt.optimizer("adam", _mlp(), _logistic_loss, comm=comm)
    with pytest.raises(ConfigError, match="a state of sgd cannot restart adam"):
        adam.load_state_dict(sgd.state_dict())
    with pytest.raises(ConfigError, match=r"needs what Optimizer\.state_dict"):
        adam.load_state_dict({"steps": 3})


def test_sampler_shards_are_those_of_the_trainer() -> None:
    """The API's sampler is ShardBatchSampler: the rank's contiguous slice of each global batch."""
    problem = _problem()
    whole = list(hpcopt.ShardBatchSampler(len(problem.train), BATCH, SEED, 0, 1))
    parts = [list(hpcopt.ShardBatchSampler(len(problem.train), BATCH, SEED, r, 4)) for r in range(4)]
    assert len(whole) == len(problem.train) // BATCH
    for step, rows in enumerate(whole):
        assert [row for r in range(4) for row in parts[r][step]] == rows


# -- the example of docs/own-loop.md --------------------------------------------------


def test_own_loop_example_runs_at_two_ranks(tmp_path) -> None:
    command = [
        str(BIN / "mpiexec"), "-n", "2", sys.executable, "-m", "mpi4py", str(REPO / "examples" / "own_loop.py"),
        "--max-steps", "4", "--state", str(tmp_path / "state.pt"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    losses = [float(x) for x in re.findall(r"^step +\d+ +loss (\S+)", done.stdout, flags=re.MULTILINE)]
    assert len(losses) == 4, done.stdout  # printed by rank 0 only
    assert losses[-1] < losses[0]
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["steps"] == 4 and state["world_size"] == 2
