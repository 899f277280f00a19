"""The subspace trust-region step: the small exact solve and the subspace it lives in.

The small solve is checked against the Moré–Sorensen optimality conditions and a dense
scan of the boundary; the subspace solver against closed forms (the curvature-aware
Cauchy step) and against the small solve itself when the subspace is the whole space.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from hpcopt.numerics.trust_region import SubspaceSolver, make_subproblem_solver, small_trust_region


def _model(c: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> float:
    return float(c @ a + 0.5 * a @ h @ a)


def _assert_more_sorensen(c: torch.Tensor, h: torch.Tensor, radius: float, a: torch.Tensor) -> None:
    """(H + σI)a = −c with H + σI ⪰ 0, σ ≥ 0 and σ(Δ − ‖a‖) = 0: the global minimiser's conditions."""
    norm = float(a.norm())
    assert norm <= radius * (1 + 1e-10)
    residual = h @ a + c
    sigma = 0.0 if norm < radius * (1 - 1e-8) else -float(a @ residual) / norm**2
    assert sigma >= -1e-8
    assert float((residual + sigma * a).norm()) <= 1e-7 * (1 + float(c.norm()))
    assert float(torch.linalg.eigvalsh(h + sigma * torch.eye(len(c), dtype=torch.float64))[0]) >= -1e-8


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("radius", [0.05, 1.0, 50.0])
def test_small_trust_region_meets_the_optimality_conditions(seed: int, radius: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    k = 2 + seed % 3
    root = torch.randn(k, k, generator=generator, dtype=torch.float64)
    h = root + root.T if seed % 2 else root @ root.T + 0.1 * torch.eye(k, dtype=torch.float64)
    c = torch.randn(k, generator=generator, dtype=torch.float64)
    _assert_more_sorensen(c, h, radius, small_trust_region(c, h, radius))


@pytest.mark.parametrize("seed", range(4))
def test_small_trust_region_beats_a_dense_scan_of_the_boundary_in_two_dimensions(seed: int) -> None:
    # Indefinite 2 × 2 models: the minimiser is on the circle; scipy refines the best angle of a scan.
    generator = np.random.default_rng(seed)
    root = generator.standard_normal((2, 2))
    h_np, c_np, radius = root + root.T, generator.standard_normal(2), 0.7

    def on_circle(angle: float) -> float:
        a = radius * np.array([math.cos(angle), math.sin(angle)])
        return float(c_np @ a + 0.5 * a @ h_np @ a)

    angles = np.linspace(0.0, 2 * math.pi, 20001)
    best = angles[int(np.argmin([on_circle(t) for t in angles]))]
    refined = minimize_scalar(on_circle, bounds=(best - 1e-3, best + 1e-3), method="bounded", options={"xatol": 1e-12})
    reference = min(float(refined.fun), on_circle(best))
    if np.linalg.eigvalsh(h_np)[0] > 0:
        interior = -np.linalg.solve(h_np, c_np)
        if np.linalg.norm(interior) <= radius:
            reference = min(reference, float(c_np @ interior + 0.5 * interior @ h_np @ interior))
    ours = small_trust_region(torch.tensor(c_np), torch.tensor(h_np), radius)
    assert _model(torch.tensor(c_np), torch.tensor(h_np), ours) <= reference + 1e-9


def test_small_trust_region_hard_case_reaches_the_boundary() -> None:
    # c ⟂ the eigenvector of the negative eigenvalue: −(H + σI)⁻¹c alone stays inside.
    h = torch.diag(torch.tensor([-1.0, 2.0], dtype=torch.float64))
    c = torch.tensor([0.0, 1.0], dtype=torch.float64)
    a = small_trust_region(c, h, 2.0)
    assert float(a.norm()) == pytest.approx(2.0, rel=1e-10)
    _assert_more_sorensen(c, h, 2.0, a)


def _quadratic(n: int, seed: int, indefinite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    root = torch.randn(n, n, generator=generator, dtype=torch.float64)
    b = root + root.T if indefinite else root @ root.T / n + 0.05 * torch.eye(n, dtype=torch.float64)
    return b, torch.randn(n, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("indefinite", [False, True])
@pytest.mark.parametrize("radius", [0.01, 3.0])
def test_without_stored_steps_the_step_is_the_exact_minimiser_along_the_gradient(
    indefinite: bool, radius: float
) -> None:
    b, g = _quadratic(12, 1, indefinite)
    result = SubspaceSolver(steps=0).solve(g, radius, lambda v: b @ v)
    gbg, gg = float(g @ b @ g), float(g @ g)
    t = radius / math.sqrt(gg) if gbg <= 0 else min(gg / gbg, radius / math.sqrt(gg))
    torch.testing.assert_close(result.step, -t * g, rtol=1e-9, atol=1e-12)
    assert result.pred == pytest.approx(-_model(g, b, -t * g), rel=1e-9)
    assert result.iterations == 1


@pytest.mark.parametrize("indefinite", [False, True])
def test_a_subspace_that_is_the_whole_space_gives_the_exact_trust_region_step(indefinite: bool) -> None:
    n = 4
    b, g = _quadratic(n, 2, indefinite)
    solver = SubspaceSolver(steps=n - 1)
    generator = torch.Generator().manual_seed(3)
    for _ in range(n - 1):
        solver.update(torch.randn(n, generator=generator, dtype=torch.float64), torch.zeros(n, dtype=torch.float64))
    result = solver.solve(g, 0.8, lambda v: b @ v)
    _assert_more_sorensen(g, b, 0.8, result.step)
    torch.testing.assert_close(result.step, small_trust_region(g, b, 0.8), rtol=1e-7, atol=1e-9)
    assert result.pred == pytest.approx(-_model(g, b, result.step), rel=1e-9)


class _GramCounting:
    """A matvec with a ``gram`` method: the solver must use it instead of k products."""

    def __init__(self, b: torch.Tensor) -> None:
        self.b, self.grams, self.products = b, 0, 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        return self.b @ v

    def gram(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        self.grams += 1
        stacked = torch.stack(vectors)
        return stacked @ self.b @ stacked.T


def test_gram_operator_is_used_and_agrees_with_products() -> None:
    b, g = _quadratic(10, 4, True)
    steps = [torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in (5, 6)]
    results = []
    for matvec in (_GramCounting(b), lambda v: b @ v):
        solver = make_subproblem_solver("subspace", subspace_steps=2)
        for step in steps:
            solver.update(step, torch.zeros_like(step))
        results.append(solver.solve(g, 0.5, matvec))
        if isinstance(matvec, _GramCounting):
            assert (matvec.grams, matvec.products) == (1, 0)
    torch.testing.assert_close(results[0].step, results[1].step, rtol=1e-10, atol=1e-12)


def test_dependent_directions_are_dropped_and_memory_is_the_last_steps() -> None:
    b, g = _quadratic(6, 7, False)
    solver = SubspaceSolver(steps=2)
    solver.update(2.0 * g, g)  # the same line as g: adds nothing to the span
    solver.update(torch.zeros(6, dtype=torch.float64), g)  # a zero step is not stored
    alone = SubspaceSolver(steps=0).solve(g, 0.3, lambda v: b @ v)
    torch.testing.assert_close(solver.solve(g, 0.3, lambda v: b @ v).step, alone.step, rtol=1e-8, atol=1e-10)
    for k in range(3):
        solver.update(torch.full((6,), float(k + 1), dtype=torch.float64), g)
    restored = SubspaceSolver(steps=2)
    restored.load_state_dict(solver.state_dict())
    steps = restored.state_dict()["steps"]
    assert isinstance(steps, list)
    assert [float(v[0]) for v in steps] == [2.0, 3.0]
    torch.testing.assert_close(restored.solve(g, 0.3, lambda v: b @ v).step, solver.solve(g, 0.3, lambda v: b @ v).step)


def test_subspace_solver_rejects_bad_input() -> None:
    g = torch.ones(3)
    with pytest.raises(TypeError, match="needs a curvature product"):
        SubspaceSolver().solve(g, 1.0)
    with pytest.raises(ValueError, match="radius"):
        SubspaceSolver().solve(g, 0.0, lambda v: v)
    with pytest.raises(ValueError, match="subspace steps"):
        SubspaceSolver(steps=-1)
    result = SubspaceSolver().solve(torch.tensor([math.nan, 1.0, 0.0]), 1.0, lambda v: v)
    assert result.exit == "nonfinite" and result.pred == 0.0


def test_singular_psd_model_with_gradient_in_its_null_space_steps_to_the_boundary() -> None:
    # λ_min = 0 with c along its eigenvector: the model is unbounded along −c, so ‖a‖ = Δ.
    h = torch.diag(torch.tensor([0.0, 3.0], dtype=torch.float64))
    c = torch.tensor([1.0, 1.0], dtype=torch.float64)
    a = small_trust_region(c, h, 0.5)
    assert float(a.norm()) == pytest.approx(0.5, rel=1e-10)
    _assert_more_sorensen(c, h, 0.5, a)
