"""Checkpoint and restart: k steps + restart + m steps is bit for bit k + m steps.

The ``mpi`` tests run in-process at 1 rank (``pytest --with-mpi``) and under
``mpiexec -n 2`` / ``-n 4``; the checkpoint directory is rank 0's ``tmp_path``,
broadcast to the others.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpcopt.comm import Communicator
from hpcopt.errors import ConfigError, HpcoptError
from hpcopt.log import checkpoint
from hpcopt.numerics.trust_region import LSR1Operator
from hpcopt.testing import faults
from hpcopt.testing.faults import InjectedFault
from hpcopt.training.trainer import TrainConfig, TrainResult, train

pytestmark = pytest.mark.timeout(60)

PROBLEM = {"n": 400, "dim": 10}
# 5 steps per epoch, so step 7 is in the middle of epoch 2: the restart must skip
# the right batches of the right permutation.
BASE = {"problem": "logistic", "epochs": 3, "batch_size": 80, "quiet": True}


def _shared_dir(comm: Communicator, tmp_path: Path) -> Path:
    return Path(comm.bcast_object(str(tmp_path)))


# Options that make each optimizer's state non-trivial within 12 steps (Neumann: warm-up
# ends at step 2 and its momentum resets every 4 steps, so the restart at 7 is mid-cycle;
# APTS-P: the non-monotone window of the last 3 losses must come back with the radius).
OPTIMIZER_OPTIONS: dict[str, dict[str, object]] = {
    "apts-d-lsr1": {"global_solver": "lsr1", "global_passes": 1, "local_solver": "lsr1", "combine": "average"},
    "apts-d-metric": {"metric": "adam"},
    "apts-p": {"nonmonotone": 3},
    "neumann": {"epoch_steps": 2, "warmup_epochs": 1, "reset_epochs": 2},
    "hf": {"max_iterations": 5},
}


def _train(comm: Communicator, optimizer: str, **options: object) -> TrainResult:
    # "apts-d-lsr1": APTS-D with its first-order L-SR1 global pass, whose pairs are state;
    # "apts-d-metric": APTS-D in Adam's ellipsoid, whose second moments are state.
    name = optimizer.removesuffix("-lsr1").removesuffix("-metric")
    cfg = TrainConfig(**BASE, optimizer=name, **options)  # type: ignore[arg-type]
    return train(cfg, dict(OPTIMIZER_OPTIONS.get(optimizer, {})), dict(PROBLEM), comm=comm)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize(
    "optimizer", ["apts-d", "apts-d-lsr1", "apts-d-metric", "apts-p", "adam", "sgd", "hf", "nlcg", "neumann"]
)
def test_restart_is_bit_identical_to_an_uninterrupted_run(optimizer: str, tmp_path: Path) -> None:
    comm = Communicator()
    directory = _shared_dir(comm, tmp_path)
    ckpt = str(directory / f"{optimizer}.ckpt")
    full = _train(comm, optimizer, max_steps=12)
    first = _train(comm, optimizer, max_steps=7, checkpoint=ckpt, out=str(directory / f"{optimizer}-a.h5"))
    resumed = _train(comm, optimizer, max_steps=12, resume=ckpt, out=str(directory / f"{optimizer}-b.h5"))
    assert first.steps == 7 and resumed.steps == 12
    assert torch.equal(resumed.parameters, full.parameters)  # bit for bit
    assert resumed.losses == full.losses[7:]
    if comm.is_root:
        # The resumed run writes a new log whose step numbering continues.
        with h5py.File(directory / f"{optimizer}-b.h5", "r") as log:
            np.testing.assert_array_equal(log["iterations/step"][:], np.arange(8, 13))
            assert log["iterations/loss"][:].tolist() == full.losses[7:]
            assert log.attrs["resumed_at_step"] == 7


@pytest.mark.mpi(min_size=1)
def test_apts_d_state_holds_radius_and_lsr1_memory(tmp_path: Path) -> None:
    comm = Communicator()
    directory = _shared_dir(comm, tmp_path)
    ckpt = str(directory / "state.ckpt")
    _train(comm, "apts-d-lsr1", max_steps=4, checkpoint=ckpt, checkpoint_every=2)
    state = checkpoint.load(ckpt)
    assert state["step"] == 4 and state["world_size"] == comm.size
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 4 and len(state["epoch_losses"]) == 4
    assert len(state["rng"]) == comm.size
    optimizer_state = state["optimizer"]
    assert optimizer_state["steps"] == 4 and optimizer_state["radius"] > 0
    assert len(optimizer_state["global_solver"]["s"]) >= 1  # L-SR1 pairs were saved


@pytest.mark.mpi(min_size=1)
def test_resume_with_other_options_is_refused_on_every_rank(tmp_path: Path) -> None:
    comm = Communicator()
    directory = _shared_dir(comm, tmp_path)
    ckpt = str(directory / "seed.ckpt")
    _train(comm, "adam", max_steps=2, checkpoint=ckpt)
    with pytest.raises(ConfigError, match="written with seed=0; this run has seed=1"):
        _train(comm, "adam", max_steps=4, resume=ckpt, seed=1)
    with pytest.raises(ConfigError, match="--max-steps 2 leaves nothing to do"):
        _train(comm, "adam", max_steps=2, resume=ckpt)


@pytest.mark.mpi(min_size=1)
def test_an_extended_run_keeps_the_options_fitted_to_its_first_length(tmp_path: Path) -> None:
    # Neumann's burn-in and first reset period follow the run's length where unset (a tenth and
    # a fifth of it). A 3-epoch run extended to 6 by --resume keeps those of 3 epochs, so it is
    # bit for bit the 6-epoch run with them set: 0.3 and 0.6 epochs.
    comm = Communicator()
    directory = _shared_dir(comm, tmp_path)
    ckpt = str(directory / "neumann.ckpt")
    first = TrainConfig(**{**BASE, "epochs": 3}, optimizer="neumann", checkpoint=ckpt)  # type: ignore[arg-type]
    train(first, {}, dict(PROBLEM), comm=comm)
    assert checkpoint.load(ckpt)["run_epochs"] == 3
    longer = TrainConfig(**{**BASE, "epochs": 6}, optimizer="neumann", resume=ckpt, checkpoint=ckpt)  # type: ignore[arg-type]
    extended = train(longer, {}, dict(PROBLEM), comm=comm)
    assert checkpoint.load(ckpt)["run_epochs"] == 3  # a second extension keeps them too
    whole = TrainConfig(**{**BASE, "epochs": 6}, optimizer="neumann")  # type: ignore[arg-type]
    reference = train(whole, {"warmup_epochs": 0.3, "reset_epochs": 0.6}, dict(PROBLEM), comm=comm)
    assert extended.steps == reference.steps == 30
    assert extended.losses == reference.losses[15:]
    assert torch.equal(extended.parameters, reference.parameters)
    # An option given differently is refused, naming only the options that differ.
    expected = r"written with optimizer_config lr=0\.01, warmup_epochs=0\.3; this run has lr=0\.02, warmup_epochs=1\.0$"
    again = TrainConfig(**{**BASE, "epochs": 6}, optimizer="neumann", resume=ckpt, overwrite=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=expected):
        train(again, {"lr": 0.02, "warmup_epochs": 1}, dict(PROBLEM), comm=comm)
    # A checkpoint without the entry (older ones): the resumed run's --epochs.
    assert checkpoint.run_epochs({"step": 1}, 6) == 6 and checkpoint.run_epochs(None, 4) == 4


def test_resume_on_another_rank_count_is_refused() -> None:
    state = {"world_size": 4, "compat": {"seed": 0}}
    with pytest.raises(ConfigError, match=r"written by 4 ranks; this run has 2\. Resume with mpiexec -n 4"):
        checkpoint.check_resumable(state, "run.ckpt", {"seed": 0}, world_size=2)


def test_failure_between_write_and_rename_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "step": 1}, str(path))
    faults.configure("where=checkpoint,step=2")  # dies after the temporary file is complete
    try:
        with pytest.raises(InjectedFault):
            checkpoint.atomic_save(
                {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "step": 2}, str(path), step=2
            )
    finally:
        faults.configure(None)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(tmp_path) == ["run.ckpt"]  # no temporary file left behind


def test_truncated_or_foreign_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION}, str(path))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ConfigError, match="cannot be read"):
        checkpoint.load(str(path))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="not an hpcopt checkpoint"):
        checkpoint.load(str(tmp_path / "other.pt"))
    with pytest.raises(HpcoptError, match="does not exist"):
        checkpoint.load(str(tmp_path / "missing.ckpt"))


def test_lsr1_state_round_trip_is_exact() -> None:
    generator = torch.Generator().manual_seed(0)
    operator = LSR1Operator(memory=3)
    for _ in range(5):
        s = torch.randn(6, generator=generator, dtype=torch.float64)
        operator.update(s, torch.randn(6, 6, generator=generator, dtype=torch.float64) @ s)
    copy = LSR1Operator(memory=3)
    copy.load_state_dict(operator.state_dict())
    v = torch.randn(6, generator=generator, dtype=torch.float64)
    assert torch.equal(copy.matvec(v), operator.matvec(v))
    assert copy.gamma == operator.gamma and copy.size == operator.size
