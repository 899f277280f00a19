"""Non-finite values, rank-divergence-proof decisions, start-up mismatch, reproducibility.

In-process ``mpi`` tests: run at 1 rank by ``pytest --with-mpi`` and under
``mpiexec -n 2`` / ``-n 4``.  Faults come from :mod:`hpcopt.testing.faults`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import pytest
import torch

from hpcopt import cli
from hpcopt.comm import Communicator
from hpcopt.errors import ConfigError, NonFiniteError
from hpcopt.optimizers import APTSD, make_config
from hpcopt.testing import faults
from hpcopt.training.signature import check_same_on_every_rank, run_signature
from tests.conftest import ObjectiveFactory

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _no_faults_left() -> Iterator[None]:
    yield
    faults.configure(None)


@pytest.fixture
def apts_d(objective_factory: ObjectiveFactory) -> Callable[..., APTSD]:
    """APTS-D with the given options on a logistic problem, its samples sharded over every rank."""
    return lambda **options: APTSD(objective_factory(options={"n": 400, "dim": 10}), make_config("apts-d", options))


def _same_everywhere(comm: Communicator, value: object) -> bool:
    return all(repr(v) == repr(value) for v in comm.allgather_object(value))


@pytest.mark.mpi(min_size=1)
def test_nan_at_the_trial_point_rejects_and_leaves_parameters_bit_identical(apts_d: Callable[..., APTSD]) -> None:
    optimizer = apts_d(global_passes=0, radius=0.5)
    comm, flat = optimizer.objective.comm, optimizer.flat
    optimizer.step()  # a normal step first, so the L-SR1 memory is not empty
    before, radius = flat.clone(), optimizer.radius
    faults.configure(f"rank={comm.size - 1},where=trial,kind=nan")  # one rank's trial loss is NaN
    result = optimizer.step()
    assert not result.accepted and result.extras["reason"] == "rejected_nonfinite"
    assert math.isnan(result.extras["trial_loss"])  # the NaN reached every rank through the allreduce
    assert torch.equal(flat.data, before)
    assert optimizer.radius == max(0.001, optimizer.config.gamma_dec * radius)  # shrunk by gamma_dec
    assert _same_everywhere(comm, (result.accepted, optimizer.radius))


@pytest.mark.mpi(min_size=1)
def test_nonfinite_starting_loss_is_an_error_on_every_rank(apts_d: Callable[..., APTSD]) -> None:
    optimizer = apts_d()
    faults.configure(f"rank={optimizer.objective.comm.size - 1},where=gradient,kind=inf")
    with pytest.raises(NonFiniteError, match="loss at the current parameters is"):
        optimizer.step()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sgd_and_adam_stop_with_one_line_instead_of_training_on_nan(
    optimizer: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    comm = Communicator()
    out = Path(comm.bcast_object(str(tmp_path))) / f"{optimizer}.h5"
    faults.configure(f"rank={comm.size - 1},step=3,where=gradient,kind=nan")
    argv = ["train", "--problem", "logistic", "--set", "problem.n=400", "--batch-size", "80", "--quiet"]
    code = cli.main([*argv, "--optimizer", optimizer, "--out", str(out)])
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("hpcopt: error:")]
    assert code == 2
    assert lines == [f"hpcopt: error: {optimizer}: the mini-batch loss is nan at step 3; stopping instead of "
                     "training on non-finite values (lower the learning rate)"]  # fmt: skip
    if comm.is_root:
        with h5py.File(out, "r") as log:  # the log keeps the two good steps and says "failed"
            assert log.attrs["status"] == "failed"
            assert log["iterations/step"][:].tolist() == [1, 2]


@pytest.mark.mpi(min_size=1)
def test_rank_local_noise_cannot_split_the_decisions(apts_d: Callable[..., APTSD]) -> None:
    # Every rank perturbs its own local losses differently; the decisions use only
    # allreduced scalars, so accept/reject and the radius stay identical everywhere.
    optimizer = apts_d(radius=1.0)
    comm, flat = optimizer.objective.comm, optimizer.flat
    faults.configure("where=gradient,kind=noise;where=trial,kind=noise")
    for _ in range(6):
        result = optimizer.step()
        assert _same_everywhere(comm, (result.accepted, result.ratio, optimizer.radius))
        assert _same_everywhere(comm, flat.data.sum().item())


@pytest.mark.mpi(min_size=1)
def test_start_up_mismatch_is_reported_on_every_rank() -> None:
    comm = Communicator()
    parameters = torch.zeros(10 + (comm.rank % 2))  # odd ranks have a different model
    signature = run_signature('{"a": 1}', parameters, train_samples=400, val_samples=100)
    if comm.size == 1:
        check_same_on_every_rank(comm, signature)  # nothing to disagree with
        return
    with pytest.raises(
        ConfigError, match="ranks disagree at start-up: num_parameters is 10 on rank 0 but 11 on rank 1"
    ):
        check_same_on_every_rank(comm, signature)


@pytest.mark.mpi(min_size=1)
def test_signature_sees_a_single_flipped_parameter_bit_and_a_config_change() -> None:
    comm = Communicator()
    parameters = torch.ones(8)
    flipped = parameters.clone()
    flipped.view(torch.int32)[3] ^= 1
    if comm.size > 1:
        mine = run_signature("{}", flipped if comm.rank == 1 else parameters, 400, 100)
        with pytest.raises(ConfigError, match="parameters_sha256"):
            check_same_on_every_rank(comm, mine)
        config = '{"seed": 1}' if comm.rank == comm.size - 1 else '{"seed": 0}'
        with pytest.raises(ConfigError, match="config_sha256"):
            check_same_on_every_rank(comm, run_signature(config, parameters, 400, 100))
    assert run_signature("{}", flipped, 400, 100) != run_signature("{}", parameters, 400, 100)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("optimizer", ["apts-d", "adam"])
def test_same_seed_gives_byte_identical_losses_through_the_cli(optimizer: str, tmp_path: Path) -> None:
    comm = Communicator()
    directory = Path(comm.bcast_object(str(tmp_path)))
    argv = ["train", "--problem", "logistic", "--set", "problem.n=400", "--batch-size", "80", "--epochs", "2"]
    for name in ("a", "b"):
        assert cli.main([*argv, "--optimizer", optimizer, "--quiet", "--out", str(directory / f"{name}.h5")]) == 0
    if comm.is_root:
        with h5py.File(directory / "a.h5", "r") as a, h5py.File(directory / "b.h5", "r") as b:
            assert a["iterations/loss"].shape == (10,)
            assert a["iterations/loss"][:].tobytes() == b["iterations/loss"][:].tobytes()
            assert a["iterations/radius"][:].tobytes() == b["iterations/radius"][:].tobytes()


# --------------------------------------------------------------------------------------
# Bad input: one line on every rank, exit status 2, before any file is created (issue 16).

ARGV = ["train", "--problem", "logistic", "--set", "problem.n=400", "--batch-size", "80", "--quiet"]


def _error_lines(capfd: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capfd.readouterr().err.splitlines() if line.startswith("hpcopt: error:")]


def _files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "100000000000000"], "--seed must be between 0 and 4294967295, got 100000000000000"),
        (["--set", "local_iterations=1e400"], "option 'local_iterations': expected int, got '1e400'"),
        (["--optimizer", "sgd", "--set", "lr=inf"], "sgd option 'lr' must be a finite number, got 'inf'"),
        (["--set", "radius=nan"], "apts-d option 'radius' must be a finite number, got 'nan'"),
        (["--target", "nan"], "train option 'target' must be a finite number, got nan"),
        (["--config", "{dir}/epochs.toml"], "option 'epochs': expected int, got '1e999'"),
        (["--config", "{dir}/binary.toml"], "config file {dir}/binary.toml is not valid TOML: it is not UTF-8 text"),
        (["--resume", "{dir}"], "checkpoint {dir} is a directory, not a checkpoint file"),
    ],
)
def test_bad_input_is_one_line_on_every_rank_before_any_file(
    args: list[str], message: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    comm = Communicator()
    directory = Path(comm.bcast_object(str(tmp_path)))
    if comm.is_root:
        (directory / "epochs.toml").write_text('epochs = "1e999"\n')
        (directory / "binary.toml").write_bytes(bytes(range(128, 256)))
    comm.barrier()
    argv = [*ARGV, *(arg.format(dir=directory) for arg in args), "--out", str(directory / "r.h5")]
    code = cli.main(argv)
    assert code == 2
    assert _error_lines(capfd) == [f"hpcopt: error: {message.format(dir=directory)}"]
    comm.barrier()
    assert _files(directory) == ["binary.toml", "epochs.toml"]  # no run log, no lock, no checkpoint


@pytest.mark.mpi(min_size=1)
def test_a_malformed_fault_is_refused_before_the_log_exists(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    comm = Communicator()
    directory = Path(comm.bcast_object(str(tmp_path)))
    monkeypatch.setenv(faults.ENV, "rank=x,where=gradient")
    faults.reset()
    assert cli.main([*ARGV, "--out", str(directory / "r.h5")]) == 2
    assert _error_lines(capfd) == [
        "hpcopt: error: HPCOPT_FAULT: bad fault 'rank=x,where=gradient' (rank and step: an integer or all; "
        "seconds: a number)"
    ]
    comm.barrier()
    assert _files(directory) == []


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--checkpoint", "{dir}/link.h5", "--checkpoint-every", "1"],
            "the run log and the checkpoint are one file, {dir}/r.h5: the checkpoint would replace the log; "
            "give --checkpoint another path",
        ),
        (
            ["--resume", "{dir}/c.ckpt", "--overwrite"],
            "--out {dir}/r.h5 is the checkpoint being resumed: the run log would destroy it; give --out another path",
        ),
    ],
)
def test_a_log_that_is_also_the_checkpoint_is_refused(
    args: list[str], message: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    comm = Communicator()
    directory = Path(comm.bcast_object(str(tmp_path)))
    if comm.is_root:
        (directory / "link.h5").symlink_to(directory / "r.h5")  # another name of the log, resolved
        if "--resume" in args:
            (directory / "c.ckpt").write_bytes(b"the only checkpoint")
            (directory / "r.h5").symlink_to(directory / "c.ckpt")
    comm.barrier()
    before = _files(directory)
    code = cli.main([*ARGV, *(arg.format(dir=directory) for arg in args), "--out", str(directory / "r.h5")])
    assert code == 2
    assert _error_lines(capfd) == [f"hpcopt: error: {message.format(dir=directory)}"]
    comm.barrier()
    assert _files(directory) == before
    if "--resume" in args:
        assert (directory / "c.ckpt").read_bytes() == b"the only checkpoint"


# --------------------------------------------------------------------------------------
# Damaged, crafted and finished checkpoints.

RESUMABLE = [*ARGV, "--optimizer", "adam", "--epochs", "3"]


def _craft(state: dict[str, object], damage: str, size: int) -> dict[str, object]:
    """``state`` with one kind of damage, as a hostile or corrupted file would have it."""
    if damage == "missing key":
        del state["rng"]
    elif damage == "wrong shape":
        state["parameters"] = torch.zeros(3)
    elif damage == "short rng list":
        state["rng"] = list(state["rng"])[:-1]  # type: ignore[call-overload]
    elif damage == "optimizer state":
        state["optimizer"]["exp_avg"] = torch.zeros(3)  # type: ignore[index]
    elif damage == "last rank's rng":
        rng = list(state["rng"])  # type: ignore[call-overload]
        rng[size - 1] = torch.zeros(3, dtype=torch.uint8)  # only that rank restores it
        state["rng"] = rng
    return state


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing key", "checkpoint {ckpt} is damaged: it has no 'rng' entry"),
        ("wrong shape", "checkpoint {ckpt} is damaged: its parameters have shape (3,); the model has 21"),
        ("short rng list", "checkpoint {ckpt} is damaged: it holds {short} RNG states for {size} ranks"),
        (
            "optimizer state",
            "checkpoint {ckpt} is damaged: optimizer.exp_avg has shape (3,) (torch.float32); this run has (21,)",
        ),
        ("last rank's rng", "checkpoint {ckpt} is damaged: RuntimeError:"),
    ],
)
def test_a_damaged_checkpoint_is_one_line_on_every_rank(
    damage: str, message: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    comm = Communicator()
    directory = Path(comm.bcast_object(str(tmp_path)))
    ckpt = directory / "c.ckpt"
    assert cli.main([*RESUMABLE, "--max-steps", "2", "--checkpoint", str(ckpt)]) == 0
    if comm.is_root:
        torch.save(_craft(torch.load(ckpt, weights_only=True), damage, comm.size), ckpt)
    comm.barrier()
    capfd.readouterr()
    code = cli.main([*RESUMABLE, "--max-steps", "4", "--resume", str(ckpt), "--out", str(directory / "r.h5")])
    assert code == 2
    expected = message.format(ckpt=ckpt, short=comm.size - 1, size=comm.size)
    (line,) = _error_lines(capfd)
    assert line.startswith(f"hpcopt: error: {expected}"), line
    if damage == "last rank's rng" and comm.rank != comm.size - 1:
        assert line.endswith(f"(on rank {comm.size - 1})")  # only that rank saw it; agree told the others
    comm.barrier()
    assert _files(directory) == ["c.ckpt"]


class _Hostile:
    """Unpickling an instance runs code: weights-only loading must refuse it."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this ran while loading the checkpoint",))


@pytest.mark.mpi(min_size=1)
def test_a_hostile_checkpoint_is_refused_without_advice_to_unpickle_it(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    comm = Communicator()
    directory = Path(comm.bcast_object(str(tmp_path)))
    ckpt = directory / "c.ckpt"
    if comm.is_root:
        torch.save({"format": "hpcopt-checkpoint", "payload": _Hostile()}, ckpt)
    comm.barrier()
    assert cli.main([*RESUMABLE, "--resume", str(ckpt)]) == 2
    captured = capfd.readouterr()
    assert [line for line in captured.err.splitlines() if line.startswith("hpcopt: error:")] == [
        f"hpcopt: error: checkpoint {ckpt} holds objects other than tensors, numbers and strings, so it was not "
        "written by hpcopt; it is not loaded (unpickling it could run code)"
    ]
    assert "weights_only" not in captured.err + captured.out
    assert "this ran" not in captured.out


@pytest.mark.mpi(min_size=1)
def test_resuming_a_run_whose_epochs_are_done_is_refused(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    comm = Communicator()
    directory = Path(comm.bcast_object(str(tmp_path)))
    ckpt = directory / "c.ckpt"
    assert cli.main([*RESUMABLE, "--checkpoint", str(ckpt)]) == 0  # 3 epochs of 5 steps
    capfd.readouterr()
    assert cli.main([*RESUMABLE, "--resume", str(ckpt), "--out", str(directory / "r.h5")]) == 2
    assert _error_lines(capfd) == [
        f"hpcopt: error: checkpoint {ckpt} is at step 15, the end of epoch 3; --epochs 3 leaves nothing to do "
        "(--epochs counts from the start of the original run)"
    ]
    comm.barrier()
    assert _files(directory) == ["c.ckpt"]
