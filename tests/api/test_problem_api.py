"""``hpcopt.problem``: every bad piece is a clear error, and the problem's pieces do what they say.

The checks of what a user gives run in two places: when the problem is made (kinds
and shapes of the pieces and the data) and when a run starts (the model, loss, metric
and curvature products run once on a few rows).  Both are tested here in one process;
``test_train_api.py`` shows the start-up errors are raised on every rank.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Generator, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset

import hpcopt
from hpcopt.errors import ConfigError, DataError
from hpcopt.optimizers import make_config
from hpcopt.problems.base import Dataset as Rows
from hpcopt.problems.custom import CustomProblem, curvature_in_use
from hpcopt.problems.streamed import StreamedRows
from tests.api.tanh_functions import FusedTanh, LegacyTanh

pytestmark = pytest.mark.timeout(120)

X = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
Y = (X.sum(dim=1) > 0).long()


class Pairs(Dataset[tuple[Tensor, Tensor]]):
    """A map-style dataset over given rows (``shapes`` may make a row disagree)."""

    def __init__(self, inputs: Tensor, targets: Tensor, odd_row: int | None = None) -> None:
        self.inputs, self.targets, self.odd_row = inputs, targets, odd_row

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        value = self.inputs[index]
        return (value[:-1] if index == self.odd_row else value), self.targets[index]


class Stream(IterableDataset[tuple[Tensor, Tensor]]):
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        yield X[0], Y[0]


def linear() -> nn.Module:
    return nn.Linear(3, 2)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"model": 3}, ConfigError, "model must be a torch.nn.Module or a callable"),
        ({"loss": "mse"}, ConfigError, "loss must be a callable"),
        ({"metric": "f1"}, ConfigError, "unknown metric 'f1'"),
        ({"metric": 3}, ConfigError, "metric must be 'accuracy', 'rel_l2', None or a callable"),
        ({"forward": 1}, ConfigError, "forward must be a callable"),
        ({"name": ""}, ConfigError, "name must be a non-empty string"),
        ({"train": [X]}, ConfigError, "train must be a pair of tensors"),
        ({"train": (X, [1, 2])}, ConfigError, "train must be a pair of tensors"),
        ({"train": X}, ConfigError, "train must be a pair of tensors (inputs, targets) or a torch.utils.data.Dataset"),
        ({"train": (X, Y[:-1])}, DataError, "train: 40 input rows but 39 target rows"),
        ({"train": (X[:0], Y[:0])}, DataError, "train has no rows"),
        ({"val": (X[:, :2], Y)}, DataError, "train row 0 has input shape (3,) (torch.float32) but val row 0 has (2,)"),
        ({"val": (X.double(), Y)}, DataError, "(torch.float64)"),
        ({"train": Stream()}, ConfigError, "IterableDataset; hpcopt needs a map-style Dataset"),
        (
            {"train": Pairs(X, Y, odd_row=39)},
            DataError,
            "train row 0 has input shape (3,) (torch.float32) but train row 39",
        ),
    ],
)
def test_bad_pieces_are_clear_errors(kwargs: dict, error: type[Exception], message: str) -> None:
    pieces = {"model": linear, "loss": F.cross_entropy, "train": (X, Y), **kwargs}
    with pytest.raises(error) as info:
        hpcopt.problem(**pieces)
    assert message in str(info.value)


def test_a_dataset_becomes_rows_read_on_demand_and_tensors_stay_in_memory() -> None:
    streamed = hpcopt.problem(linear, F.cross_entropy, train=Pairs(X, Y), val=(X[:10], Y[:10]))
    assert isinstance(streamed.train, StreamedRows) and isinstance(streamed.val, Rows)
    assert len(streamed.train) == 40 and streamed.default_batch_size == 40
    view = streamed.train.subset(slice(10, 20)).subset(torch.tensor([2, 0]))
    assert torch.equal(view.inputs, X[[12, 10]]) and torch.equal(view.targets, Y[[12, 10]])
    shards = list(streamed.train.batches([torch.tensor([3, 1]), torch.tensor([5])]))
    assert [s.targets.tolist() for s in shards] == [Y[[3, 1]].tolist(), Y[[5]].tolist()]
    chunks = list(streamed.train.chunks(16))
    assert [len(c) for c in chunks] == [16, 16, 8] and torch.equal(torch.cat([c.inputs for c in chunks]), X)
    # A row that disagrees in the middle of the set is met when a batch holding it is read.
    odd = hpcopt.problem(linear, F.cross_entropy, train=Pairs(X, Y, odd_row=7))
    with pytest.raises(
        DataError, match=r"train rows disagree in shape: row 6 has input \(3,\).*row 7 has input \(2,\)"
    ):
        list(odd.train.batches([torch.tensor([6, 7])]))


class ReaderPids(Dataset[tuple[Tensor, Tensor]]):
    """Row i is (i, the pid of the process that read it): shows which process reads each row."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return torch.tensor([float(index)]), torch.tensor(os.getpid())


def test_reader_processes_are_kept_across_epochs_and_end_on_close() -> None:
    rows = StreamedRows(ReaderPids())
    epoch = [torch.tensor([3, 1]), torch.tensor([5, 0]), torch.tensor([2, 4])]

    def read_epoch() -> tuple[list[list[float]], set[int]]:
        shards = list(rows.batches(epoch, num_workers=1))
        return [s.inputs[:, 0].tolist() for s in shards], {int(p) for s in shards for p in s.targets}

    first, first_pids = read_epoch()
    # An epoch left half-read (a run stopped mid-epoch) does not disturb the next one.
    next(iter(rows.batches(epoch, num_workers=1)))
    second, second_pids = read_epoch()
    assert first == second == [[3.0, 1.0], [5.0, 0.0], [2.0, 4.0]]
    assert len(first_pids) == 1 and first_pids == second_pids and os.getpid() not in first_pids
    rows.close()
    _, third_pids = read_epoch()
    assert third_pids.isdisjoint(first_pids)
    rows.close()


class SlowThreadRows(Dataset[tuple[Tensor, Tensor]]):
    """Row i is (i, 0); records the thread that read each row; row ``bad`` raises."""

    def __init__(self, bad: int | None = None) -> None:
        self.bad = bad
        self.threads: set[str] = set()

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        self.threads.add(threading.current_thread().name)
        if index == self.bad:
            raise OSError(f"cannot read row {index}")
        return torch.tensor([float(index)]), torch.tensor(0)


def test_a_reader_thread_reads_ahead_in_order_raises_where_it_failed_and_ends() -> None:
    epoch = [torch.tensor([3, 1]), torch.tensor([5, 0]), torch.tensor([2, 4]), torch.tensor([7, 6])]
    data = SlowThreadRows()
    rows = StreamedRows(data)
    shards = [s.inputs[:, 0].tolist() for s in rows.batches(epoch, read_ahead=2)]
    assert shards == [[3.0, 1.0], [5.0, 0.0], [2.0, 4.0], [7.0, 6.0]]
    assert data.threads == {"hpcopt-read-ahead"}  # not this thread, no process
    # A run that stops mid-epoch closes the generator: the thread ends with it.
    reading = rows.batches(epoch, read_ahead=1)
    assert isinstance(reading, Generator)
    next(reading)
    reading.close()
    assert not any(t.name == "hpcopt-read-ahead" for t in threading.enumerate())
    # A failed read is raised at the shard it failed on, after the shards before it.
    failing = StreamedRows(SlowThreadRows(bad=2))
    read: list[list[float]] = []
    with pytest.raises(OSError, match="cannot read row 2"):
        for shard in failing.batches(epoch, read_ahead=3):
            read.append(shard.inputs[:, 0].tolist())
    assert read == [[3.0, 1.0], [5.0, 0.0]]
    assert not any(t.name == "hpcopt-read-ahead" for t in threading.enumerate())


class BatchedPairs(Pairs):
    """A dataset that reads many rows in one call (torch's ``__getitems__``), counting the calls."""

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        super().__init__(inputs, targets)
        self.calls: list[list[int]] = []

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        self.calls.append(list(indices))
        return [(self.inputs[i], self.targets[i]) for i in indices]


def test_a_shard_is_read_in_one_call_when_the_dataset_can() -> None:
    dataset = BatchedPairs(X, Y)
    rows = StreamedRows(dataset)
    shards = list(rows.batches([torch.tensor([3, 1, 4]), torch.tensor([5])]))
    assert dataset.calls == [[3, 1, 4], [5]]
    assert torch.equal(shards[0].inputs, X[[3, 1, 4]]) and torch.equal(shards[1].targets, Y[[5]])


def test_rows_that_cannot_be_stacked_are_named() -> None:
    class Words(Pairs):
        def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
            return self.inputs[index], "cat" if index == 2 else self.targets[index]  # type: ignore[return-value]

    with pytest.raises(DataError, match=r"train rows 1\.\.2 cannot be stacked"):
        StreamedRows(Words(X, Y)).read(torch.tensor([1, 2]))
    with pytest.raises(DataError, match=r"train row 3 is a Tensor, not an \(input, target\) pair"):
        StreamedRows(X).read(torch.tensor([3, 4]))  # type: ignore[arg-type]


def test_default_batch_and_names() -> None:
    big = hpcopt.problem(linear, F.cross_entropy, train=(torch.randn(2500, 3), torch.zeros(2500).long()))
    assert big.default_batch_size == 1000 and big.name == "custom" and big.default_model == "linear"
    assert big.metric_name == "val_loss" and big.val is big.train

    def hits(outputs: Tensor, targets: Tensor) -> tuple[Tensor, int]:
        return (outputs.argmax(1) == targets).sum(), len(targets)

    named = hpcopt.problem(nn.Linear(3, 2), F.cross_entropy, train=(X, Y), metric=hits, higher_is_better=True, name="x")
    assert named.metric_name == "val_hits" and named.metric_higher_is_better and named.default_model == "Linear"
    assert named.model_from_rank0 and not big.model_from_rank0


def test_metrics_are_sums_that_ranks_can_add() -> None:
    net = nn.Linear(3, 2)
    outputs = net(X).detach()
    accuracy = hpcopt.problem(linear, F.cross_entropy, train=(X, Y), metric="accuracy")
    whole = accuracy.eval_metrics(accuracy.eval_sums(net, Rows(X, Y)))
    halves = accuracy.eval_sums(net, Rows(X[:13], Y[:13])) + accuracy.eval_sums(net, Rows(X[13:], Y[13:]))
    assert whole["val_accuracy"] == pytest.approx(float((outputs.argmax(1) == Y).double().mean()))
    assert whole["val_loss"] == pytest.approx(float(F.cross_entropy(outputs, Y)), rel=1e-6)
    assert accuracy.eval_metrics(halves) == pytest.approx(whole)

    target = X @ torch.tensor([1.0, -2.0, 0.5])
    regression = hpcopt.problem(lambda: nn.Linear(3, 1), F.mse_loss, train=(X, target), metric="rel_l2")
    squeeze = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0))
    metrics = regression.eval_metrics(regression.eval_sums(squeeze, Rows(X, target)))
    prediction = squeeze(X).detach().double()
    expected = float(torch.linalg.norm(prediction - target.double()) / torch.linalg.norm(target.double()))
    assert metrics["val_rel_l2_error"] == pytest.approx(expected, rel=1e-9)
    assert metrics["val_loss"] == pytest.approx(float(F.mse_loss(prediction.float(), target)), rel=1e-5)


def _check(problem: CustomProblem, curvature: str | None = None) -> None:
    torch.manual_seed(0)
    problem.check_model(problem.build_model(), curvature)


class FusedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.last = nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.last(FusedTanh.apply(self.first(x)))


class LegacyNet(FusedNet):
    def forward(self, x: Tensor) -> Tensor:
        return self.last(LegacyTanh.apply(self.first(x)))


class Frozen(nn.Module):
    scale: Tensor  # the buffer registered in __init__

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([x @ self.scale, -(x @ self.scale)], dim=1)


@pytest.mark.parametrize(
    ("pieces", "curvature", "message"),
    [
        (
            {"loss": lambda out, y: F.cross_entropy(out, y, reduction="none")},
            None,
            "the loss returned a tensor of shape (4,); it must return a scalar",
        ),
        ({"loss": lambda out, y: 1.0}, None, "the loss returned a float; it must return a scalar tensor"),
        ({"model": Frozen}, None, "the model has no trainable parameters"),
        (
            {"model": lambda: nn.Linear(3, 2).double()},
            None,
            "(the inputs are torch.float32 but the model's parameters are torch.float64)",
        ),
        ({"model": lambda: "net"}, None, "the model factory returned a str, not a torch.nn.Module"),
        ({"model": lambda: 1 / 0}, None, "the model factory raised ZeroDivisionError"),
        ({"forward": lambda net, x: net(x[:, :2])}, None, "the model's forward failed on 4 training rows"),
        ({"loss": lambda out, y: out[:, 5].mean()}, None, "the loss failed on the model's outputs: IndexError"),
        ({"loss": lambda out, y: F.cross_entropy(out.detach(), y)}, None, "does not depend on the model's parameters"),
        ({"metric": lambda out, y: 0.5}, None, "the metric returned a float; it must return (sum, count)"),
        ({"model": FusedNet}, "ggn", "curvature products (curvature=ggn) fail on this model"),
        ({"model": FusedNet}, "hessian", "apts-d with --set local_solver=lsr1 --set combine=average"),
        ({"model": LegacyNet}, "hvp-forward-over-reverse", "torch.func.jvp over torch.func.grad"),
    ],
)
def test_start_up_check_names_what_is_wrong(pieces: dict, curvature: str | None, message: str) -> None:
    problem = CustomProblem(**{"model": linear, "loss": F.cross_entropy, "train": (X, Y), **pieces})
    with pytest.raises(ConfigError) as info:
        _check(problem, curvature)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_what_the_curvature_message_advises_works() -> None:
    # Without curvature products (APTS-P's and APTS-IP's defaults) the fused kernel is fine, and so is
    # .item() in the forward for products by double backward.
    _check(CustomProblem(FusedNet, F.cross_entropy, (X, Y)), None)
    _check(CustomProblem(LegacyNet, F.cross_entropy, (X, Y)), "hessian")


def test_mixed_dtypes_are_refused_before_the_flat_buffer() -> None:
    def mixed() -> nn.Module:
        net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
        net[1].double()
        return net

    with pytest.raises(ConfigError, match="must share one dtype and device"):
        _check(CustomProblem(mixed, F.cross_entropy, (X, Y)))


def test_the_check_leaves_the_model_and_the_random_stream_alone() -> None:
    def noisy() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))

    problem = CustomProblem(noisy, F.cross_entropy, (X, Y), metric="accuracy")
    torch.manual_seed(3)
    model = problem.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    problem.check_model(model, "hessian")
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_curvature_in_use_reads_the_optimizer_config() -> None:
    assert curvature_in_use(make_config("apts-d", {})) == "ggn"  # the Gauss–Newton local phases
    first_order = {"local_solver": "lsr1", "combine": "average"}  # what the start-up message advises
    assert curvature_in_use(make_config("apts-d", first_order)) is None  # L-SR1 local models, no pass
    # A global pass runs only with global_passes > 0, and then its solver counts.
    assert curvature_in_use(make_config("apts-d", {**first_order, "global_passes": 1})) == "ggn"
    both_lsr1 = {**first_order, "global_passes": 1, "global_solver": "lsr1"}
    assert curvature_in_use(make_config("apts-d", both_lsr1)) is None
    # The scaled combination takes one product whatever the solvers.
    assert curvature_in_use(make_config("apts-d", {**both_lsr1, "combine": "scaled"})) == "ggn"
    assert curvature_in_use(make_config("apts-p", {})) is None
    assert curvature_in_use(make_config("apts-ip", {"local_solver": "steihaug"})) == "hessian"
    assert curvature_in_use(make_config("hf", {})) == "ggn"
    assert curvature_in_use(make_config("sgd", {})) is None


def test_least_squares_suggests_gauss_newton_to_apts_and_hf() -> None:
    plain = hpcopt.problem(linear, F.cross_entropy, (X, Y))
    squares = hpcopt.problem(linear, F.mse_loss, (X, X[:, :2]), least_squares=True)
    assert plain.default_optimizer_options("apts-d") == {}
    assert squares.default_optimizer_options("apts-d")["curvature"] == "ggn"
    assert squares.default_optimizer_options("hf") == {"curvature": "ggn"}
    assert squares.default_optimizer_options("sgd") == {}
