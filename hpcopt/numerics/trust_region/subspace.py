"""A trust-region step in a small subspace: the gradient and the last few steps.

``min gᵀs + ½ sᵀBs`` subject to ``‖s‖ ≤ Δ`` restricted to ``s ∈ span{g, p₁, …, p_m}``,
where ``p_i`` are the last ``m`` steps offered through :meth:`SubspaceSolver.update`.
In that span the model needs only the k × k matrices ``DᵀD``, ``DᵀBD`` and the
k-vector ``Dᵀg`` (k ≤ m + 1), so the subproblem is solved exactly in float64
(:func:`small_trust_region`) and the only n-vector made is the step itself.

What it buys in a distributed solve: ``DᵀBD`` of a Gauss–Newton matrix is
``Σ_r (J_r D)ᵀ H_r (J_r D)``, so every rank forms its own k × k block from k
Jacobian-vector products and the ranks reduce k² scalars, where truncated CG
reduces one n-vector per product (a curvature operator with a ``gram`` method, such
as :class:`hpcopt.distributed.curvature_batch.BatchCurvature`, does this; a plain
``matvec`` falls back to k products).  The idea is that of two-dimensional subspace
trust-region steps (Byrd, Schnabel & Shultz 1988) and of Krylov subspace descent
(Vinyals & Povey 2012), which minimise a Gauss–Newton model over the gradient and the
previous step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from hpcopt.numerics.krylov.cg import Dot, MatVec, default_dot
from hpcopt.numerics.trust_region.result import SubproblemResult

# Directions whose share of the span is below this (relative eigenvalue of the
# normalised DᵀD) are dropped: they are numerically dependent on the others.
_DEPENDENT = 1e-8


@runtime_checkable
class GramOperator(Protocol):
    """A curvature operator that forms ``[vᵢᵀ B vⱼ]`` for a few vectors at once."""

    def gram(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor: ...


def small_trust_region(c: torch.Tensor, h: torch.Tensor, radius: float) -> torch.Tensor:
    """The exact minimiser of ``cᵀa + ½ aᵀHa`` over ``‖a‖ ≤ radius`` (k small, float64).

    Moré–Sorensen's characterisation, solved by eigen-decomposition: ``a = −(H + σI)⁻¹c``
    with ``σ ≥ max(0, −λ_min)`` and ``σ(‖a‖ − Δ) = 0``; ``‖a(σ)‖`` is monotone in σ,
    so σ is found by bisection.  In the hard case (c orthogonal to the eigenvectors of
    λ_min) the step is completed to the boundary along that eigenvector.
    """
    c = c.to(torch.float64)
    h = 0.5 * (h.to(torch.float64) + h.to(torch.float64).T)
    eigenvalues, vectors = torch.linalg.eigh(h)
    projected = vectors.T @ c
    scale = max(float(eigenvalues.abs().max()), 1e-300)

    def step_for(sigma: float) -> torch.Tensor:
        shifted = eigenvalues + sigma
        safe = torch.where(shifted.abs() > 1e-14 * scale, shifted, torch.full_like(shifted, math.inf))
        return -(vectors @ (projected / safe))

    lowest = float(eigenvalues[0])
    if lowest > 1e-14 * scale:
        interior = step_for(0.0)
        if float(interior.norm()) <= radius:
            return interior
    floor = max(0.0, -lowest)
    at_floor = step_for(floor)
    # ‖a(σ)‖ → ∞ as σ ↓ −λ_min unless c has no component along λ_min's eigenvectors.
    lowest_space = eigenvalues <= lowest + 1e-12 * scale
    orthogonal = bool((projected[lowest_space].abs() <= 1e-12 * max(float(projected.norm()), 1e-300)).all())
    if orthogonal and float(at_floor.norm()) <= radius:
        # Hard case (or c = 0): reach the boundary along the lowest eigenvector.
        missing = radius**2 - float(at_floor.norm()) ** 2
        return at_floor + math.sqrt(max(missing, 0.0)) * vectors[:, 0]
    # ‖a(σ)‖ > Δ at the floor and → 0 as σ → ∞: bracket, then bisect.
    upper = floor + float(projected.norm()) / radius + scale
    lower = floor
    for _ in range(200):
        middle = 0.5 * (lower + upper)
        if float(step_for(middle).norm()) > radius:
            lower = middle
        else:
            upper = middle
        if upper - lower <= 1e-15 * max(upper, 1.0):
            break
    step = step_for(upper)
    return step * min(1.0, radius / max(float(step.norm()), 1e-300))


class SubspaceSolver:
    """The exact trust-region step in ``span{g, last steps}`` with a caller's curvature.

    Args:
        dot: Inner product (default :func:`hpcopt.numerics.krylov.cg.default_dot`).
        steps: how many of the last steps (from :meth:`update`) span the subspace with g.

    ``iterations`` of a result counts the curvature products the Gram matrix took (k).
    """

    name = "subspace"
    needs_matvec = True
    has_memory = True

    def __init__(self, dot: Dot = default_dot, steps: int = 2) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"subspace steps must be an integer >= 0, got {steps!r}")
        self.dot = dot
        self.steps = steps
        self._steps: list[torch.Tensor] = []

    def solve(self, grad: torch.Tensor, radius: float, matvec: MatVec | None = None) -> SubproblemResult:
        """The exact step in the span; ``matvec`` is required (its ``gram`` is used when it has one)."""
        if matvec is None:
            raise TypeError("the subspace subproblem solver needs a curvature product (matvec)")
        if not math.isfinite(radius) or radius <= 0.0:
            raise ValueError(f"trust-region radius must be finite and > 0, got {radius}")
        directions = [grad, *self._steps]
        norms = [math.sqrt(max(self.dot(v, v), 0.0)) for v in directions]
        if not all(math.isfinite(x) for x in norms):
            return SubproblemResult(torch.zeros_like(grad), 0.0, "nonfinite", 0)
        directions = [v / x for v, x in zip(directions, norms) if x > 0.0]
        if not directions:
            return SubproblemResult(torch.zeros_like(grad), 0.0, "converged", 0)
        k = len(directions)
        metric = torch.tensor(
            [[self.dot(directions[i], directions[j]) for j in range(k)] for i in range(k)], dtype=torch.float64
        )
        linear = torch.tensor([self.dot(v, grad) for v in directions], dtype=torch.float64)
        if isinstance(matvec, GramOperator):
            curvature = matvec.gram(directions).to(torch.float64)
        else:
            products = [matvec(v) for v in directions]
            curvature = torch.tensor(
                [[self.dot(directions[i], products[j]) for j in range(k)] for i in range(k)], dtype=torch.float64
            )
        if not (bool(torch.isfinite(curvature).all()) and bool(torch.isfinite(linear).all())):
            return SubproblemResult(torch.zeros_like(grad), 0.0, "nonfinite", k)
        # An orthonormal basis of the span in coefficient space: DᵀD = U diag(μ) Uᵀ, T = U μ^(-1/2).
        weights, basis = torch.linalg.eigh(0.5 * (metric + metric.T))
        keep = weights > _DEPENDENT * float(weights.max())
        transform = basis[:, keep] / weights[keep].sqrt()
        coefficients = transform @ small_trust_region(transform.T @ linear, transform.T @ curvature @ transform, radius)
        pred = -float(linear @ coefficients + 0.5 * coefficients @ curvature @ coefficients)
        step = torch.zeros_like(grad)
        for weight, v in zip(coefficients.tolist(), directions):
            step.add_(v, alpha=weight)
        # Rounding in float32 may leave ‖s‖ a hair above Δ.
        length = math.sqrt(max(self.dot(step, step), 0.0))
        if length > radius:
            step.mul_(radius / length)
        exit_reason = "boundary" if length >= radius * (1 - 1e-6) else "converged"
        return SubproblemResult(step, pred, exit_reason, k)

    def update(self, step: torch.Tensor, grad_change: torch.Tensor) -> None:
        """Keep ``step`` as a direction of the next subspaces (the last ``steps`` of them)."""
        if self.steps == 0:
            return
        norm = self.dot(step, step)
        if math.isfinite(norm) and norm > 0.0:
            self._steps = [*self._steps, step.detach().clone()][-self.steps :]

    def reset(self) -> None:
        """Forget the stored steps."""
        self._steps = []

    def state_dict(self) -> dict[str, object]:
        return {"steps": [v.clone() for v in self._steps]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        stored = state.get("steps", [])
        assert isinstance(stored, list)
        self._steps = [v.clone() for v in stored][-self.steps :] if self.steps else []
