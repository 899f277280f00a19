"""``J v`` through a recorded chain of layers (hpcopt.numerics.layer_jvp) against ``torch.func.jvp``.

Each supported layer appears in at least one model below; the reference is forward
mode of the whole model in float64.  Forwards that are not chains must be refused,
so that the Gauss–Newton operator keeps its generic product for them.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from hpcopt.numerics.curvature import CurvatureKind, LocalObjective
from hpcopt.numerics.flat import FlatParameters
from hpcopt.numerics.layer_jvp import record_chain

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def conv2d_chain() -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=1, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False),
        nn.Sigmoid(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4, 6),
        nn.Tanh(),
        nn.Linear(6, 3, bias=False),
    ), (2, 9, 9)


def conv1d_chain() -> tuple[nn.Module, tuple[int, ...]]:
    model = nn.Sequential(
        nn.Conv1d(3, 5, 3),
        nn.Tanh(),
        nn.MaxPool1d(2),
        nn.Conv1d(5, 4, 2, stride=2),
        nn.AvgPool1d(2),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Identity(),
        nn.Linear(4, 4),
    )
    model.eval()  # dropout inactive: a chain layer
    return model, (3, 14)


def frozen_first_layer() -> tuple[nn.Module, tuple[int, ...]]:
    first = nn.Linear(5, 7)
    first.weight.requires_grad_(False)  # a constant of the chain; its bias is still trained
    return nn.Sequential(first, nn.ReLU(), nn.Linear(7, 3)), (5,)


def sequence_mlp() -> tuple[nn.Module, tuple[int, ...]]:
    # Linear layers on (batch, length, features): the bias runs along the last dimension.
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.0), nn.Linear(6, 4), nn.Flatten()), (5, 3)


CHAINS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    "conv2d": conv2d_chain,
    "conv1d": conv1d_chain,
    "frozen": frozen_first_layer,
    "sequence": sequence_mlp,
}


def forward_jvp(flat: FlatParameters, inputs: Tensor, v: Tensor) -> Tensor:
    def outputs_of(theta: Tensor) -> Tensor:
        return flat.functional(theta)(inputs)

    return torch.func.jvp(outputs_of, (flat.data.detach(),), (v,))[1]


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_chain_jvp_matches_forward_mode(name: str) -> None:
    torch.manual_seed(0)
    model, shape = CHAINS[name]()
    flat = FlatParameters(model.double())
    inputs = torch.randn(5, *shape, dtype=torch.float64)
    outputs, chain = record_chain(flat, lambda: flat.functional(flat.data.detach())(inputs))
    assert chain is not None
    assert torch.equal(outputs, model(inputs))
    for seed in range(3):
        v = torch.randn(flat.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        reference = forward_jvp(flat, inputs, v)
        assert float((chain.jvp(v) - reference).norm() / reference.norm()) < 1e-12


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(torch.tanh(self.layer(x)))


class FunctionalBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(torch.relu(self.first(x)))  # torch.relu is not a module the hooks see


class ScaledInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))  # a trained parameter outside every layer
        self.layers = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x * self.scale)


def tied() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    return model


NOT_CHAINS: dict[str, Callable[[], nn.Module]] = {
    "batch norm in training": lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
    "active dropout": lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)),
    "a layer called twice": Twice,
    "a functional op between layers": FunctionalBetween,
    "weights shared by two layers": tied,
    "a parameter outside the layers": ScaledInput,
    "reflect padding": lambda: nn.Sequential(nn.Conv1d(4, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten()),
    "an unsupported layer": lambda: nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)),
}


@pytest.mark.parametrize("name", sorted(NOT_CHAINS))
def test_forwards_that_are_not_chains_are_refused(name: str) -> None:
    torch.manual_seed(0)
    flat = FlatParameters(NOT_CHAINS[name]())
    inputs = torch.randn(6, 4, 3) if "padding" in name else torch.randn(6, 4)
    outputs, chain = record_chain(flat, lambda: flat.functional(flat.data.detach())(inputs))
    assert chain is None
    assert outputs.shape[0] == 6


def test_outputs_transformed_after_the_model_are_refused() -> None:
    flat = FlatParameters(nn.Sequential(nn.Linear(3, 2)))
    inputs = torch.randn(4, 3)
    _, chain = record_chain(flat, lambda: 2.0 * flat.functional(flat.data.detach())(inputs))
    assert chain is None


def test_forward_that_differentiates_its_inputs_is_refused() -> None:
    # A PINN's forward: the residual needs ∂u/∂x, so its outputs are not the last layer's.
    flat = FlatParameters(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)))
    points = torch.randn(5, 2, requires_grad=True)

    def residual() -> Tensor:
        u = flat.functional(flat.data)(points)
        (du,) = torch.autograd.grad(u.sum(), points, create_graph=True)
        return du.sum(dim=1, keepdim=True) - u

    _, chain = record_chain(flat, residual)
    assert chain is None


@pytest.mark.parametrize("name", ["conv2d", "conv1d"])
def test_gauss_newton_with_the_chain_equals_the_generic_operator(name: str) -> None:
    torch.manual_seed(1)
    model, shape = CHAINS[name]()
    flat = FlatParameters(model.double())
    inputs = torch.randn(7, *shape, dtype=torch.float64)
    targets = torch.randint(0, 3 if name == "conv2d" else 4, (7,))
    objective = LocalObjective(flat, lambda net, x: net(x), nn.functional.cross_entropy, inputs, targets)
    vectors = [torch.randn(flat.numel, dtype=torch.float64) for _ in range(3)]
    results = {}
    for chain in (True, False):
        objective.layer_chain = chain
        loss, grad, operator = objective.value_grad_and_curvature(CurvatureKind.GGN)
        results[chain] = (
            loss,
            grad.clone(),
            torch.stack([operator(v) for v in vectors]),
            operator.quadratic_form(vectors[0]),
            objective.gram(CurvatureKind.GGN, vectors),
            objective.curvature(CurvatureKind.GGN)(vectors[1]),
        )
    fast, generic = results[True], results[False]
    assert fast[0] == generic[0]
    assert torch.allclose(fast[1], generic[1], rtol=1e-12, atol=1e-15)
    assert torch.allclose(fast[2], generic[2], rtol=1e-10, atol=1e-13)
    assert fast[3] == pytest.approx(generic[3], rel=1e-10)
    assert torch.allclose(fast[4], generic[4], rtol=1e-10, atol=1e-13)
    assert torch.allclose(fast[5], generic[5], rtol=1e-10, atol=1e-13)
