"""APTS-IP on PINNs: Taylor-mode jets through the pipeline stages.

The jets themselves are checked in float64 against autograd derivatives; the
pipelined PINN loss and gradient at 1 / 2 / 4 stages (``mpiexec -n 1/2/4``) against
the single-process ``problem.forward``; and a few APTS-IP steps must lower the loss.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from hpcopt.comm import Communicator
from hpcopt.distributed.pipeline import JetPayload
from hpcopt.errors import ConfigError
from hpcopt.numerics.jets import apply_to_jet, input_jet, scalar_jet
from hpcopt.optimizers import APTSIP, make_config
from hpcopt.problems import make_problem
from hpcopt.problems.base import Dataset, JetProblem, Net, Problem
from hpcopt.problems.pinn.allen_cahn import AllenCahnProblem, AllenCahnTimeProblem
from hpcopt.problems.pinn.poisson import PoissonProblem
from hpcopt.problems.synthetic import QuadraticProblem
from tests.conftest import gradient

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

# Small collocation sets: the checks are of exactness, not of accuracy.
_OPTIONS: dict[str, dict[str, object]] = {
    "poisson1d": {"interior": 24, "boundary": 2, "val_grid": 33},
    "poisson2d": {"interior": 40, "boundary": 16, "val_grid": 9},
    "allen-cahn": {"interior": 40, "boundary": 2, "val_grid": 33},
    "allen-cahn-time": {"interior": 40, "boundary": 8, "initial": 8, "val_grid": 5},
}


def _derivatives(net: Callable[[Tensor], Tensor], points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``u``, ``∂_i u``, ``∂_i² u`` of a scalar ``net`` by reverse-mode autograd, shapes (n,), (n, d), (n, d)."""
    at = points.clone().requires_grad_()
    value = net(at).squeeze(-1)
    first = torch.autograd.grad(value.sum(), at, create_graph=True)[0]
    second = torch.stack(
        [torch.autograd.grad(first[:, i].sum(), at, create_graph=True)[0][:, i] for i in range(points.shape[1])],
        dim=1,
    )
    return value.detach(), first.detach(), second


def _stages() -> tuple[nn.Sequential, nn.Sequential]:
    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)
    ).double()
    first, second = net[:2], net[2:]
    assert isinstance(first, nn.Sequential) and isinstance(second, nn.Sequential)
    return first, second


def test_jet_of_the_identity_is_the_points_and_the_unit_vectors() -> None:
    points = torch.rand(4, 3, dtype=torch.float64)
    jet = input_jet(points)
    assert jet.shape == (4, 7, 3)
    assert torch.equal(jet[:, 0], points)
    assert torch.equal(jet[:, 1:4], torch.eye(3, dtype=torch.float64).expand(4, 3, 3))
    assert not jet[:, 4:].any()


def test_jet_of_a_stage_equals_autograd_derivatives_in_float64() -> None:
    first_stage, second_stage = _stages()
    points = torch.rand(6, 3, dtype=torch.float64)
    # The second stage receives a jet with nonzero second derivatives (the first stage's):
    # composing the stages' jets must give the whole network's derivatives.
    inner = apply_to_jet(first_stage, input_jet(points))
    assert inner.shape == (6, 7, 7) and inner[:, 4:].abs().max() > 1e-3
    for unit in range(7):

        def column(x: Tensor, unit: int = unit) -> Tensor:
            return first_stage(x)[:, unit : unit + 1]

        value, first, second = _derivatives(column, points)
        assert torch.allclose(inner[:, 0, unit], value, rtol=1e-12, atol=1e-13)
        assert torch.allclose(inner[:, 1:4, unit], first, rtol=1e-12, atol=1e-13)
        assert torch.allclose(inner[:, 4:, unit], second, rtol=1e-12, atol=1e-13)

    jet = scalar_jet(apply_to_jet(second_stage, inner))
    value, first, second = _derivatives(nn.Sequential(*first_stage, *second_stage), points)
    assert torch.allclose(jet.value, value, rtol=1e-12, atol=1e-13)
    assert torch.allclose(jet.first, first, rtol=1e-12, atol=1e-13)
    assert torch.allclose(jet.second, second, rtol=1e-12, atol=1e-13)


def test_jet_backward_gives_the_parameter_gradient_of_the_laplacian() -> None:
    first_stage, second_stage = _stages()
    points = torch.rand(6, 3, dtype=torch.float64)
    whole = nn.Sequential(*first_stage, *second_stage)
    parameters = list(whole.parameters())[:-1]  # the last bias does not enter ∂u
    jet = scalar_jet(apply_to_jet(second_stage, apply_to_jet(first_stage, input_jet(points))))
    through_jets = torch.autograd.grad((jet.second.sum(dim=1) ** 2).mean(), parameters)
    _, _, second = _derivatives(whole, points)
    reference = torch.autograd.grad((second.sum(dim=1) ** 2).mean(), parameters)
    for got, expected in zip(through_jets, reference, strict=True):
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["poisson1d", "poisson2d", "poisson3d", "allen-cahn", "allen-cahn-time"])
def test_outputs_from_the_jet_equal_the_problem_forward(name: str) -> None:
    options = dict(_OPTIONS.get(name, {"interior": 20, "boundary": 12, "val_grid": 3}))
    problem = make_problem(name, options=options)
    assert isinstance(problem, JetProblem)
    torch.manual_seed(0)
    model = problem.build_model()
    inputs = problem.train.inputs
    payload = JetPayload(problem)
    outputs = payload.decode(payload.apply(model, payload.encode(inputs)), inputs)
    expected = problem.forward(model, inputs)
    assert bool((inputs[:, -1] < 0.5).any() and (inputs[:, -1] > 0.5).any())  # both kinds of row
    assert torch.allclose(outputs, expected, rtol=1e-5, atol=1e-5)


def _reference(problem: Problem, batch: Dataset) -> tuple[float, nn.Sequential]:
    torch.manual_seed(0)
    model = problem.build_model()
    loss = problem.criterion(problem.forward(model, batch.inputs), batch.targets)
    loss.backward()
    assert isinstance(model, nn.Sequential)
    return float(loss), model


def _layers_with_parameters(model: nn.Sequential) -> int:
    return sum(1 for layer in model if any(True for _ in layer.parameters()))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("name", ["poisson2d", "allen-cahn", "allen-cahn-time"])
@pytest.mark.parametrize("micro_batches", [1, 3])
def test_pipelined_pinn_loss_and_gradient_equal_the_single_process_problem(name: str, micro_batches: int) -> None:
    comm = Communicator()
    problem = make_problem(name, options=dict(_OPTIONS[name]))
    batch = problem.train
    loss, reference = _reference(problem, batch)
    if _layers_with_parameters(reference) < comm.size:
        pytest.skip(f"{name}'s model has too few layers with parameters for {comm.size} stages")
    torch.manual_seed(0)
    config = make_config("apts-ip", {"micro_batches": micro_batches})
    optimizer = APTSIP.build(problem, problem.build_model(), comm, config)
    pipeline = optimizer.pipeline
    assert isinstance(pipeline.payload, JetPayload)
    assert pipeline.stages == comm.size
    optimizer.objective.set_batch(batch.inputs, batch.targets, len(batch), 0)
    loss_part, grad = optimizer.objective.value_and_grad()
    assert comm.allreduce_scalars([loss_part])[0] == pytest.approx(loss, rel=1e-5)
    start, end = pipeline.bounds[comm.rank], pipeline.bounds[comm.rank + 1]
    expected = torch.cat([gradient(p).flatten() for p in reference[start:end].parameters()])
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-6)
    # Every stage's cached input is a jet, 1 + 2d rows per point, not an activation.
    assert pipeline.stage_inputs is not None
    assert isinstance(problem, (PoissonProblem, AllenCahnProblem, AllenCahnTimeProblem))
    assert pipeline.stage_inputs.shape[:2] == (len(batch), 1 + 2 * problem.dim)
    # The trial value (value-only pass) is the same loss.
    assert optimizer.objective.value() == pytest.approx(loss, rel=1e-5)
    # Validation goes through the plain pipeline on value rows and matches the whole model.
    metrics = optimizer.evaluate(problem)
    whole = problem.eval_metrics(problem.eval_sums(reference, problem.val))
    assert metrics["val_rel_l2_error"] == pytest.approx(whole["val_rel_l2_error"], rel=1e-5)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("name", ["poisson1d", "poisson2d"])
def test_apts_ip_lowers_a_pinn_loss_and_every_rank_decides_alike(name: str) -> None:
    comm = Communicator()
    problem = make_problem(name, options=dict(_OPTIONS[name]))
    torch.manual_seed(0)
    optimizer = APTSIP.build(problem, problem.build_model(), comm, make_config("apts-ip", {"radius": 0.05}))
    batch = problem.train
    optimizer.objective.set_batch(batch.inputs, batch.targets, len(batch), 0)
    results = [optimizer.step() for _ in range(4)]
    decisions = comm.allgather_object([(r.accepted, repr(r.ratio), r.radius, r.loss) for r in results])
    assert all(d == decisions[0] for d in decisions)
    assert any(r.accepted for r in results)
    assert optimizer.objective.value() < results[0].loss


class _ScaledQuadratic(QuadraticProblem):
    """A problem whose forward transforms the network's output and that offers no jet."""

    def forward(self, net: Net, inputs: Tensor) -> Tensor:
        return 2.0 * super().forward(net, inputs)


def test_apts_ip_still_rejects_transformed_outputs_without_a_jet() -> None:
    comm = Communicator()
    problem = _ScaledQuadratic(options={"n": 8, "n_val": 4, "dim": 3})
    assert not isinstance(problem, JetProblem)
    with pytest.raises(ConfigError, match="offers no jet"):
        APTSIP.build(problem, problem.build_model(), comm, make_config("apts-ip", {}))
