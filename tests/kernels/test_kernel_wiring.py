"""The fused kernels on the hot paths: chosen once per optimizer, same results as the plain code.

CPU (always): the backend of CPU parameters is ``None`` (plain torch, bit for bit
what it was); with :class:`CpuKernels` injected, the CG, Steihaug and Martens
solvers and the NLCG, Neumann, HF and APTS-D steps give the plain path's results
to float tolerance, and a spy proves the fused methods were the ones called.
GPU (skipped without one): the same comparisons with :class:`CudaKernels`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch

from hpcopt.kernels import CpuKernels, Kernels, fused_backend
from hpcopt.numerics.krylov.cg import cg, steihaug_cg
from hpcopt.numerics.krylov.martens import martens_cg
from hpcopt.optimizers import make_config, make_optimizer
from hpcopt.optimizers.base import Optimizer
from tests.conftest import ObjectiveFactory
from tests.kernels.gpu_support import needs_gpu

pytestmark = pytest.mark.timeout(120)

OptimizerFactory = Callable[..., Optimizer]


class SpyKernels(CpuKernels):
    """The torch twins, counting which kernel methods the solvers call."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def __getattribute__(self, name: str) -> Any:
        attribute = super().__getattribute__(name)
        if not name.startswith("_") and callable(attribute):
            object.__getattribute__(self, "calls")[name] += 1
        return attribute


def _matrix(n: int, shift: float, dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric matrix with eigenvalues spread around ``shift``·√n, and a right-hand side."""
    generator = torch.Generator().manual_seed(n + int(10 * shift))
    q = torch.randn(n, n, generator=generator, dtype=torch.float64)
    a = (q + q.T) / 2 + shift * math.sqrt(n) * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=generator, dtype=torch.float64)
    return a.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device)


def _tol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-10


# -- the backend is chosen once, and CPU keeps the plain path ----------------------------


def test_cpu_parameters_keep_the_plain_torch_path(optimizer_factory: OptimizerFactory) -> None:
    assert fused_backend("cpu") is None
    try:
        import cupy  # noqa: F401
    except ImportError:
        # Without CuPy a GPU's "fused" updates would be the same unfused torch ops.
        assert fused_backend("cuda") is None
    optimizer = optimizer_factory("nlcg", {})
    assert optimizer.kernels is None


def test_the_backend_comes_from_the_parameters_device(
    optimizer_factory: OptimizerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[torch.device] = []
    spy = SpyKernels()

    def backend(device: torch.device) -> Kernels:
        seen.append(torch.device(device))
        return spy

    monkeypatch.setattr("hpcopt.optimizers.base.fused_backend", backend)
    optimizer = optimizer_factory("neumann", {"epoch_steps": 10})
    assert seen == [optimizer.flat.data.device] and optimizer.kernels is spy


def test_kernels_refuse_a_custom_dot() -> None:
    a, b = _matrix(8, 3.0, torch.float64)

    def dot(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(x @ y)

    for solve in (
        lambda: cg(lambda v: a @ v, b, dot=dot, kernels=CpuKernels()),
        lambda: steihaug_cg(lambda v: a @ v, b, 1.0, dot=dot, kernels=CpuKernels()),
        lambda: martens_cg(lambda v: a @ v, b, dot=dot, kernels=CpuKernels()),
    ):
        with pytest.raises(ValueError, match="local default dot"):
            solve()


# -- Krylov solvers --------------------------------------------------------------------------


def _compare_cg(kernels: Kernels, dtype: torch.dtype, device: str) -> None:
    a, b = _matrix(60, 2.0, dtype, device)
    spd = a @ a.T + torch.eye(60, dtype=dtype, device=device)
    plain = cg(lambda v: spd @ v, b, rtol=1e-6)
    fused = cg(lambda v: spd @ v, b, rtol=1e-6, kernels=kernels)
    assert plain.converged and fused.converged
    assert abs(fused.iterations - plain.iterations) <= 1
    torch.testing.assert_close(fused.solution, plain.solution, rtol=_tol(dtype) * 10, atol=_tol(dtype))


def _compare_steihaug(kernels: Kernels, dtype: torch.dtype, device: str) -> None:
    for shift, radius in ((3.0, 100.0), (3.0, 0.05), (-1.0, 5.0), (0.2, 1.0)):
        a, b = _matrix(40, shift, dtype, device)
        matvec = a.__matmul__
        plain = steihaug_cg(matvec, b, radius, rtol=1e-6)
        fused = steihaug_cg(matvec, b, radius, rtol=1e-6, kernels=kernels)
        assert fused.exit == plain.exit and fused.iterations == plain.iterations, (shift, radius)
        torch.testing.assert_close(fused.step, plain.step, rtol=_tol(dtype) * 10, atol=_tol(dtype))
        assert fused.pred == pytest.approx(plain.pred, rel=_tol(dtype))
        if plain.exit in ("boundary", "negative_curvature"):
            assert float(fused.step.norm()) == pytest.approx(radius, rel=_tol(dtype))


def _compare_martens(kernels: Kernels, dtype: torch.dtype, device: str) -> None:
    a, b = _matrix(50, 2.0, dtype, device)
    spd = a @ a.T / 50 + torch.eye(50, dtype=dtype, device=device)
    plain = martens_cg(lambda v: spd @ v, b, max_iter=30)
    fused = martens_cg(lambda v: spd @ v, b, max_iter=30, kernels=kernels)
    assert fused.exit == plain.exit and fused.iterations == plain.iterations
    torch.testing.assert_close(fused.step, plain.step, rtol=_tol(dtype) * 10, atol=_tol(dtype))
    assert fused.model_value == pytest.approx(plain.model_value, rel=_tol(dtype))
    assert [s.iteration for s in fused.stored] == [s.iteration for s in plain.stored]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cg_with_cpu_kernels_matches_the_plain_path(dtype: torch.dtype) -> None:
    spy = SpyKernels()
    _compare_cg(spy, dtype, "cpu")
    assert spy.calls["cg_step_"] > 5  # the fused step ran, once per iteration


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_steihaug_with_cpu_kernels_matches_the_plain_path(dtype: torch.dtype) -> None:
    spy = SpyKernels()
    _compare_steihaug(spy, dtype, "cpu")
    assert spy.calls["cg_step_"] > 5 and spy.calls["cg_direction_"] > 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_martens_cg_with_cpu_kernels_matches_the_plain_path(dtype: torch.dtype) -> None:
    spy = SpyKernels()
    _compare_martens(spy, dtype, "cpu")
    assert spy.calls["cg_step_"] > 5


# -- optimizer state updates -----------------------------------------------------------------


@pytest.fixture
def optimizer_factory(objective_factory: ObjectiveFactory) -> OptimizerFactory:
    """Optimizer ``name`` with ``options`` on a small logistic problem on ``device``, with ``kernels`` if given."""

    def build(name: str, options: dict[str, object], device: str = "cpu", kernels: Kernels | None = None) -> Optimizer:
        objective = objective_factory(options={"n": 120, "dim": 5}, device=device)
        optimizer = make_optimizer(name, objective, make_config(name, options))
        if kernels is not None:
            optimizer.kernels = kernels
        return optimizer

    return build


def _run_both(
    optimizer_factory: OptimizerFactory, name: str, options: dict[str, object], steps: int, kernels: Kernels
) -> tuple[Optimizer, Optimizer, list[Any], list[Any]]:
    plain = optimizer_factory(name, options)
    fused = optimizer_factory(name, options, kernels=kernels)
    plain_results = [plain.step() for _ in range(steps)]
    fused_results = [fused.step() for _ in range(steps)]
    return plain, fused, plain_results, fused_results


def _assert_same_run(plain: Optimizer, fused: Optimizer, plain_results: list[Any], fused_results: list[Any]) -> None:
    torch.testing.assert_close(fused.flat.data, plain.flat.data, rtol=1e-4, atol=1e-5)
    for a, b in zip(plain_results, fused_results):
        assert b.loss == pytest.approx(a.loss, rel=1e-4)
        assert b.step_norm == pytest.approx(a.step_norm, rel=1e-3, abs=1e-7)
    assert plain_results[-1].loss < plain_results[0].loss  # the runs compared went somewhere


NLCG_CASES = [
    {"beta": "fr", "lr": 0.5},
    {"beta": "pr", "lr": 0.5},
    {"beta": "fr", "lr": 0.5, "precondition": False},
    {"beta": "pr", "lr": 0.5, "warmup_steps": 2, "check_every": 2},
]


@pytest.mark.parametrize("options", NLCG_CASES)
def test_nlcg_with_cpu_kernels_matches_the_plain_path(
    optimizer_factory: OptimizerFactory, options: dict[str, object]
) -> None:
    spy = SpyKernels()
    plain, fused, plain_results, fused_results = _run_both(optimizer_factory, "nlcg", options, 8, spy)
    _assert_same_run(plain, fused, plain_results, fused_results)
    for name in ("h", "prev_grad", "prev_z", "direction", "prev_step"):
        torch.testing.assert_close(getattr(fused, name), getattr(plain, name), rtol=1e-4, atol=1e-6, msg=name)
    assert [r.extras["preconditioner_updated"] for r in fused_results] == [
        r.extras["preconditioner_updated"] for r in plain_results
    ]
    assert spy.calls["nlcg_step_"] == 8
    assert spy.calls["nlcg_precondition_"] == (8 if options.get("precondition", True) else 0)


def test_nlcg_fused_steps_continue_a_plain_run_from_its_state(optimizer_factory: OptimizerFactory) -> None:
    """The fused path reads the plain path's state (a checkpoint written on CPU, resumed on a GPU)."""
    plain = optimizer_factory("nlcg", {"beta": "pr"})
    for _ in range(3):
        plain.step()
    resumed = optimizer_factory("nlcg", {"beta": "pr"}, kernels=SpyKernels())
    resumed.flat.copy_(plain.flat.data)
    resumed.load_state_dict(plain.state_dict())
    for _ in range(4):
        expected, got = plain.step(), resumed.step()
        assert got.extras["beta"] == pytest.approx(expected.extras["beta"], rel=1e-4, abs=1e-9)
    torch.testing.assert_close(resumed.flat.data, plain.flat.data, rtol=1e-4, atol=1e-6)


NEUMANN_OPTIONS: dict[str, object] = {"lr": 0.5, "epoch_steps": 2, "warmup_epochs": 1, "reset_epochs": 3}


def test_neumann_with_cpu_kernels_matches_the_plain_path(optimizer_factory: OptimizerFactory) -> None:
    spy = SpyKernels()
    plain, fused, plain_results, fused_results = _run_both(optimizer_factory, "neumann", NEUMANN_OPTIONS, 12, spy)
    assert [r.extras["phase"] for r in fused_results] == [r.extras["phase"] for r in plain_results]
    neumann_steps = sum(r.extras["phase"] == "neumann" for r in plain_results)
    assert neumann_steps >= 6
    _assert_same_run(plain, fused, plain_results, fused_results)
    for name in ("m", "v"):
        torch.testing.assert_close(getattr(fused, name), getattr(plain, name), rtol=1e-4, atol=1e-6, msg=name)
    assert spy.calls["neumann_update_"] == neumann_steps
    # Two passes per step: ‖w−v‖², then the update (which also sums the logged ‖Δw‖²).
    assert spy.calls["sq_distance"] == neumann_steps


@pytest.mark.parametrize("solver", ["cg", "steihaug", "bicgstab"])
def test_hessian_free_with_cpu_kernels_matches_the_plain_path(optimizer_factory: OptimizerFactory, solver: str) -> None:
    spy = SpyKernels()
    options: dict[str, object] = {"solver": solver, "curvature_fraction": 0.5, "max_iterations": 10}
    plain, fused, plain_results, fused_results = _run_both(optimizer_factory, "hf", options, 3, spy)
    _assert_same_run(plain, fused, plain_results, fused_results)
    assert [r.extras["chosen"] for r in fused_results] == [r.extras["chosen"] for r in plain_results]
    assert spy.calls["tr_trial"] >= 3  # every trial point went through the kernel
    products = sum(r.extras["krylov_iterations"] for r in fused_results)
    if solver == "bicgstab":
        assert spy.calls["cg_step_"] == 0
    else:
        # One fused step per CG iteration; Steihaug's last product may end on the boundary instead.
        assert products - 3 <= spy.calls["cg_step_"] <= products and spy.calls["cg_step_"] > 0


class Float32ReductionKernels(SpyKernels):
    """The CPU kernels with the plain path's float32 reductions instead of float64 ones."""

    def cg_step_(self, x: torch.Tensor, r: torch.Tensor, p: torch.Tensor, ap: torch.Tensor, alpha: float) -> float:
        x.add_(p, alpha=alpha)
        r.sub_(ap, alpha=alpha)
        return float(torch.dot(r, r))

    def cg_direction_(self, p: torch.Tensor, z: torch.Tensor, w: torch.Tensor, beta: float) -> tuple[float, float]:
        p.mul_(beta).add_(z)
        return float(torch.dot(p, p)), float(torch.dot(w, p))


def _apts_d_options(local_solver: str, metric: str) -> dict[str, object]:
    return {
        "local_solver": local_solver,
        "local_iterations": 3,
        "global_passes": 1,
        "radius": 1.0,  # room for interior CG iterations, not only boundary steps
        "radius_max": 1000.0,
        "metric": metric,
    }


def _apts_d_with_kernels(
    optimizer_factory: OptimizerFactory, options: dict[str, object], kernels: Kernels, monkeypatch: pytest.MonkeyPatch
) -> tuple[Optimizer, Optimizer, list[Any], list[Any]]:
    """Three APTS-D steps without and with ``kernels``, injected where APTS-D takes its backend."""
    plain = optimizer_factory("apts-d", options)
    # APTS-D hands its backend to the subproblem solvers it builds, so inject it at the source.
    monkeypatch.setattr("hpcopt.optimizers.base.fused_backend", lambda device: kernels)
    fused = optimizer_factory("apts-d", options)
    return plain, fused, [plain.step() for _ in range(3)], [fused.step() for _ in range(3)]


@pytest.mark.parametrize("local_solver", ["steihaug", "lsr1"])
def test_apts_d_with_cpu_kernels_matches_the_plain_path(
    optimizer_factory: OptimizerFactory, local_solver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = SpyKernels()
    options = _apts_d_options(local_solver, "euclidean")
    plain, fused, plain_results, fused_results = _apts_d_with_kernels(optimizer_factory, options, spy, monkeypatch)
    _assert_same_run(plain, fused, plain_results, fused_results)
    assert [r.accepted for r in fused_results] == [r.accepted for r in plain_results]
    assert spy.calls["tr_trial"] >= 3 and spy.calls["cg_step_"] > 0


@pytest.mark.parametrize("local_solver", ["steihaug", "lsr1"])
def test_apts_d_in_adams_metric_runs_the_plain_paths_operations_with_kernels(
    optimizer_factory: OptimizerFactory, local_solver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In Adam's metric the local Steihaug solve runs on A^-½BA^-½, whose conditioning turns
    # the kernels' float64 reductions into a 1e-3 difference in a step after three outer
    # iterations; with the plain path's float32 reductions the fused run is the plain run
    # bit for bit, so every vector the kernels touch is the one the plain path computes.
    kernels = Float32ReductionKernels()
    options = _apts_d_options(local_solver, "adam")
    plain, fused, plain_results, fused_results = _apts_d_with_kernels(optimizer_factory, options, kernels, monkeypatch)
    assert torch.equal(fused.flat.data, plain.flat.data)
    assert [r.step_norm for r in fused_results] == [r.step_norm for r in plain_results]
    assert plain_results[-1].loss < plain_results[0].loss
    assert kernels.calls["tr_trial"] >= 3 and kernels.calls["cg_step_"] > 0


# -- GPU: the CUDA kernels on the same paths --------------------------------------------------


def _cuda_kernels() -> Kernels:
    from hpcopt.kernels import CudaKernels

    return CudaKernels(torch.device("cuda", torch.cuda.current_device()))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("compare", [_compare_cg, _compare_steihaug, _compare_martens])
def test_krylov_solvers_with_cuda_kernels_match_the_plain_path(
    compare: Callable[[Kernels, torch.dtype, str], None], dtype: torch.dtype
) -> None:
    compare(_cuda_kernels(), dtype, "cuda")


@needs_gpu
def test_gpu_parameters_get_the_cuda_kernels(optimizer_factory: OptimizerFactory) -> None:
    from hpcopt.kernels import CudaKernels

    optimizer = optimizer_factory("nlcg", {}, "cuda")
    assert isinstance(optimizer.kernels, CudaKernels)


@needs_gpu
@pytest.mark.parametrize(
    ("name", "options", "steps"),
    [("nlcg", NLCG_CASES[0], 8), ("nlcg", NLCG_CASES[1], 8), ("neumann", NEUMANN_OPTIONS, 12)],
)
def test_state_updates_with_cuda_kernels_match_the_plain_path(
    optimizer_factory: OptimizerFactory, name: str, options: dict[str, object], steps: int
) -> None:
    # "plain" runs the unfused torch ops on the GPU; the fused run uses the CUDA kernels.
    plain = optimizer_factory(name, options, "cuda")
    plain.kernels = None
    fused = optimizer_factory(name, options, "cuda", _cuda_kernels())
    plain_results = [plain.step() for _ in range(steps)]
    fused_results = [fused.step() for _ in range(steps)]
    _assert_same_run(plain, fused, plain_results, fused_results)


@needs_gpu
@pytest.mark.parametrize("solver", ["cg", "steihaug"])
def test_hessian_free_with_cuda_kernels_matches_the_plain_path(
    optimizer_factory: OptimizerFactory, solver: str
) -> None:
    options: dict[str, object] = {"solver": solver, "curvature_fraction": 0.5, "max_iterations": 10}
    plain = optimizer_factory("hf", options, "cuda")
    plain.kernels = None
    fused = optimizer_factory("hf", options, "cuda", _cuda_kernels())
    plain_results = [plain.step() for _ in range(3)]
    fused_results = [fused.step() for _ in range(3)]
    _assert_same_run(plain, fused, plain_results, fused_results)
    assert [r.extras["chosen"] for r in fused_results] == [r.extras["chosen"] for r in plain_results]


@needs_gpu
@pytest.mark.parametrize("local_solver", ["steihaug", "lsr1"])
def test_apts_d_with_cuda_kernels_matches_the_plain_path(
    optimizer_factory: OptimizerFactory, local_solver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hpcopt.kernels import CudaKernels

    # The Euclidean norm: in Adam's the kernels' float64 reductions move a step by 1e-3
    # (test_apts_d_in_adams_metric_runs_the_plain_paths_operations_with_kernels).
    options = _apts_d_options(local_solver, "euclidean")
    # APTS-D hands its backend to the subproblem solvers it builds: the plain run is built without one.
    with monkeypatch.context() as patch:
        patch.setattr("hpcopt.optimizers.base.fused_backend", lambda device: None)
        plain = optimizer_factory("apts-d", options, "cuda")
    fused = optimizer_factory("apts-d", options, "cuda")
    assert plain.kernels is None and isinstance(fused.kernels, CudaKernels)
    plain_results = [plain.step() for _ in range(3)]
    fused_results = [fused.step() for _ in range(3)]
    _assert_same_run(plain, fused, plain_results, fused_results)
    assert [r.accepted for r in fused_results] == [r.accepted for r in plain_results]
