"""``hpcopt.train`` on problems of a user's own, in every launch (1, 2 and 4 ranks).

Each multi-rank test compares, at the rank count of its launch, two ways of running the
same thing that must agree: the built-in MNIST problem and the same tensors through
``hpcopt.problem`` (bit for bit); tensors and a map-style ``Dataset`` of the same rows
(bit for bit); the distributed run and the same run alone on ``MPI.COMM_SELF``.  Errors
must be raised on every rank; the per-test timeout turns a hang into a failure.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TypedDict

import h5py
import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import Tensor, nn
from torch.utils.data import Dataset

import hpcopt
from hpcopt.comm import Communicator
from hpcopt.distributed.sharding import GlobalBatches, contiguous_slice
from hpcopt.errors import ConfigError
from hpcopt.problems import models
from hpcopt.problems.custom import PROBE_ROWS
from tests.api.tanh_functions import FusedTanh
from tests.conftest import mnist_dir

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

ROWS, DIM, BATCH = 480, 12, 96


class Quiet(TypedDict):
    """The options of ``QUIET``: no progress line, an evaluation every epoch."""

    quiet: bool
    eval_every: int


class Run(Quiet, total=False):
    """Options of ``hpcopt.train`` that the tests pass as ``**run``."""

    optimizer: str
    epochs: int
    batch_size: int
    seed: int
    options: Mapping[str, object]


QUIET: Quiet = {"quiet": True, "eval_every": 1}


def blobs(rows: int = ROWS, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(rows, DIM, generator=generator, dtype=dtype)
    labels = (inputs[:, :3].sum(dim=1) > 0).long() + (inputs[:, 3] > 1).long()
    return inputs, labels


class RecordingRows(Dataset[tuple[Tensor, Tensor]]):
    """The rows of two tensors, one at a time, remembering which were read."""

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        self.inputs, self.targets = inputs, targets
        self.read: set[int] = set()

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        self.read.add(index)
        return self.inputs[index], self.targets[index]


class Residual(nn.Module):
    """Not a Sequential: a skip connection, a buffer and a parameter shared by two uses."""

    shift: Tensor  # the buffer registered in __init__

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(DIM, 16)
        self.mix = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)
        self.register_buffer("shift", torch.linspace(-0.1, 0.1, 16))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inner(x)) + self.shift
        h = h + torch.tanh(self.mix(h))
        return self.out(torch.tanh(self.mix(h)))


def _alone() -> Communicator:
    return Communicator(MPI.COMM_SELF)


@pytest.mark.mpi(min_size=1)
def test_own_problem_on_mnist_tensors_matches_the_built_in_problem_bit_for_bit() -> None:
    from hpcopt.problems import make_problem

    data_dir = str(mnist_dir())
    builtin = make_problem("mnist", data_dir=data_dir, options={"limit": 800})
    own = hpcopt.problem(
        models.cnn_small,
        F.cross_entropy,
        train=(builtin.train.inputs, builtin.train.targets),
        val=(builtin.val.inputs[:400], builtin.val.targets[:400]),
        metric="accuracy",
    )
    run: Run = {"optimizer": "apts-d", "epochs": 1, "batch_size": 200, "seed": 3, "options": {"radius": 0.5}, **QUIET}
    by_name: Run = {**run, "options": {"radius": 0.5, "problem.limit": 800}}
    reference = hpcopt.train("mnist", data_dir=data_dir, **by_name, max_steps=3)
    result = hpcopt.train(own, max_steps=3, **run)
    assert result.steps == reference.steps == 3
    assert result.losses == reference.losses  # bit for bit
    assert torch.equal(result.parameters, reference.parameters)
    assert result.losses[-1] < result.losses[0]


@pytest.mark.mpi(min_size=1)
# APTS-D is left out: its local phases see each rank's shard, so P ranks take other steps than one.
@pytest.mark.parametrize("optimizer", ["hf", "adam"])
def test_non_sequential_float64_model_gives_the_single_process_result(optimizer: str) -> None:
    train = blobs(dtype=torch.float64)
    val = blobs(160, seed=1, dtype=torch.float64)

    def make() -> hpcopt.Problem:
        return hpcopt.problem(lambda: Residual().double(), F.cross_entropy, train, val, metric="accuracy")

    options = {"lr": 0.02} if optimizer == "adam" else {}
    run: Run = {"optimizer": optimizer, "epochs": 2, "batch_size": BATCH, "seed": 1, "options": options, **QUIET}
    distributed = hpcopt.train(make(), **run)
    alone = hpcopt.train(make(), comm=_alone(), **run)
    assert distributed.parameters.dtype == torch.float64 and distributed.steps == 10
    torch.testing.assert_close(distributed.parameters, alone.parameters, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(torch.tensor(distributed.losses), torch.tensor(alone.losses), rtol=1e-9, atol=1e-12)
    assert distributed.losses[-1] < 0.7 * distributed.losses[0]
    # The reported metric is the trained model's accuracy on the validation set.
    assert distributed.model is not None
    with torch.no_grad():
        direct = float((distributed.model(val[0]).argmax(1) == val[1]).double().mean())
    assert distributed.metrics["val_accuracy"] == pytest.approx(direct, abs=1e-12)


@pytest.mark.mpi(min_size=1)
def test_batch_norm_and_dropout_train_and_evaluate_in_eval_mode() -> None:
    train, val = blobs(), blobs(160, seed=1)

    def net() -> nn.Module:
        return nn.Sequential(nn.Linear(DIM, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Dropout(0.2), nn.Linear(24, 3))

    problem = hpcopt.problem(net, F.cross_entropy, train, val, metric="accuracy")
    first = hpcopt.train(problem, optimizer="apts-d", epochs=2, batch_size=BATCH, **QUIET)
    second = hpcopt.train(problem, optimizer="apts-d", epochs=2, batch_size=BATCH, **QUIET)
    assert first.losses == second.losses  # same seed, same rank count: the same masks and statistics
    assert first.losses[-1] < first.losses[0]
    model = second.model
    assert model is not None and model.training  # evaluation left the module in training mode
    assert isinstance(model, nn.Sequential)
    norm = model[1]
    assert isinstance(norm, nn.BatchNorm1d) and norm.running_mean is not None
    running = norm.running_mean.clone()
    # Each rank's running statistics come from its own shards, and each rank evaluates its
    # slice of the validation set with them: the sums of those slices, in eval mode.
    comm = Communicator()
    part = contiguous_slice(len(val[0]), comm.rank, comm.size)
    model.eval()
    with torch.no_grad():
        outputs = model(val[0][part])
        loss_sum = float(F.cross_entropy(outputs, val[1][part], reduction="sum"))
        correct = float((outputs.argmax(1) == val[1][part]).sum())
    loss_sum, correct = comm.allreduce_scalars([loss_sum, correct])
    assert torch.equal(norm.running_mean, running)
    assert second.metrics["val_loss"] == pytest.approx(loss_sum / 160, rel=1e-5)
    assert second.metrics["val_accuracy"] == pytest.approx(correct / 160, abs=1e-12)


@pytest.mark.mpi(min_size=1)
def test_regression_with_float_targets_and_a_custom_metric() -> None:
    inputs, _ = blobs(dtype=torch.float64)
    weights = torch.linspace(-1, 1, DIM, dtype=torch.float64)
    targets = inputs @ weights + 0.5

    def mean_abs_error(outputs: Tensor, target: Tensor) -> tuple[Tensor, int]:
        # A sum and a count, so that ranks can add them.
        return (outputs.squeeze(-1) - target).abs().sum(), target.numel()

    def loss(outputs: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(outputs.squeeze(-1), target)

    problem = hpcopt.problem(
        lambda: nn.Linear(DIM, 1).double(),
        loss,
        (inputs, targets),
        (inputs[:200], targets[:200]),
        metric=mean_abs_error,
    )
    run: Run = {"optimizer": "hf", "epochs": 3, "batch_size": 240, **QUIET}
    distributed = hpcopt.train(problem, **run)
    alone = hpcopt.train(problem, comm=_alone(), **run)
    torch.testing.assert_close(distributed.parameters, alone.parameters, rtol=1e-9, atol=1e-10)
    # A linear least-squares fit: Newton-Krylov steps find it.
    assert distributed.final_loss < 1e-3 * distributed.losses[0]
    assert distributed.model is not None
    with torch.no_grad():
        direct = float((distributed.model(inputs[:200]).squeeze(-1) - targets[:200]).abs().mean())
    assert distributed.metrics["val_mean_abs_error"] == pytest.approx(direct, rel=1e-9)


@pytest.mark.mpi(min_size=1)
def test_a_dataset_gives_the_losses_of_tensors_and_each_rank_reads_only_its_rows() -> None:
    comm = Communicator()
    train, val = blobs(), blobs(160, seed=1)
    train_rows, val_rows = RecordingRows(*train), RecordingRows(*val)

    def problem(train_data: object, val_data: object) -> hpcopt.Problem:
        return hpcopt.problem(lambda: nn.Linear(DIM, 3), F.cross_entropy, train_data, val_data, metric="accuracy")

    run: Run = {"optimizer": "apts-d", "epochs": 2, "batch_size": BATCH, "seed": 2, **QUIET}
    from_tensors = hpcopt.train(problem(train, val), **run)
    streamed = problem(train_rows, val_rows)
    train_rows.read.clear()  # making the problem read a few rows to check their shapes
    val_rows.read.clear()
    from_dataset = hpcopt.train(streamed, **run)
    assert from_dataset.losses == from_tensors.losses  # bit for bit
    assert torch.equal(from_dataset.parameters, from_tensors.parameters)
    assert from_dataset.metrics == from_tensors.metrics

    mine: set[int] = set()
    batches = GlobalBatches(ROWS, BATCH, 2, comm.rank, comm.size)
    for epoch in range(2):
        for index in batches.epoch(epoch):
            mine.update(index.tolist())
    probe = set(range(PROBE_ROWS))  # the start-up check runs the model on the first rows
    assert mine <= train_rows.read <= mine | probe
    if comm.size > 1:
        assert len(train_rows.read) < ROWS
    assert val_rows.read == set(range(160)[contiguous_slice(160, comm.rank, comm.size)])

    ahead = hpcopt.train(problem(RecordingRows(*train), RecordingRows(*val)), num_workers=1, **run)
    assert ahead.losses == from_tensors.losses  # a reader process ahead changes nothing
    threaded = hpcopt.train(problem(RecordingRows(*train), RecordingRows(*val)), read_ahead=2, **run)
    assert threaded.losses == from_tensors.losses  # nor does a reader thread


@pytest.mark.mpi(min_size=1)
def test_a_module_instance_starts_from_rank_0s_weights(tmp_path: Path) -> None:
    comm = Communicator()
    torch.manual_seed(100 + comm.rank)  # each rank's instance differs
    model = nn.Linear(DIM, 3)
    rank0 = comm.bcast_object(copy.deepcopy(model.state_dict()))
    train = blobs()
    result = hpcopt.train(
        hpcopt.problem(model, F.cross_entropy, train), optimizer="sgd", epochs=1, batch_size=BATCH, **QUIET
    )
    assert result.model is model  # trained in place
    again = nn.Linear(DIM, 3)
    again.load_state_dict(rank0)
    reference = hpcopt.train(
        hpcopt.problem(again, F.cross_entropy, train),
        optimizer="sgd",
        epochs=1,
        batch_size=BATCH,
        comm=_alone(),
        **QUIET,
    )
    torch.testing.assert_close(result.parameters, reference.parameters, rtol=1e-5, atol=1e-6)


@pytest.mark.mpi(min_size=1)
def test_least_squares_runs_record_gauss_newton_and_the_users_choice_wins(tmp_path: Path) -> None:
    comm = Communicator()
    path = Path(comm.bcast_object(str(tmp_path)))
    inputs, _ = blobs()
    targets = torch.sin(inputs[:, :2])
    problem = hpcopt.problem(lambda: nn.Linear(DIM, 2), F.mse_loss, (inputs, targets), least_squares=True)
    for name, options in (("default", {}), ("chosen", {"global_solver": "lsr1"})):
        hpcopt.train(problem, epochs=1, batch_size=BATCH, out=path / f"{name}.h5", options=options, **QUIET)
    comm.barrier()
    with h5py.File(path / "default.h5", "r") as log:
        default = json.loads(log.attrs["config_json"])["optimizer"]
    with h5py.File(path / "chosen.h5", "r") as log:
        chosen = json.loads(log.attrs["config_json"])["optimizer"]
    assert (default["global_solver"], default["curvature"]) == ("steihaug", "ggn")
    assert (chosen["global_solver"], chosen["curvature"]) == ("lsr1", "ggn")


class FusedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.last = nn.Linear(DIM, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.last(FusedTanh.apply(self.first(x)))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize(
    ("pieces", "run", "message"),
    [
        ({"loss": lambda o, y: F.cross_entropy(o, y, reduction="none")}, {}, "the loss returned a tensor of shape"),
        ({"model": lambda: nn.Identity()}, {}, "the model has no trainable parameters"),
        ({"model": FusedNet}, {"optimizer": "hf"}, "curvature products (curvature=ggn) fail on this model"),
        ({}, {"batch_size": 99, "optimizer": "sgd"}, "is not divisible by the"),
        ({}, {"epochs": 0}, "--epochs must be >= 1"),
        ({}, {"options": {"radius": -1}}, "radius must be > 0"),
        ({}, {"options": {"problem.n": 3}}, "problem options (n) apply to a problem given by name"),
        ({}, {"wrong": 1}, "unknown train option 'wrong'"),
    ],
)
def test_bad_input_is_one_error_on_every_rank(pieces: dict, run: dict, message: str) -> None:
    if "batch_size" in run and Communicator().size == 1:
        run = {**run, "batch_size": 1000}  # nothing to divide on one rank: the size exceeds the set
        message = "exceeds the 480 training samples"
    problem = hpcopt.problem(
        **{"model": lambda: nn.Linear(DIM, 3), "loss": F.cross_entropy, "train": blobs(), **pieces}
    )
    with pytest.raises(ConfigError) as info:
        hpcopt.train(problem, **{"batch_size": BATCH, **QUIET, **run})
    assert message in str(info.value)


@pytest.mark.mpi(min_size=1)
def test_the_advised_first_order_run_trains_the_same_model() -> None:
    # The message above advises APTS-D with L-SR1 models only (no curvature products).
    problem = hpcopt.problem(FusedNet, F.cross_entropy, blobs())
    options = {"local_solver": "lsr1", "combine": "average"}
    result = hpcopt.train(problem, optimizer="apts-d", epochs=2, batch_size=BATCH, options=options, **QUIET)
    assert result.losses[-1] < result.losses[0]


@pytest.mark.mpi(min_size=1)
def test_a_dataset_run_resumes_mid_epoch_as_if_never_stopped(tmp_path: Path) -> None:
    comm = Communicator()
    folder = Path(comm.bcast_object(str(tmp_path)))
    train, val = blobs(), blobs(160, seed=1)

    def problem() -> hpcopt.Problem:
        return hpcopt.problem(lambda: nn.Linear(DIM, 3), F.cross_entropy, RecordingRows(*train), RecordingRows(*val))

    run: Run = {"optimizer": "apts-d", "epochs": 2, "batch_size": BATCH, **QUIET}
    whole = hpcopt.train(problem(), **run)
    checkpoint = folder / "run.ckpt"
    first = hpcopt.train(problem(), max_steps=3, checkpoint=str(checkpoint), checkpoint_every=3, **run)
    rest = hpcopt.train(problem(), resume=str(checkpoint), **run)
    assert first.steps == 3 and rest.steps == 10  # steps count from the start of the first run
    assert first.losses + rest.losses == whole.losses  # bit for bit, the three read shards skipped
    assert torch.equal(rest.parameters, whole.parameters)
