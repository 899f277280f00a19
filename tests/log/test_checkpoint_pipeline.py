"""Checkpoint and restart of APTS-IP, whose ranks each hold one pipeline stage.

The checkpoint holds the whole model, gathered from the stages; a resumed run takes
its stage back.  Each layout runs only at the rank count it needs (S × R ranks) and
skips elsewhere: 1×1 in-process, 2×1 and 1×2 under ``mpiexec -n 2``, 4×1 and 2×2
under ``mpiexec -n 4``.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpcopt.comm import Communicator
from hpcopt.errors import ConfigError
from hpcopt.log import checkpoint
from hpcopt.problems import make_problem
from hpcopt.training.trainer import TrainConfig, TrainResult, train

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

# A 3-block transformer has 5 layers with parameters (enough for 4 stages), LayerNorms,
# and a causal-mask buffer in every block, so the buffers' whole-model names are exercised.
LM_OPTIONS = {"context": 16, "train_windows": 12, "val_windows": 4, "embed": 16, "heads": 2, "layers": 3}
# 3 steps per epoch: the restart after step 5 is in the middle of epoch 2.
BATCH_SIZE = 4
FIRST, TOTAL = 5, 8


def _shared_dir(comm: Communicator, tmp_path: Path) -> Path:
    """Rank 0's directory with the training text in it (options must match across ranks)."""
    directory = Path(comm.bcast_object(str(tmp_path)))
    if comm.is_root:
        (directory / "input.txt").write_text("to be or not to be, that is the question. " * 40)
    comm.barrier()
    return directory


def _train(comm: Communicator, directory: Path, replicas: int, **options: object) -> TrainResult:
    cfg = TrainConfig(
        problem="tinyshakespeare",
        optimizer="apts-ip",
        data_dir=str(directory / "input.txt"),
        epochs=3,
        batch_size=BATCH_SIZE,
        quiet=True,
        **options,  # type: ignore[arg-type]
    )
    # A non-monotone window of 3: its losses are state that the restart must restore.
    return train(cfg, {"replicas": replicas, "radius": 0.05, "nonmonotone": 3}, dict(LM_OPTIONS), comm=comm)


def _layout_or_skip(comm: Communicator, stages: int, replicas: int) -> None:
    if stages * replicas != comm.size:
        pytest.skip(f"{stages} stages x {replicas} replicas need {stages * replicas} ranks, not {comm.size}")


LAYOUTS = [(1, 1), (2, 1), (1, 2), (4, 1), (2, 2)]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize(("stages", "replicas"), LAYOUTS, ids=[f"{s}x{r}" for s, r in LAYOUTS])
def test_apts_ip_restart_is_bit_identical_to_an_uninterrupted_run(stages: int, replicas: int, tmp_path: Path) -> None:
    comm = Communicator()
    _layout_or_skip(comm, stages, replicas)
    directory = _shared_dir(comm, tmp_path)
    full = _train(comm, directory, replicas, max_steps=TOTAL, checkpoint=str(directory / "full.ckpt"))
    first = _train(
        comm, directory, replicas, max_steps=FIRST, checkpoint=str(directory / "a.ckpt"), out=str(directory / "a.h5")
    )
    resumed = _train(
        comm,
        directory,
        replicas,
        max_steps=TOTAL,
        resume=str(directory / "a.ckpt"),
        checkpoint=str(directory / "b.ckpt"),
        out=str(directory / "b.h5"),
    )
    assert first.steps == FIRST and resumed.steps == TOTAL
    assert any(a != b for a, b in zip(full.losses, full.losses[1:]))  # the run moved
    # This rank's stage, and the whole model gathered into the last checkpoint, bit for bit.
    assert torch.equal(resumed.parameters, full.parameters)
    assert resumed.losses == full.losses[FIRST:]
    whole_full = checkpoint.load(str(directory / "full.ckpt"))
    whole_resumed = checkpoint.load(str(directory / "b.ckpt"))
    assert torch.equal(whole_resumed["parameters"], whole_full["parameters"])
    assert whole_resumed["optimizer"] == whole_full["optimizer"]  # radius and step count
    if comm.is_root:
        with h5py.File(directory / "b.h5", "r") as log:
            np.testing.assert_array_equal(log["iterations/step"][:], np.arange(FIRST + 1, TOTAL + 1))
            assert log["iterations/loss"][:].tolist() == full.losses[FIRST:]
            assert log.attrs["resumed_at_step"] == FIRST
    comm.barrier()


@pytest.mark.mpi(min_size=1)
def test_apts_ip_checkpoint_holds_every_stage_and_the_layout(tmp_path: Path) -> None:
    comm = Communicator()
    directory = _shared_dir(comm, tmp_path)
    # Two replicas where the rank count allows, so that the replica-0-only gather is exercised.
    replicas = 2 if comm.size % 2 == 0 else 1
    result = _train(comm, directory, replicas, max_steps=FIRST, checkpoint=str(directory / "s.ckpt"))
    state = checkpoint.load(str(directory / "s.ckpt"))
    stages = comm.size // replicas

    problem = make_problem("tinyshakespeare", data_dir=str(directory / "input.txt"), options=dict(LM_OPTIONS))
    whole_model = problem.build_model()
    assert state["parameters"].numel() == sum(p.numel() for p in whole_model.parameters())
    layout = state["pipeline"]
    assert (layout["stages"], layout["replicas"]) == (stages, replicas)
    assert len(layout["stage_bounds"]) == stages + 1 and len(layout["buffers"]) == replicas
    assert set(state["buffers"]) == {name for name, _ in whole_model.named_buffers()}  # whole-model names
    assert len(state["rng"]) == comm.size and state["step"] == FIRST and state["batch_in_epoch"] == 2
    assert state["optimizer"]["steps"] == FIRST and state["optimizer"]["radius"] > 0
    assert len(state["optimizer"]["window"]) == 2  # nonmonotone=3: the two losses before the last

    # Every rank's stage sits in the gathered vector at its stage's offset.
    blocks = comm.allgather_object(result.parameters)
    offset = 0
    for stage in range(stages):
        block = blocks[stage]  # ranks 0 … S−1 are replica 0, in stage order
        assert torch.equal(state["parameters"][offset : offset + block.numel()], block)
        for replica in range(1, replicas):
            assert torch.equal(blocks[replica * stages + stage], block)
        offset += block.numel()
    assert offset == state["parameters"].numel()


@pytest.mark.mpi(min_size=2)
def test_apts_ip_resume_with_another_layout_is_refused_on_every_rank(tmp_path: Path) -> None:
    comm = Communicator()
    if comm.size % 2:
        pytest.skip("another layout at the same rank count needs an even number of ranks")
    directory = _shared_dir(comm, tmp_path)
    ckpt = str(directory / "layout.ckpt")
    _train(comm, directory, 2, max_steps=2, checkpoint=ckpt)
    stages = comm.size // 2
    with pytest.raises(
        ConfigError,
        match=rf"pipeline of {stages} stages x 2 replicas .*; this run has {comm.size} stages x 1 replicas .*"
        r"Resume with --set replicas=2",
    ):
        _train(comm, directory, 1, max_steps=4, resume=ckpt)
    comm.barrier()  # every rank raised before any collective of training: still in step


def test_pipeline_checkpoint_on_another_rank_count_names_the_layout() -> None:
    layout: dict[str, object] = {"stages": 2, "replicas": 2, "stage_bounds": [0, 3, 5]}
    state = {"world_size": 4, "compat": {"seed": 0}, "pipeline": layout}
    with pytest.raises(
        ConfigError, match=r"written by 4 ranks; this run has 2\. Resume with mpiexec -n 4 --set replicas=2"
    ):
        checkpoint.check_resumable(state, "run.ckpt", {"seed": 0}, world_size=2, layout={})
    other_cuts = {"stages": 2, "replicas": 2, "stage_bounds": [0, 2, 5]}
    with pytest.raises(ConfigError, match=r"layer cuts \[0, 3, 5\]\); this run has 2 stages x 2 replicas"):
        checkpoint.check_resumable(state, "run.ckpt", {"seed": 0}, world_size=4, layout=other_cuts)
    # The same layout passes the layout check and reaches the options.
    with pytest.raises(ConfigError, match="written with seed=0; this run has seed=1"):
        checkpoint.check_resumable(state, "run.ckpt", {"seed": 1}, world_size=4, layout=dict(layout))
