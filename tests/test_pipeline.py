"""The pipeline of APTS-IP: stages, pipelined forward/backward, memory, and the optimizer's agreement.

At 1 rank (serial pass) the pipeline has one stage; under ``mpiexec -n 2`` / ``-n 4``
it has 2 / 4 stages and must reproduce the single-process loss and gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hpcopt.comm import Communicator
from hpcopt.errors import ConfigError
from hpcopt.optimizers import APTSIP, make_config
from hpcopt.pipeline import Pipeline, stage_bounds
from hpcopt.problems import make_problem

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _one_thread():
    # One thread per rank: on a loaded machine torch's thread pool makes tiny ops 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    expected = torch.cat([p.grad.flatten() for p in reference[start:end].parameters()])
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


def _tiny_lm(tmp_path, comm: Communicator):
    path = tmp_path / f"input{comm.rank}.txt"
    path.write_text("to be or not to be, that is the question. " * 40)
    options = {"context": 16, "train_windows": 12, "val_windows": 4, "embed": 16, "heads": 2, "layers": 3}
    return make_problem("tinyshakespeare", data_dir=str(path), options=options)


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
    assert all(optimizer.run_attributes()["apts_ip_parameter_bytes"])


def test_apts_ip_rejects_pinns() -> None:
    comm = Communicator()
    problem = make_problem("poisson1d", options={"interior": 8})
    with pytest.raises(ConfigError, match="forward"):
        APTSIP.build(problem, problem.build_model(), comm, make_config("apts-ip", {}))
