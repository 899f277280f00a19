"""Reference checks of hpcopt.numerics.curvature (docs/algorithms.md §7).

Every product is compared with an independent float64 reference: a central
finite difference of the gradient, an explicitly formed ``Jᵀ H_L J`` or
``torch.autograd.functional.hessian``.  The models are tiny stand-ins so each
test runs well under a second on one core.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from hpcopt.errors import ConfigError
from hpcopt.numerics.curvature import (
    DEFAULT_HESSIAN,
    Criterion,
    CurvatureKind,
    CurvatureOperator,
    LocalObjective,
    _ForwardOverReverseHVP,
    parse_curvature,
)
from hpcopt.numerics.flat import FlatParameters
from tests.conftest import gradient

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

ALL_KINDS = list(CurvatureKind)
HVP_KINDS = [CurvatureKind.HVP_REVERSE, CurvatureKind.HVP_FORWARD]
STORED_GRAPH_KINDS = [CurvatureKind.HVP_REVERSE, CurvatureKind.GGN]


def plain_forward(net: Callable[[Tensor], Tensor], inputs: Tensor) -> Tensor:
    return net(inputs)


class CountingForward:
    """A forward closure that counts how often the model is evaluated."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, net: Callable[[Tensor], Tensor], inputs: Tensor) -> Tensor:
        self.calls += 1
        return net(inputs)


def mlp_classifier(dtype: torch.dtype = torch.float32, act: type[nn.Module] = nn.Tanh) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 10), act(), nn.Linear(10, 8), act(), nn.Linear(8, 4)).to(dtype)


def small_cnn(dtype: torch.dtype = torch.float32) -> nn.Module:
    # 12x12 → conv5 → 8x8 → pool2 → 4x4, 4 channels → 64 features.
    return nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 5)).to(dtype)


def regression_mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, 2)).to(dtype)


def make_objective(
    name: str, dtype: torch.dtype = torch.float32, forward: Callable | None = None, seed: int = 0
) -> tuple[nn.Module, FlatParameters, LocalObjective]:
    """A model, its flat parameters and its objective on fixed random data."""
    torch.manual_seed(seed)
    criterion: Criterion
    if name == "mlp":
        model, inputs = mlp_classifier(dtype), torch.randn(16, 6, dtype=dtype)
        targets, criterion = torch.randint(0, 4, (16,)), nn.functional.cross_entropy
    elif name == "cnn":
        model, inputs = small_cnn(dtype), torch.randn(8, 1, 12, 12, dtype=dtype)
        targets, criterion = torch.randint(0, 5, (8,)), nn.functional.cross_entropy
    elif name == "regression":
        model, inputs = regression_mlp(dtype), torch.randn(20, 3, dtype=dtype)
        targets, criterion = torch.randn(20, 2, dtype=dtype), nn.functional.mse_loss
    else:
        raise ValueError(name)
    flat = FlatParameters(model)
    objective = LocalObjective(flat, forward or plain_forward, criterion, inputs, targets)
    return model, flat, objective


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def gradient_difference(flat: FlatParameters, objective: LocalObjective, v: Tensor, eps: float) -> Tensor:
    """``(∇f(θ+εv) − ∇f(θ−εv)) / 2ε``: the central difference of the gradient along ``v``."""
    with flat.displaced(eps * v):
        grad_plus = objective.value_and_grad()[1].clone()
    with flat.displaced(-eps * v):
        grad_minus = objective.value_and_grad()[1].clone()
    return (grad_plus - grad_minus) / (2 * eps)


# -- Hessian-vector products ---------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn", "regression"])
def test_reverse_and_forward_hvp_agree_in_float32(name: str) -> None:
    _, flat, objective = make_objective(name, torch.float32)
    reverse = objective.curvature(CurvatureKind.HVP_REVERSE)
    forward = objective.curvature(CurvatureKind.HVP_FORWARD)
    torch.manual_seed(1)
    for _ in range(3):
        v = torch.randn(flat.numel)
        hv_reverse, hv_forward = reverse(v), forward(v)
        assert hv_reverse.dtype == torch.float32 and hv_reverse.shape == v.shape
        assert hv_forward.dtype == torch.float32 and hv_forward.shape == v.shape
        assert rel_err(hv_forward, hv_reverse) < 1e-5


@pytest.mark.parametrize("name", ["mlp", "regression"])
@pytest.mark.parametrize("kind", HVP_KINDS)
def test_hvp_matches_central_difference_of_gradient(name: str, kind: CurvatureKind) -> None:
    _, flat, objective = make_objective(name, torch.float64)
    operator = objective.curvature(kind)
    torch.manual_seed(2)
    v = torch.randn(flat.numel, dtype=torch.float64)
    finite_difference = gradient_difference(flat, objective, v, eps=1e-4)
    assert rel_err(operator(v), finite_difference) < 1e-6


def test_hvp_on_cnn_matches_central_difference() -> None:
    # ReLU/max-pool are piecewise linear: a small step keeps every kink on one side.
    _, flat, objective = make_objective("cnn", torch.float64)
    operator = objective.curvature(CurvatureKind.HVP_REVERSE)
    torch.manual_seed(3)
    v = torch.randn(flat.numel, dtype=torch.float64)
    finite_difference = gradient_difference(flat, objective, v, eps=1e-6)
    assert rel_err(operator(v), finite_difference) < 1e-6


# -- Gauss–Newton ------------------------------------------------------------------


def explicit_ggn(objective: LocalObjective) -> Tensor:
    """``Jᵀ H_L J`` formed densely with torch.autograd.functional."""
    theta = objective.flat.clone()
    outputs = objective.forward(objective.flat.functional(theta), objective.inputs)

    def outputs_of(t: Tensor) -> Tensor:
        return objective.forward(objective.flat.functional(t), objective.inputs).reshape(-1)

    def loss_of(z: Tensor) -> Tensor:
        return objective.criterion(z.reshape(outputs.shape), objective.targets)

    jacobian = torch.autograd.functional.jacobian(outputs_of, theta)
    loss_hessian = torch.autograd.functional.hessian(loss_of, outputs.detach().reshape(-1))
    return jacobian.T @ loss_hessian @ jacobian


@pytest.mark.parametrize("name", ["mlp", "regression"])
def test_ggn_matches_explicit_jt_hl_j(name: str) -> None:
    _, flat, objective = make_objective(name, torch.float64)
    dense = explicit_ggn(objective)
    operator = objective.curvature(CurvatureKind.GGN)
    torch.manual_seed(4)
    for _ in range(3):
        v = torch.randn(flat.numel, dtype=torch.float64)
        assert rel_err(operator(v), dense @ v) < 1e-10
    # The dense reference itself is PSD (cross-entropy and MSE are convex in z).
    assert torch.linalg.eigvalsh(dense).min() > -1e-10 * torch.linalg.eigvalsh(dense).max()


def damped_mlp_operator(kind: CurvatureKind, seed: int) -> tuple[Tensor | None, CurvatureOperator, list[Tensor]]:
    """The MLP's ``B + 0.3·I`` in float64, its dense GGN (None for other kinds) and three random vectors."""
    _, flat, objective = make_objective("mlp", torch.float64)
    dense = explicit_ggn(objective) if kind is CurvatureKind.GGN else None
    generator = torch.Generator().manual_seed(seed)
    vectors = [torch.randn(flat.numel, dtype=torch.float64, generator=generator) for _ in range(3)]
    return dense, objective.curvature(kind, damping=0.3), vectors


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_quadratic_form_is_v_dot_the_product(kind: CurvatureKind) -> None:
    """The Gauss–Newton form skips the last backward: (Jv)ᵀH_L(Jv) must still equal vᵀ(Bv)."""
    dense, operator, vectors = damped_mlp_operator(kind, 7)
    for v in vectors:
        form = operator.quadratic_form(v)
        assert form == pytest.approx(float(v @ operator(v)), rel=1e-10)
        if dense is not None:
            assert form == pytest.approx(float(v @ dense @ v) + 0.3 * float(v @ v), rel=1e-10)
    assert operator.products == 6  # a form counts as one product
    with pytest.raises(ValueError, match="expected a flat vector"):
        operator.quadratic_form(torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_gram_is_the_matrix_of_the_products(kind: CurvatureKind) -> None:
    """A subspace's [vᵢᵀ(B + λI)vⱼ]: the products' matrix, and for Gauss–Newton the dense JᵀH_LJ's."""
    dense, operator, vectors = damped_mlp_operator(kind, 8)
    gram = operator.gram(vectors)
    products = torch.stack([operator(v) for v in vectors])
    reference = torch.stack(vectors) @ products.T
    assert gram.shape == (3, 3) and gram.dtype == torch.float64
    torch.testing.assert_close(gram, 0.5 * (reference + reference.T), rtol=1e-10, atol=1e-12)
    if dense is not None:
        stacked = torch.stack(vectors)
        torch.testing.assert_close(
            gram, stacked @ dense @ stacked.T + 0.3 * stacked @ stacked.T, rtol=1e-10, atol=1e-12
        )
    assert operator.products == 6  # three for the Gram, three for the reference
    with pytest.raises(ValueError, match="expected flat vectors"):
        operator.gram([torch.zeros(3, dtype=torch.float64)])


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_ggn_is_positive_semidefinite_where_hessian_is_not(name: str) -> None:
    _, flat, objective = make_objective(name, torch.float64)
    ggn = objective.curvature(CurvatureKind.GGN)
    hessian = objective.curvature(CurvatureKind.HVP_REVERSE)
    torch.manual_seed(5)
    hessian_quadratic_forms = []
    for _ in range(20):
        v = torch.randn(flat.numel, dtype=torch.float64)
        assert float(v @ ggn(v)) >= -1e-12 * float(v @ v)
        hessian_quadratic_forms.append(float(v @ hessian(v)))
    # Sanity that the PSD check has teeth: GGN differs from the (indefinite-capable) Hessian.
    v = torch.randn(flat.numel, dtype=torch.float64)
    assert rel_err(ggn(v), hessian(v)) > 1e-3


def test_ggn_equals_hessian_for_linear_model_with_mse() -> None:
    torch.manual_seed(6)
    model = nn.Linear(4, 3).double()
    flat = FlatParameters(model)
    inputs, targets = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    objective = LocalObjective(flat, plain_forward, nn.functional.mse_loss, inputs, targets)
    ggn = objective.curvature(CurvatureKind.GGN)
    theta = flat.clone()
    dense_hessian = torch.autograd.functional.hessian(
        lambda t: nn.functional.mse_loss(flat.functional(t)(inputs), targets), theta
    )
    for kind in ALL_KINDS:
        operator = objective.curvature(kind)
        for _ in range(2):
            v = torch.randn(flat.numel, dtype=torch.float64)
            assert rel_err(operator(v), dense_hessian @ v) < 1e-12
            assert rel_err(ggn(v), operator(v)) < 1e-12


# -- operator contract ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_damping_adds_lambda_v(kind: CurvatureKind) -> None:
    _, flat, objective = make_objective("mlp", torch.float64)
    plain = objective.curvature(kind)
    damped = objective.curvature(kind, damping=0.7)
    v = torch.randn(flat.numel, dtype=torch.float64)
    assert damped.damping == 0.7
    torch.testing.assert_close(damped(v), plain(v) + 0.7 * v, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        objective.curvature(kind, damping=-1.0)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_product_count_and_shared_forward(kind: CurvatureKind) -> None:
    counter = CountingForward()
    _, flat, objective = make_objective("mlp", forward=counter)
    _, _, operator = objective.value_grad_and_curvature(kind)
    assert isinstance(operator, CurvatureOperator)
    assert operator.kind is kind and operator.numel == flat.numel and operator.products == 0
    assert counter.calls == 1, "gradient and operator must come from one forward"
    for _ in range(4):
        operator(torch.randn(flat.numel))
    assert operator.products == 4
    # Stored-graph products never re-run the model; forward mode must, once per product.
    expected = 1 if kind in STORED_GRAPH_KINDS else 1 + 4
    assert counter.calls == expected
    # A bare operator runs its one forward up front, except forward mode, which has
    # nothing to store and runs the model only inside products.
    objective.curvature(kind)
    assert counter.calls == expected + (0 if kind is CurvatureKind.HVP_FORWARD else 1)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_operator_rejects_wrong_shape_and_keeps_callers_dtype(kind: CurvatureKind) -> None:
    _, flat, objective = make_objective("mlp", torch.float32)
    operator = objective.curvature(kind)
    with pytest.raises(ValueError):
        operator(torch.randn(flat.numel + 1))
    v64 = torch.randn(flat.numel, dtype=torch.float64)
    out = operator(v64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, operator(v64.float()).double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_operator_stays_linearised_at_its_theta(kind: CurvatureKind) -> None:
    _, flat, objective = make_objective("mlp", torch.float64)
    operator = objective.curvature(kind)
    v = torch.randn(flat.numel, dtype=torch.float64)
    before = operator(v)
    flat.copy_(flat.data + 0.5)  # e.g. a trial step taken while a Krylov solve is live
    torch.testing.assert_close(operator(v), before, rtol=1e-12, atol=1e-12)
    assert rel_err(objective.curvature(kind)(v), before) > 1e-6


# -- values and gradients ------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn", "regression"])
def test_value_and_grad_matches_autograd_and_writes_flat_grad(name: str) -> None:
    model, flat, objective = make_objective(name, torch.float64)
    reference = copy.deepcopy(model)
    # A deep copy of a flattened model keeps its storage sharing; rebuild leaf params.
    for p in reference.parameters():
        p.data = p.data.clone()
        p.grad = None
    loss_ref: Tensor | float  # the loss, then its value
    loss_ref = objective.criterion(reference(objective.inputs), objective.targets)
    loss_ref.backward()
    loss_ref = float(loss_ref.detach())
    grad_ref = torch.cat([gradient(p).reshape(-1) for p in reference.parameters()])
    for _ in range(2):  # twice: the gradient is zeroed first, not accumulated
        loss, grad = objective.value_and_grad()
        assert grad is flat.grad
        assert loss == pytest.approx(loss_ref, rel=1e-14)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-14)
    assert objective.value() == pytest.approx(loss_ref, rel=1e-14)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_value_grad_and_curvature_gradient_equals_value_and_grad(kind: CurvatureKind) -> None:
    _, flat, objective = make_objective("cnn", torch.float64)
    loss_ref, grad_ref = objective.value_and_grad()
    grad_ref = grad_ref.clone()
    flat.grad.fill_(123.0)
    loss, grad, operator = objective.value_grad_and_curvature(kind, damping=0.1)
    assert grad is flat.grad
    assert loss == pytest.approx(loss_ref, rel=1e-13)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-11, atol=1e-14)
    assert operator.kind is kind and operator.damping == 0.1


def test_value_at_given_theta_leaves_parameters_alone() -> None:
    _, flat, objective = make_objective("regression", torch.float64)
    theta0 = flat.clone()
    step = 0.1 * torch.randn(flat.numel, dtype=torch.float64)
    displaced_value = objective.value(theta0 + step)
    torch.testing.assert_close(flat.data, theta0, rtol=0, atol=0)
    with flat.displaced(step):
        assert objective.value() == pytest.approx(displaced_value, rel=1e-14)
    assert objective.value() != pytest.approx(displaced_value, rel=1e-6)


# -- batch norm, dropout, input derivatives ------------------------------------------


def bn_dropout_objective(dropout: float) -> tuple[nn.Sequential, FlatParameters, LocalObjective]:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)).double()
    flat = FlatParameters(model)
    inputs, targets = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    return model, flat, LocalObjective(flat, plain_forward, nn.functional.cross_entropy, inputs, targets)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_batch_norm_running_stats_updated_once_by_gradient_pass_only(kind: CurvatureKind) -> None:
    model, flat, objective = bn_dropout_objective(0.0)
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm1d) and bn.running_mean is not None and bn.num_batches_tracked is not None
    objective.value()
    operator = objective.curvature(kind)
    operator(torch.randn(flat.numel, dtype=torch.float64))
    assert int(bn.num_batches_tracked) == 0 and float(bn.running_mean.abs().max()) == 0.0
    _, _, operator = objective.value_grad_and_curvature(kind)
    mean_after_grad = bn.running_mean.clone()
    for _ in range(3):
        operator(torch.randn(flat.numel, dtype=torch.float64))
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, mean_after_grad, rtol=0, atol=0)


def test_batch_norm_train_mode_hvps_agree() -> None:
    # Products use the batch statistics of the linearisation batch in both variants.
    _, flat, objective = bn_dropout_objective(0.0)
    v = torch.randn(flat.numel, dtype=torch.float64)
    reverse = objective.curvature(CurvatureKind.HVP_REVERSE)(v)
    forward = objective.curvature(CurvatureKind.HVP_FORWARD)(v)
    assert rel_err(forward, reverse) < 1e-10


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_dropout_mask_is_fixed_per_operator(kind: CurvatureKind) -> None:
    _, flat, objective = bn_dropout_objective(0.5)
    torch.manual_seed(8)
    _, grad, operator = objective.value_grad_and_curvature(kind)
    grad = grad.clone()
    v = torch.randn(flat.numel, dtype=torch.float64)
    first = operator(v)
    torch.testing.assert_close(operator(v), first, rtol=1e-12, atol=1e-12)
    # Forward mode re-runs the model per product: replaying the operator's RNG must
    # reproduce the gradient it returned, i.e. the products see the gradient's mask.
    if kind is CurvatureKind.HVP_FORWARD:
        assert isinstance(operator, _ForwardOverReverseHVP)
        with operator._rng():
            replayed = torch.func.grad(operator._loss_fn)(flat.clone(), objective.targets)
        torch.testing.assert_close(replayed, grad, rtol=1e-12, atol=1e-14)


def pinn_forward(net: Callable[[Tensor], Tensor], inputs: Tensor) -> Tensor:
    """u and du/dx at collocation points, via autograd through the inputs."""
    x = inputs.detach().requires_grad_()
    u = net(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    return torch.cat([u, du], dim=1)


def test_products_through_input_derivatives() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    flat = FlatParameters(model)
    inputs = torch.linspace(-1, 1, 12, dtype=torch.float64).unsqueeze(1)
    targets = torch.zeros(12, 2, dtype=torch.float64)
    objective = LocalObjective(flat, pinn_forward, nn.functional.mse_loss, inputs, targets)
    v = torch.randn(flat.numel, dtype=torch.float64)
    reverse = objective.curvature(CurvatureKind.HVP_REVERSE)(v)
    eps = 1e-4
    with flat.displaced(eps * v):
        grad_plus = objective.value_and_grad()[1].clone()
    with flat.displaced(-eps * v):
        grad_minus = objective.value_and_grad()[1].clone()
    assert rel_err(reverse, (grad_plus - grad_minus) / (2 * eps)) < 1e-6
    dense = explicit_ggn(objective)
    assert rel_err(objective.curvature(CurvatureKind.GGN)(v), dense @ v) < 1e-10


# -- names --------------------------------------------------------------------------


def test_parse_curvature_names_and_errors() -> None:
    for kind in CurvatureKind:
        assert parse_curvature(kind.value) is kind
        assert parse_curvature(kind) is kind
    assert parse_curvature("hessian") is DEFAULT_HESSIAN
    assert DEFAULT_HESSIAN in HVP_KINDS
    assert parse_curvature("GGN") is CurvatureKind.GGN
    assert parse_curvature("hvp_forward") is CurvatureKind.HVP_FORWARD
    with pytest.raises(ConfigError) as info:
        parse_curvature("fisher")
    message = str(info.value)
    assert "fisher" in message
    for choice in ("hessian", "ggn", "hvp-double-backward", "hvp-forward-over-reverse"):
        assert choice in message
    _, _, objective = make_objective("mlp")
    with pytest.raises(ConfigError):
        objective.curvature("newton")


@pytest.mark.parametrize("name", ["mlp", "cnn", "regression"])
@pytest.mark.parametrize("kind", [CurvatureKind.GGN, CurvatureKind.HVP_REVERSE])
def test_objective_gram_equals_the_operators_gram(name: str, kind: CurvatureKind) -> None:
    """The forward-mode Gauss–Newton Gram (no operator built) against the product operator's."""
    _, flat, objective = make_objective(name, torch.float64)
    torch.manual_seed(9)
    vectors = [torch.randn(flat.numel, dtype=torch.float64) for _ in range(3)]
    expected = objective.curvature(kind).gram(vectors)
    torch.testing.assert_close(objective.gram(kind, vectors), expected, rtol=1e-9, atol=1e-11)
    if kind is CurvatureKind.GGN:
        assert float(torch.linalg.eigvalsh(expected)[0]) >= -1e-10 * float(expected.abs().max())
