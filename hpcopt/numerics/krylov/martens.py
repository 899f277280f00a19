"""Krylov solvers of the Hessian-free optimizer (docs/algorithms.md §4): Martens' CG and BiCGSTAB.

Like :mod:`hpcopt.numerics.krylov.cg`, the solvers see only ``matvec(v)`` (the damped curvature
product ``(B + λI) v``) and ``dot(a, b)``.  In distributed use ``matvec`` is the one
collective of an iteration; vectors are replicated on every rank, so ``dot`` is
local and costs no communication.

* :func:`martens_cg` -- CG on ``(B + λI) p = −g`` from a warm start, stopped on the
  relative progress of the quadratic model (Martens 2010, §4.4), keeping the
  iterates ``p_i`` at ``i = ⌈1.3^j⌉`` for backtracking.
* :func:`bicgstab` -- van der Vorst's BiCGSTAB for the indefinite system
  ``(H + λI) p = −g`` (He et al.).  It takes two products per iteration; each
  counts as one entry of ``products``.

:func:`martens_cg` takes an optional fused-kernel backend for its CG step (see
:mod:`hpcopt.numerics.krylov.cg`); BiCGSTAB's updates (``p ← r + β(p − ωv)``, ``x += αp + ωs``)
match none of the kernels, so it stays on torch ops.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hpcopt.numerics.krylov.cg import Dot, MatVec, cg_step_, check_kernels, default_dot

if TYPE_CHECKING:
    from hpcopt.kernels import Kernels

StoppingRule = Callable[[int, list[float]], bool]


@dataclass
class StoredIterate:
    """A CG iterate kept for backtracking, with its (damped) model value ``gᵀp + ½pᵀ(B+λI)p``."""

    iteration: int
    step: torch.Tensor
    model_value: float


@dataclass
class HFSolveResult:
    """Outcome of :func:`martens_cg` or :func:`bicgstab`.

    Attributes:
        step: the last iterate ``p``.
        model_value: damped model value ``gᵀp + ½pᵀ(B+λI)p`` at ``step`` (NaN if unknown).
        iterations: Krylov iterations (CG) or half-iterations (BiCGSTAB) done.
        products: curvature products taken, including one for a nonzero warm start.
        exit: ``converged``, ``progress``, ``max_iters``, ``nonpositive_curvature``,
            ``breakdown`` or ``nonfinite``.
        stored: iterates kept for backtracking (CG only), oldest first; the last one
            is ``step``.
    """

    step: torch.Tensor
    model_value: float
    iterations: int
    products: int
    exit: str
    stored: list[StoredIterate] = field(default_factory=list)


def _storage_points(max_iter: int, ratio: float) -> set[int]:
    points: set[int] = set()
    j = 0
    while True:
        point = math.ceil(ratio**j)
        if point > max_iter:
            return points
        points.add(point)
        j += 1


def martens_cg(
    matvec: MatVec,
    grad: torch.Tensor,
    *,
    dot: Dot = default_dot,
    x0: torch.Tensor | None = None,
    max_iter: int = 50,
    rtol: float = 1e-8,
    progress_tol: float = 5e-4,
    store_ratio: float = 1.3,
    kernels: Kernels | None = None,
) -> HFSolveResult:
    """Approximately minimise ``m(p) = gᵀp + ½pᵀAp`` (``A = matvec``, SPD) by CG.

    Stops when ``‖r‖ ≤ rtol·‖g‖``, when ``A`` shows non-positive curvature along a
    direction, after ``max_iter`` iterations, or on Martens' relative-progress rule:
    at iteration ``i`` with window ``k = max(10, ⌈0.1 i⌉)``, stop once ``i > k``,
    ``m_i < 0`` and ``(m_i − m_{i−k}) / m_i < k · progress_tol``.

    The model value needs no extra product: with ``r = −g − Ap``,
    ``m(p) = ½ pᵀ(g − r)``.

    ``kernels`` (default ``None``: plain torch) fuses ``p += αd``, ``r −= αAd`` and
    ``‖r‖²`` into one pass; it needs the default ``dot`` (its sum is local).
    """
    if grad.dim() != 1:
        raise ValueError(f"grad must be a flat 1-D tensor, got shape {tuple(grad.shape)}")
    check_kernels(kernels, dot)
    if max_iter < 1 or rtol < 0 or progress_tol < 0 or store_ratio <= 1:
        raise ValueError(
            f"martens_cg: need max_iter >= 1, rtol >= 0, progress_tol >= 0, store_ratio > 1; "
            f"got {max_iter}, {rtol}, {progress_tol}, {store_ratio}"
        )
    products = 0
    if x0 is None or not bool(torch.any(x0 != 0)):
        x = torch.zeros_like(grad)
        residual = -grad
    else:
        x = x0.clone()
        residual = -grad - matvec(x)
        products += 1
    grad_norm = math.sqrt(max(dot(grad, grad), 0.0))
    tolerance = rtol * grad_norm
    rr = dot(residual, residual)
    direction = residual.clone()
    points = _storage_points(max_iter, store_ratio)
    values = [0.5 * dot(x, grad - residual)]
    stored: list[StoredIterate] = []
    exit_reason = "max_iters"
    iterations = 0
    if not math.isfinite(rr):
        return HFSolveResult(x, float("nan"), 0, products, "nonfinite")
    if math.sqrt(rr) <= tolerance:
        exit_reason = "converged"
    while exit_reason == "max_iters" and iterations < max_iter:
        a_direction = matvec(direction)
        products += 1
        curvature = dot(direction, a_direction)
        if not math.isfinite(curvature):
            exit_reason = "nonfinite"
            break
        if curvature <= 0.0:
            exit_reason = "nonpositive_curvature"
            break
        alpha = rr / curvature
        rr_new = cg_step_(x, residual, direction, a_direction, alpha, dot=dot, kernels=kernels)
        iterations += 1
        value = 0.5 * dot(x, grad - residual)
        values.append(value)
        if not (math.isfinite(rr_new) and math.isfinite(value)):
            x.add_(direction, alpha=-alpha)
            residual.add_(a_direction, alpha=alpha)
            values.pop()
            iterations -= 1
            exit_reason = "nonfinite"
            break
        if iterations in points:
            stored.append(StoredIterate(iterations, x.clone(), value))
        if math.sqrt(rr_new) <= tolerance:
            exit_reason = "converged"
            break
        window = max(10, math.ceil(0.1 * iterations))
        if iterations > window and value < 0 and (value - values[iterations - window]) / value < window * progress_tol:
            exit_reason = "progress"
            break
        # Nothing to sum here: the fused direction kernel would only add a host sync.
        direction.mul_(rr_new / rr).add_(residual)
        rr = rr_new
    if not stored or stored[-1].iteration != iterations:
        stored.append(StoredIterate(iterations, x.clone(), values[-1]))
    return HFSolveResult(x, values[-1], iterations, products, exit_reason, stored)


def bicgstab(
    matvec: MatVec,
    grad: torch.Tensor,
    *,
    dot: Dot = default_dot,
    x0: torch.Tensor | None = None,
    max_iter: int = 50,
    rtol: float = 1e-8,
) -> HFSolveResult:
    """Solve ``A p = −g`` for a possibly indefinite, non-singular ``A`` by BiCGSTAB.

    ``max_iter`` bounds the curvature products (two per BiCGSTAB iteration);
    ``iterations`` counts them too.  Stops when ``‖r‖ ≤ rtol·‖g‖``, on a breakdown
    (``r̂ᵀr = 0`` or ``r̂ᵀAp = 0``) or when a scalar turns non-finite, returning the
    last finite iterate.
    """
    if grad.dim() != 1:
        raise ValueError(f"grad must be a flat 1-D tensor, got shape {tuple(grad.shape)}")
    if max_iter < 1 or rtol < 0:
        raise ValueError(f"bicgstab: need max_iter >= 1 and rtol >= 0, got {max_iter}, {rtol}")
    products = 0
    if x0 is None or not bool(torch.any(x0 != 0)):
        x = torch.zeros_like(grad)
        residual = -grad
    else:
        x = x0.clone()
        residual = -grad - matvec(x)
        products += 1
    warm_products = products
    tolerance = rtol * math.sqrt(max(dot(grad, grad), 0.0))
    shadow = residual.clone()
    rho_prev = alpha = omega = 1.0
    v = torch.zeros_like(grad)
    p = torch.zeros_like(grad)
    exit_reason = "max_iters"
    if not math.isfinite(dot(residual, residual)):
        return HFSolveResult(x, float("nan"), 0, products, "nonfinite")
    if math.sqrt(dot(residual, residual)) <= tolerance:
        exit_reason = "converged"
    while exit_reason == "max_iters" and products - warm_products < max_iter:
        rho = dot(shadow, residual)
        if rho == 0.0 or not math.isfinite(rho):
            exit_reason = "breakdown"
            break
        beta = (rho / rho_prev) * (alpha / omega)
        p.sub_(v, alpha=omega).mul_(beta).add_(residual)
        v = matvec(p)
        products += 1
        shadow_v = dot(shadow, v)
        if shadow_v == 0.0 or not math.isfinite(shadow_v):
            exit_reason = "breakdown"
            break
        alpha = rho / shadow_v
        s = residual - alpha * v
        if math.sqrt(max(dot(s, s), 0.0)) <= tolerance or products - warm_products >= max_iter:
            x.add_(p, alpha=alpha)
            residual = s
            exit_reason = "converged" if math.sqrt(max(dot(s, s), 0.0)) <= tolerance else "max_iters"
            break
        t = matvec(s)
        products += 1
        tt = dot(t, t)
        omega = dot(t, s) / tt if tt > 0 else 0.0
        if omega == 0.0 or not math.isfinite(omega):
            # Stagnation of the stabilising half-step: keep the BiCG half-step and stop.
            x.add_(p, alpha=alpha)
            residual = s
            exit_reason = "breakdown"
            break
        x_next = x + alpha * p + omega * s
        if not bool(torch.isfinite(x_next).all()):
            exit_reason = "nonfinite"
            break
        x = x_next
        residual = s - omega * t
        rho_prev = rho
        if math.sqrt(max(dot(residual, residual), 0.0)) <= tolerance:
            exit_reason = "converged"
    # m(p) = ½ pᵀ(g − r) holds for any p with r = −g − Ap, which BiCGSTAB keeps.
    value = 0.5 * dot(x, grad - residual)
    return HFSolveResult(x, value, products - warm_products, products, exit_reason)
