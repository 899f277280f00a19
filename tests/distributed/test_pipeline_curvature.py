"""The whole network's Gauss–Newton product through a pipeline, and APTS-IP's global passes.

Under ``mpiexec -n 1/2/4`` the pipeline has 1/2/4 stages (or, with ``replicas=2``,
1 or 2 stages × 2 replicas); every stage's block of the pipelined product must equal
the same block of the single-process Gauss–Newton product of the whole model, in
float64, for plain activations and for a PINN's jets, with one or several
micro-batches.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from hpcopt.comm import Communicator
from hpcopt.distributed.pipeline import Pipeline
from hpcopt.distributed.pipeline_curvature import PipelineGaussNewton, gauss_newton_matvec, pipeline_dot
from hpcopt.distributed.sharding import contiguous_slice
from hpcopt.errors import ConfigError
from hpcopt.numerics.curvature import Criterion, Forward, LocalObjective
from hpcopt.numerics.flat import FlatParameters
from hpcopt.optimizers import APTSIP, make_config
from hpcopt.problems import make_problem
from hpcopt.problems.base import Dataset, Problem

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

_POISSON = {"interior": 40, "boundary": 16, "val_grid": 9}


def _model() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    ).double()


def _reference_product(
    model: nn.Module, forward: Forward, criterion: Criterion, inputs: Tensor, targets: Tensor, v: Tensor
) -> Tensor:
    """The single-process Gauss–Newton product of the whole model (hpcopt.numerics.curvature)."""
    local = LocalObjective(FlatParameters(model), forward, criterion, inputs, targets)
    return local.curvature("ggn")(v)


def _direction(numel: int) -> Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("micro_batches", [1, 3])
def test_pipelined_product_equals_the_whole_models_gauss_newton_product(micro_batches: int) -> None:
    comm = Communicator()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(23, 5, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 3, (23,), generator=generator)
    criterion = nn.functional.cross_entropy
    reference = _model()
    v = _direction(sum(p.numel() for p in reference.parameters()))
    expected = _reference_product(reference, lambda net, x: net(x), criterion, inputs, targets, v)

    pipeline = Pipeline(_model(), comm, micro_batches)
    operator = PipelineGaussNewton(pipeline, inputs, targets, criterion)
    block = pipeline.model_slice
    product = operator(v[block])
    assert product.shape == (pipeline.flat.numel,)
    assert torch.allclose(product, expected[block], rtol=1e-10, atol=1e-13)
    # Linear in v, and the operator stays linearised at its θ when the parameters move.
    pipeline.flat.copy_(pipeline.flat.data + 0.5)
    assert torch.allclose(operator(2.0 * v[block]), 2.0 * expected[block], rtol=1e-10, atol=1e-13)
    # The pipeline's inner product is the whole vectors' one, on every stage.
    assert pipeline_dot(pipeline)(v[block], product) == pytest.approx(float(v @ expected), rel=1e-12)


def _poisson() -> tuple[Problem, nn.Module, Dataset]:
    problem = make_problem("poisson2d", options=dict(_POISSON))
    torch.manual_seed(0)
    model = problem.build_model().double()
    data = problem.train
    return problem, model, Dataset(data.inputs.double(), data.targets.double())


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("replicas", [1, 2])
def test_pipelined_product_through_pinn_jets_equals_the_single_process_product(replicas: int) -> None:
    comm = Communicator()
    if comm.size % replicas:
        pytest.skip(f"{comm.size} ranks do not form {replicas} replicas")
    problem, reference, data = _poisson()
    v = _direction(sum(p.numel() for p in reference.parameters()))
    expected = _reference_product(reference, problem.forward, problem.criterion, data.inputs, data.targets, v)

    _, model, _ = _poisson()
    config = make_config("apts-ip", {"replicas": replicas, "micro_batches": 2})
    optimizer = APTSIP.build(problem, model, comm, config)
    shard, shards = APTSIP.data_shard(config, comm.rank, comm.size, len(data))
    rows = contiguous_slice(len(data), shard, shards)
    optimizer.objective.set_batch(data.inputs[rows], data.targets[rows], len(data), 0)
    matvec = gauss_newton_matvec(optimizer.objective)
    block = optimizer.pipeline.model_slice
    product = matvec(v[block])
    assert float(expected[block].norm()) > 1e-3  # the check is not of zeros
    assert torch.allclose(product, expected[block], rtol=1e-9, atol=1e-12)


@pytest.mark.mpi(min_size=1)
def test_global_passes_lower_a_pinn_loss_further_and_every_rank_decides_alike() -> None:
    comm = Communicator()
    problem = make_problem("poisson2d", options=dict(_POISSON))
    batch = problem.train
    losses = {}
    for passes in (0, 2):
        torch.manual_seed(0)
        config = make_config("apts-ip", {"global_passes": passes, "max_cg_iterations": 50, "radius": 0.5})
        optimizer = APTSIP.build(problem, problem.build_model(), comm, config)
        optimizer.objective.set_batch(batch.inputs, batch.targets, len(batch), 0)
        results = [optimizer.step() for _ in range(4)]
        seen = comm.allgather_object(
            [(r.accepted, r.radius, r.loss, r.extras["global_accepted"]) for r in results] + [optimizer.radius]
        )
        assert all(s == seen[0] for s in seen)
        losses[passes] = optimizer.objective.value()
        if passes:
            assert sum(int(r.extras["global_accepted"]) for r in results) >= 4
    # Four outer iterations with Gauss–Newton passes end far below four first-order ones.
    assert losses[2] < 0.5 * losses[0]


def test_global_passes_must_not_be_negative() -> None:
    with pytest.raises(ConfigError, match="global_passes must be >= 0"):
        make_config("apts-ip", {"global_passes": -1})


@pytest.mark.mpi(min_size=1)
def test_building_the_operator_leaves_batch_norm_statistics_alone() -> None:
    comm = Communicator()
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)
    ).double()
    if comm.size > 3:
        pytest.skip("three layers with parameters: at most three stages")
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(16, 5, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 3, (16,), generator=generator)
    pipeline = Pipeline(model, comm, 2)
    before = {name: buffer.clone() for name, buffer in pipeline.module.named_buffers()}
    operator = PipelineGaussNewton(pipeline, inputs, targets, nn.functional.cross_entropy)
    product = operator(_direction(pipeline.flat.numel))
    assert torch.isfinite(product).all() and float(product.norm()) > 0
    for name, buffer in pipeline.module.named_buffers():
        assert torch.equal(buffer, before[name]), name
