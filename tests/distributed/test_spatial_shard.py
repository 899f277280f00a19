"""``--set shard=spatial``: APTS-D on a PINN with each rank owning an interval of x."""

from __future__ import annotations

import itertools

import pytest
import torch

from hpcopt.comm import Communicator
from hpcopt.distributed.sharding import GlobalBatches
from hpcopt.errors import ConfigError
from hpcopt.problems import make_problem
from hpcopt.problems.pinn.poisson import PoissonProblem
from hpcopt.training.trainer import TrainConfig, train

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_spatial_shards_are_disjoint_intervals_of_the_same_global_batch(world: int) -> None:
    key = torch.rand(120, generator=torch.Generator().manual_seed(1))
    plain = list(GlobalBatches(120, 60, seed=2, rank=0, world_size=1).epoch(0))
    shards = [list(GlobalBatches(120, 60, 2, rank, world, sort_key=key).epoch(0)) for rank in range(world)]
    for step, batch in enumerate(plain):
        parts = [shards[rank][step] for rank in range(world)]
        # The same global batch (so the same global objective), only split differently ...
        assert sorted(torch.cat(parts).tolist()) == sorted(batch.tolist())
        # ... into intervals of the key: every rank's points lie left of the next rank's.
        for left, right in itertools.pairwise(parts):
            assert float(key[left].max()) <= float(key[right].min())


def test_sort_key_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(ConfigError, match="one value per sample"):
        GlobalBatches(10, 5, 0, 0, 1, sort_key=torch.zeros(9))


def _run(shard: str, comm: Communicator):
    cfg = TrainConfig(problem="poisson1d", optimizer="apts-d", epochs=6, quiet=True, seed=3)
    # 62 interior + 2 boundary points: 64 rows, divisible by 1, 2 and 4 ranks.
    return train(cfg, {"shard": shard}, {"interior": 62}, comm=comm)


@pytest.mark.mpi(min_size=1)
def test_apts_d_with_spatial_shards_trains_and_every_rank_agrees() -> None:
    comm = Communicator()
    result = _run("spatial", comm)
    assert result.losses[-1] < result.losses[0]
    # Every decision came from allreduced values: the ranks hold the same parameters.
    gathered = comm.allgatherv(result.parameters, [result.parameters.numel()] * comm.size)
    for rank in range(comm.size):
        chunk = gathered[rank * result.parameters.numel() : (rank + 1) * result.parameters.numel()]
        assert torch.equal(chunk, result.parameters)
    if comm.size > 1:
        # A different split of the same batches is a different algorithm (local models differ).
        assert _run("batch", comm).losses != result.losses


def test_spatial_sharding_of_a_problem_without_coordinates_is_a_clear_error() -> None:
    cfg = TrainConfig(problem="logistic", optimizer="apts-d", epochs=1, quiet=True)
    with pytest.raises(ConfigError, match="shard=spatial needs a PINN problem"):
        train(cfg, {"shard": "spatial"}, {"n": 40}, comm=Communicator())


def test_unknown_shard_is_a_clear_error() -> None:
    cfg = TrainConfig(problem="poisson1d", optimizer="apts-d", epochs=1, quiet=True)
    with pytest.raises(ConfigError, match="shard must be batch or spatial"):
        train(cfg, {"shard": "diagonal"}, {}, comm=Communicator())


def test_the_spatial_key_is_the_first_coordinate_of_the_collocation_points() -> None:
    problem = make_problem("poisson2d", data_dir=None, seed=0, options={"interior": 32, "boundary": 16})
    assert isinstance(problem, PoissonProblem)
    points = problem.jet_points(problem.train.inputs)
    assert points.shape[1] == 2 and torch.equal(points[:, 0], problem.train.inputs[:, 0])
