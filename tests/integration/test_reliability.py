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
    assert optimizer.radius == max(0.001, 0.9 * radius)  # shrunk by gamma_dec
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
    assert lines == [f"hpcopt: error: {optimizer}: the mini-batch loss is nan at step 2; stopping instead of "
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
