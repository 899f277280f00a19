"""The pipeline of APTS-IP: stages, pipelined forward/backward, memory, and the optimizer's agreement.

At 1 rank (serial pass) the pipeline has one stage; under ``mpiexec -n 2`` / ``-n 4``
it has 2 / 4 stages and must reproduce the single-process loss and gradient.  With
``replicas=2`` (data parallelism on top) the layout is 1 stage × 2 replicas at 2 ranks
and 2 stages × 2 replicas at 4; the tests that need two stages skip below 4 ranks.
"""

from __future__ import annotations

import h5py
import pytest
import torch
from torch import nn

from hpcopt.comm import Communicator
from hpcopt.distributed.pipeline import Pipeline, PipelineLayout, stage_bounds
from hpcopt.distributed.sharding import contiguous_slice
from hpcopt.errors import ConfigError
from hpcopt.numerics.trust_region.subproblem import LSR1Solver, SteihaugSolver
from hpcopt.optimizers import APTSIP, make_config
from hpcopt.problems import make_problem
from hpcopt.training.trainer import TrainConfig, train
from tests.conftest import gradient

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_thread")]


def _model() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )


def _data(rows: int = 23) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(rows, 5, generator=generator), torch.randint(0, 3, (rows,), generator=generator)


def test_stage_bounds_balance_parameters_and_keep_activations_with_their_layer() -> None:
    model = _model()
    assert stage_bounds(model, 1) == [0, 7]
    assert stage_bounds(model, 2) == [0, 4, 7]  # 96 + 272 | 272 + 51 parameters
    assert stage_bounds(model, 4) == [0, 2, 4, 6, 7]
    with pytest.raises(ConfigError, match="too few"):
        stage_bounds(model, 5)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("micro_batches", [1, 4])
def test_pipelined_loss_and_gradient_equal_the_single_process_model(micro_batches: int) -> None:
    comm = Communicator()
    inputs, targets = _data()
    reference = _model()
    loss = nn.functional.cross_entropy(reference(inputs), targets)
    loss.backward()
    pipeline = Pipeline(_model(), comm, micro_batches)
    pipelined = pipeline.run(inputs, targets, nn.functional.cross_entropy, backward=True)
    total = comm.allreduce_scalars([pipelined])[0]
    assert total == pytest.approx(float(loss), rel=1e-6)
    start, end = pipeline.bounds[comm.rank], pipeline.bounds[comm.rank + 1]
    expected = torch.cat([gradient(p).flatten() for p in reference[start:end].parameters()])
    assert torch.allclose(pipeline.flat.grad, expected, rtol=1e-5, atol=1e-7)
    # Value-only pass: the same loss, and the gradient is left alone.
    assert comm.allreduce_scalars([pipeline.run(inputs, targets, nn.functional.cross_entropy, backward=False)])[
        0
    ] == pytest.approx(float(loss), rel=1e-6)
    assert torch.allclose(pipeline.flat.grad, expected, rtol=1e-5, atol=1e-7)
    # Evaluation outputs arrive on every rank.
    assert torch.allclose(pipeline.outputs(inputs), reference(inputs).detach(), rtol=1e-5, atol=1e-6)
    assert comm.stats.ops["send"].calls > 0 if comm.size > 1 else True


@pytest.mark.mpi(min_size=1)
def test_each_rank_holds_only_its_stage_parameters() -> None:
    comm = Communicator()
    full = _model()
    pipeline = Pipeline(_model(), comm)
    start, end = pipeline.bounds[comm.rank], pipeline.bounds[comm.rank + 1]
    stage_bytes = sum(p.numel() * p.element_size() for p in full[start:end].parameters())
    assert pipeline.parameter_bytes == stage_bytes == pipeline.flat.numel * 4
    assert len(pipeline.module) == end - start
    sizes = comm.allgather_object(pipeline.parameter_bytes)
    assert sum(sizes) == pipeline.model_parameter_bytes
    if comm.size > 1:
        assert max(sizes) < pipeline.model_parameter_bytes


_LM_OPTIONS = {"context": 16, "train_windows": 12, "val_windows": 4, "embed": 16, "heads": 2, "layers": 3}


def _lm_text(tmp_path, comm: Communicator) -> str:
    path = tmp_path / f"input{comm.rank}.txt"
    path.write_text("to be or not to be, that is the question. " * 40)
    return str(path)


def _tiny_lm(tmp_path, comm: Communicator):
    return make_problem("tinyshakespeare", data_dir=_lm_text(tmp_path, comm), options=dict(_LM_OPTIONS))


@pytest.mark.mpi(min_size=1)
def test_transformer_pipeline_matches_the_whole_model(tmp_path) -> None:
    comm = Communicator()
    problem = _tiny_lm(tmp_path, comm)
    torch.manual_seed(0)
    reference = problem.build_model()
    batch = problem.train
    loss = problem.criterion(reference(batch.inputs), batch.targets)
    torch.manual_seed(0)
    optimizer = APTSIP.build(problem, problem.build_model(), comm, make_config("apts-ip", {"micro_batches": 3}))
    pipelined = optimizer.pipeline.run(batch.inputs, batch.targets, problem.criterion, backward=False)
    assert comm.allreduce_scalars([pipelined])[0] == pytest.approx(float(loss), rel=1e-5)
    metrics = optimizer.evaluate(problem)
    assert metrics["val_loss"] == pytest.approx(
        problem.eval_metrics(problem.eval_sums(reference, problem.val))["val_loss"]
    )


@pytest.mark.mpi(min_size=1)
def test_apts_ip_decisions_agree_and_the_loss_decreases(tmp_path) -> None:
    comm = Communicator()
    problem = _tiny_lm(tmp_path, comm)
    torch.manual_seed(0)
    optimizer = APTSIP.build(problem, problem.build_model(), comm, make_config("apts-ip", {"radius": 0.05}))
    optimizer.objective.set_batch(problem.train.inputs, problem.train.targets, len(problem.train), 0)
    losses = []
    for _ in range(5):
        result = optimizer.step()
        losses.append(result.loss)
        decisions = comm.allgather_object((result.accepted, repr(result.ratio), result.radius, result.loss))
        assert all(d == decisions[0] for d in decisions)
    assert losses[-1] < losses[0]
    parameter_bytes = optimizer.run_attributes()["apts_ip_parameter_bytes"]
    assert isinstance(parameter_bytes, list) and all(parameter_bytes)


# -- data parallelism on top: stages × replicas ---------------------------------------


def test_layout_maps_ranks_to_stages_and_replicas_and_rejects_uneven_layouts() -> None:
    layout = PipelineLayout(6, 2)
    assert layout.stages == 3
    # Replica r is the block of consecutive ranks [3r, 3r + 3).
    assert layout.assignment() == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert all(layout.rank_of(layout.stage_of(p), layout.replica_of(p)) == p for p in range(6))
    assert PipelineLayout(4, 1).assignment() == [(0, 0), (1, 0), (2, 0), (3, 0)]
    with pytest.raises(ConfigError, match="4 ranks cannot form replicas=3"):
        PipelineLayout(4, 3)
    with pytest.raises(ConfigError, match="replicas=8 exceeds the 4 ranks"):
        PipelineLayout(4, 8)
    with pytest.raises(ConfigError, match="replicas must be >= 1"):
        make_config("apts-ip", {"replicas": 0})


def test_more_replicas_than_ranks_fails_before_any_collective(tmp_path) -> None:
    comm = Communicator()
    problem = _tiny_lm(tmp_path, comm)
    with pytest.raises(ConfigError, match=f"replicas={comm.size + 1} exceeds"):
        APTSIP.build(problem, problem.build_model(), comm, make_config("apts-ip", {"replicas": comm.size + 1}))


def _two_replicas(comm: Communicator) -> None:
    if comm.size % 2:
        pytest.skip("two pipeline replicas need an even number of ranks")


@pytest.mark.mpi(min_size=2)
def test_replicated_pipeline_loss_and_gradient_equal_the_single_process_model(tmp_path) -> None:
    comm = Communicator()
    _two_replicas(comm)
    problem = _tiny_lm(tmp_path, comm)
    batch = problem.train.subset(slice(0, 11))  # odd: shards of 6 and 5 rows, weighted by size
    torch.manual_seed(0)
    reference = problem.build_model()
    loss = problem.criterion(reference(batch.inputs), batch.targets)
    loss.backward()
    torch.manual_seed(0)
    config = make_config("apts-ip", {"replicas": 2, "micro_batches": 2})
    optimizer = APTSIP.build(problem, problem.build_model(), comm, config)
    layout, pipeline = optimizer.layout, optimizer.pipeline
    assert (layout.stages, layout.replicas) == (comm.size // 2, 2)
    stage, replica = layout.stage_of(comm.rank), layout.replica_of(comm.rank)
    assert (pipeline.stage, pipeline.stages, optimizer.objective.replica_comm.rank) == (stage, layout.stages, replica)

    shard = batch.subset(contiguous_slice(len(batch), replica, 2))
    optimizer.objective.set_batch(shard.inputs, shard.targets, len(batch), 0)
    loss_part, grad = optimizer.objective.value_and_grad()
    assert pipeline.comm.allreduce_scalars([loss_part])[0] == pytest.approx(float(loss), rel=1e-5)
    start, end = pipeline.bounds[stage], pipeline.bounds[stage + 1]
    expected = torch.cat([p.grad.flatten() for p in reference[start:end].parameters()])
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-6)
    # This replica's own block (its shard only) is not the global one: the average does the work.
    assert not torch.allclose(optimizer.flat.grad, expected, rtol=1e-4, atol=1e-6)
    # The trial value (one scalar allreduce over the world) is the global loss too.
    assert optimizer.objective.value() == pytest.approx(float(loss), rel=1e-5)


@pytest.mark.mpi(min_size=2)
def test_shards_that_are_not_one_batch_are_refused_on_every_rank(tmp_path) -> None:
    comm = Communicator()
    _two_replicas(comm)
    problem = _tiny_lm(tmp_path, comm)
    optimizer = APTSIP.build(problem, problem.build_model(), comm, make_config("apts-ip", {"replicas": 2}))
    batch = problem.train
    # Every replica given the whole batch: the weights add up to 2, not 1.
    optimizer.objective.set_batch(batch.inputs, batch.targets, len(batch), 0)
    with pytest.raises(ValueError, match="add up to 2"):
        optimizer.objective.value_and_grad()
    comm.barrier()  # every rank raised after the same collectives: still in step


@pytest.mark.mpi(min_size=4)
def test_replicas_of_a_stage_keep_identical_parameters_and_every_rank_decides_alike(tmp_path) -> None:
    comm = Communicator()
    _two_replicas(comm)
    problem = _tiny_lm(tmp_path, comm)
    torch.manual_seed(0)
    config = make_config("apts-ip", {"replicas": 2, "radius": 0.05})
    optimizer = APTSIP.build(problem, problem.build_model(), comm, config)
    layout = optimizer.layout
    assert layout.stages >= 2
    initial = optimizer.flat.data.clone()
    shard = problem.train.subset(contiguous_slice(len(problem.train), layout.replica_of(comm.rank), 2))
    optimizer.objective.set_batch(shard.inputs, shard.targets, len(problem.train), 0)
    results = [optimizer.step() for _ in range(4)]

    decisions = comm.allgather_object([(r.accepted, repr(r.ratio), r.radius, r.loss, r.step_norm) for r in results])
    assert all(d == decisions[0] for d in decisions)
    assert any(r.accepted for r in results) and results[-1].loss < results[0].loss
    assert not torch.equal(optimizer.flat.data, initial)
    views = comm.allgather_object(optimizer.flat.data.clone())
    for rank, parameters in enumerate(views):
        twin = layout.rank_of(layout.stage_of(rank), 1 - layout.replica_of(rank))
        assert torch.equal(parameters, views[twin]), f"rank {rank} and its replica {twin} differ"
    assert results[0].extras["stages"] == layout.stages and results[0].extras["replicas"] == 2
    assert optimizer.run_attributes()["apts_ip_layout"] == [
        [p % layout.stages, p // layout.stages] for p in range(comm.size)
    ]


@pytest.mark.mpi(min_size=4)
def test_training_with_replicas_logs_the_layout_and_a_bad_layout_fails_on_every_rank(tmp_path) -> None:
    comm = Communicator()
    _two_replicas(comm)
    # One data file and log path for all ranks: the options (data_dir) must match across ranks.
    text, out = comm.bcast_object((_lm_text(tmp_path, comm), tmp_path / "run.h5") if comm.is_root else None)
    comm.barrier()
    cfg = TrainConfig(
        problem="tinyshakespeare", optimizer="apts-ip", data_dir=text, epochs=1, batch_size=6, max_steps=2, quiet=True
    )
    cfg.out = str(out)
    result = train(cfg, {"replicas": 2}, dict(_LM_OPTIONS), comm=comm)
    losses = comm.allgather_object(result.losses)
    assert all(item == losses[0] for item in losses) and len(losses[0]) == 2
    if comm.rank == 0:
        with h5py.File(out, "r") as handle:
            assert int(handle.attrs["apts_ip_replicas"]) == 2
            assert int(handle.attrs["apts_ip_stages"]) == comm.size // 2
            assert handle.attrs["apts_ip_layout"].tolist()[comm.size // 2] == [0, 1]

    bad = TrainConfig(problem="tinyshakespeare", optimizer="apts-ip", data_dir=text, max_steps=1, quiet=True)
    with pytest.raises(ConfigError, match=f"{comm.size} ranks cannot form replicas={comm.size - 1}"):
        train(bad, {"replicas": comm.size - 1}, dict(_LM_OPTIONS), comm=comm)
    with pytest.raises(ConfigError, match=f"{comm.size} ranks cannot form replicas={comm.size - 1}"):
        APTSIP.build(
            make_problem("tinyshakespeare", data_dir=text, options=dict(_LM_OPTIONS)),
            nn.Sequential(nn.Linear(2, 2)),
            comm,
            make_config("apts-ip", {"replicas": comm.size - 1}),
        )
    comm.barrier()  # raised before any collective of training: every rank is still in step


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("local_solver", ["steihaug", "lsr1"])
def test_cg_rtol_reaches_both_apts_ip_solvers(tmp_path, local_solver: str) -> None:
    comm = Communicator()
    problem = _tiny_lm(tmp_path, comm)
    config = make_config("apts-ip", {"cg_rtol": 0.2, "local_solver": local_solver})
    optimizer = APTSIP.build(problem, problem.build_model(), comm, config)
    solvers = (SteihaugSolver, LSR1Solver)
    assert isinstance(optimizer.local_solver, solvers) and isinstance(optimizer.global_solver, solvers)
    assert optimizer.local_solver.rtol == 0.2 and optimizer.global_solver.rtol == 0.2
