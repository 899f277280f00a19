"""Krylov solvers written against a matrix-vector product and an inner product.

The solvers never see MPI.  They take ``matvec(v)`` (a Hessian-, Gauss-Newton- or
quasi-Newton product) and ``dot(a, b)`` as plain callables; in distributed use
``dot`` may be an allreduce, so every inner product and every norm below goes
through ``dot`` and nothing calls ``torch.dot`` or ``torch.norm`` directly.
Vectors are flat 1-D tensors; results keep the dtype and device of the input.

Fused vector updates: :func:`cg` and :func:`steihaug_cg` take an optional
``kernels`` backend (:mod:`hpcopt.kernels`).  With it, the CG step
(``x += αp``, ``r −= αAp`` and the new ``r'r``) is one pass, and Steihaug's
direction update also returns ``d'd`` and ``s'd``.  Those sums are this rank's,
so kernels are accepted only with the local :func:`default_dot`: every caller in
hpcopt solves with replicated vectors, where the local sum is the whole sum.
Without ``kernels`` (the default, and what optimizers use on CPU) the updates are
the plain torch operations below and every sum goes through ``dot``.

Contents:

* :func:`cg` -- conjugate gradients for symmetric positive definite systems.
* :func:`steihaug_cg` -- Steihaug-Toint truncated CG for the trust-region
  subproblem ``min g's + 1/2 s'Bs  subject to  ||s|| <= radius`` (Nocedal & Wright,
  Algorithm 7.2), which also reports a direction of negative curvature.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hpcopt.kernels import Kernels

MatVec = Callable[[torch.Tensor], torch.Tensor]
Dot = Callable[[torch.Tensor, torch.Tensor], float]

# Without a cap, the default "n iterations" of truncated CG would mean millions of
# curvature products for a network; callers that want more pass ``max_iter``.
STEIHAUG_DEFAULT_MAX_ITER_CAP = 250


def default_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Serial Euclidean inner product of two flat vectors, as a Python float."""
    return float(torch.dot(a, b))


def _norm(v: torch.Tensor, dot: Dot) -> float:
    return math.sqrt(max(dot(v, v), 0.0))


def _check_vector(name: str, v: torch.Tensor) -> None:
    # Callers hand over flat parameter-space vectors; anything else is a bug upstream.
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a flat 1-D tensor, got {type(v).__name__}")
    if v.dim() != 1:
        raise ValueError(f"{name} must be a flat 1-D tensor, got shape {tuple(v.shape)}")


def check_kernels(kernels: Kernels | None, dot: Dot) -> None:
    """Refuse fused kernels next to a custom ``dot``: their sums are local, ``dot`` may not be."""
    if kernels is not None and dot is not default_dot:
        raise ValueError(
            "fused kernels return this rank's partial sums; pass kernels only with the local default dot "
            "(replicated vectors), not with a custom or distributed dot"
        )


def cg_step_(
    x: torch.Tensor,
    residual: torch.Tensor,
    direction: torch.Tensor,
    product: torch.Tensor,
    alpha: float,
    *,
    dot: Dot,
    kernels: Kernels | None,
) -> float:
    """``x += α·direction``, ``residual −= α·product``; returns the new ``residual'residual``.

    One fused pass with ``kernels``; otherwise two torch updates and one ``dot``.
    """
    if kernels is None:
        x.add_(direction, alpha=alpha)
        residual.add_(product, alpha=-alpha)
        return dot(residual, residual)
    return kernels.cg_step_(x, residual, direction, product, alpha)


@dataclass
class CGResult:
    """Outcome of :func:`cg`.

    Attributes:
        solution: The last iterate ``x``.
        iterations: Number of matrix-vector products spent on CG iterations.
        residual_norm: ``||rhs - A x||`` as tracked by the recurrence.
        converged: Whether the tolerance was met.
    """

    solution: torch.Tensor
    iterations: int
    residual_norm: float
    converged: bool


def cg(
    matvec: MatVec,
    rhs: torch.Tensor,
    *,
    dot: Dot = default_dot,
    x0: torch.Tensor | None = None,
    rtol: float = 1e-5,
    atol: float = 0.0,
    max_iter: int | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    kernels: Kernels | None = None,
) -> CGResult:
    """Solve ``A x = rhs`` for symmetric positive definite ``A`` by conjugate gradients.

    Args:
        matvec: ``v -> A v``.
        rhs: Right-hand side, flat 1-D tensor.
        dot: Inner product (default :func:`default_dot`); all norms use it.
        x0: Starting point (default zero); not modified.
        rtol: Relative tolerance (default 1e-5): stop when
            ``||r|| <= max(rtol * ||rhs||, atol)``.
        atol: Absolute tolerance (default 0.0).
        max_iter: Iteration limit (default ``2 * n``: exact arithmetic needs ``n``,
            rounding may need a few more).
        callback: Called as ``callback(iteration, x)`` after every iteration.
        kernels: Fused vector updates (default ``None``: plain torch); needs the
            default ``dot`` (see the module docstring).

    Returns:
        A :class:`CGResult`.  If ``A`` shows non-positive or non-finite curvature
        along a search direction, CG stops there with ``converged=False``.
    """
    _check_vector("rhs", rhs)
    check_kernels(kernels, dot)
    if rtol < 0 or atol < 0:
        raise ValueError(f"cg tolerances must be non-negative, got rtol={rtol}, atol={atol}")
    n = rhs.numel()
    max_iter = 2 * n if max_iter is None else max_iter
    if max_iter < 0:
        raise ValueError(f"cg max_iter must be >= 0, got {max_iter}")

    if x0 is None:
        x = torch.zeros_like(rhs)
        residual = rhs.clone()
    else:
        x = x0.clone()
        residual = rhs - matvec(x)
    tolerance = max(rtol * _norm(rhs, dot), atol)
    rr = dot(residual, residual)
    direction = residual.clone()
    iterations = 0
    converged = math.sqrt(max(rr, 0.0)) <= tolerance
    while not converged and iterations < max_iter:
        a_direction = matvec(direction)
        curvature = dot(direction, a_direction)
        # A is assumed SPD; anything else would make alpha meaningless, so stop.
        if not math.isfinite(curvature) or curvature <= 0.0:
            break
        alpha = rr / curvature
        rr_new = cg_step_(x, residual, direction, a_direction, alpha, dot=dot, kernels=kernels)
        iterations += 1
        if callback is not None:
            callback(iterations, x)
        if not math.isfinite(rr_new):
            rr = rr_new
            break
        converged = math.sqrt(max(rr_new, 0.0)) <= tolerance
        beta = rr_new / rr
        rr = rr_new
        # Nothing to sum here: the fused direction kernel would only add a host sync.
        direction.mul_(beta).add_(residual)
    residual_norm = math.sqrt(rr) if math.isfinite(rr) and rr >= 0 else float("nan")
    return CGResult(solution=x, iterations=iterations, residual_norm=residual_norm, converged=converged)


class SteihaugExit(enum.StrEnum):
    """Why :func:`steihaug_cg` stopped."""

    CONVERGED = "converged"
    BOUNDARY = "boundary"
    NEGATIVE_CURVATURE = "negative_curvature"
    MAX_ITERS = "max_iters"
    NONFINITE = "nonfinite"


@dataclass
class SteihaugResult:
    """Outcome of :func:`steihaug_cg`.

    Attributes:
        step: The step ``s`` with ``||s|| <= radius``.
        pred: Predicted reduction ``-(g's + 1/2 s'Bs)`` of the quadratic model.
        exit: Why the iteration stopped.
        iterations: Number of matrix-vector products used.
        negative_curvature_direction: The CG direction ``d`` with ``d'Bd <= 0`` when
            ``exit`` is ``NEGATIVE_CURVATURE``, else ``None``.
    """

    step: torch.Tensor
    pred: float
    exit: SteihaugExit
    iterations: int
    negative_curvature_direction: torch.Tensor | None


def _boundary_roots(zz: float, zd: float, dd: float, radius: float) -> tuple[float, float]:
    """Both roots ``tau`` of ``||z + tau d||^2 = radius^2``, given ``z'z``, ``z'd``, ``d'd``.

    Uses the cancellation-free form of the quadratic formula; with ``||z|| < radius``
    the roots have opposite signs.
    """
    constant = zz - radius * radius
    discriminant = max(zd * zd - dd * constant, 0.0)
    root = math.sqrt(discriminant)
    q = -(zd + math.copysign(root, zd))
    if q == 0.0:
        # Only when z'd = 0 and ||z|| = radius: both roots are zero.
        return 0.0, 0.0
    return q / dd, constant / q


def steihaug_cg(
    matvec: MatVec,
    grad: torch.Tensor,
    radius: float,
    *,
    dot: Dot = default_dot,
    rtol: float | None = None,
    max_iter: int | None = None,
    kernels: Kernels | None = None,
) -> SteihaugResult:
    """Approximately minimise ``m(s) = g's + 1/2 s'Bs`` subject to ``||s|| <= radius``.

    Steihaug-Toint truncated CG (Nocedal & Wright, Algorithm 7.2): CG on
    ``B s = -g`` from ``s = 0``.  The iterates grow monotonically in norm, so the
    first iterate that would leave the ball, or the first direction with
    ``d'Bd <= 0``, ends the iteration with a step to the boundary along ``d``;
    of the two boundary points the one with the lower model value is taken.

    Args:
        matvec: ``v -> B v`` for symmetric ``B`` (may be indefinite).
        grad: The gradient ``g``, flat 1-D tensor; not modified.
        radius: Trust-region radius, finite and > 0.
        dot: Inner product (default :func:`default_dot`); all norms use it.
        rtol: Relative residual tolerance; default ``None`` means the superlinear
            rule ``||r|| <= min(0.5, sqrt(||g||)) * ||g||``.
        max_iter: Limit on matrix-vector products (default ``min(n, 250)``).
        kernels: Fused vector updates (default ``None``: plain torch); needs the
            default ``dot``.  With them the direction pass also sums ``d'd`` and
            ``s'd`` exactly, and those replace the recurrences below.

    Returns:
        A :class:`SteihaugResult`.  ``g = 0`` gives the zero step with ``pred = 0``
        and exit ``CONVERGED``.  Non-finite curvature or gradient stops the iteration
        at the current iterate with exit ``NONFINITE``; it never raises for that.

    Per iteration this costs one ``matvec`` and two ``dot`` calls: the norms of the
    iterate needed for the ball test come from the CG recurrences for ``s's``,
    ``s'd`` and ``d'd`` (exact in exact arithmetic), and are recomputed with ``dot``
    only when a boundary step is taken, so that the step lands on the sphere.
    """
    _check_vector("grad", grad)
    check_kernels(kernels, dot)
    if not math.isfinite(radius) or radius <= 0.0:
        raise ValueError(f"trust-region radius must be finite and > 0, got {radius}")
    n = grad.numel()
    if max_iter is None:
        max_iter = min(n, STEIHAUG_DEFAULT_MAX_ITER_CAP)
    if max_iter < 0:
        raise ValueError(f"steihaug max_iter must be >= 0, got {max_iter}")
    if rtol is not None and rtol < 0:
        raise ValueError(f"steihaug rtol must be non-negative, got {rtol}")

    step = torch.zeros_like(grad)
    rr = dot(grad, grad)
    grad_norm = math.sqrt(rr) if math.isfinite(rr) else float("nan")
    if not math.isfinite(grad_norm):
        return SteihaugResult(step, 0.0, SteihaugExit.NONFINITE, 0, None)
    if grad_norm == 0.0:
        return SteihaugResult(step, 0.0, SteihaugExit.CONVERGED, 0, None)
    rel = min(0.5, math.sqrt(grad_norm)) if rtol is None else rtol
    tolerance = rel * grad_norm

    # residual = -(g + B s), the CG residual of B s = -g (the sign the fused CG step
    # expects), is kept by the recurrence, so B s = -(residual + g) is known without an
    # extra product, and pred = -(g's + 1/2 s'Bs) = -1/2 (g - residual)'s.  Negation is
    # exact, so this gives the same bits as tracking g + B s.
    residual = -grad
    direction = residual.clone()
    ss, sd, dd = 0.0, 0.0, rr
    iterations = 0
    exit_reason = SteihaugExit.MAX_ITERS
    negative_direction: torch.Tensor | None = None

    while iterations < max_iter:
        b_direction = matvec(direction)
        iterations += 1
        curvature = dot(direction, b_direction)
        if not math.isfinite(curvature):
            exit_reason = SteihaugExit.NONFINITE
            break
        alpha = rr / curvature if curvature > 0.0 else 0.0
        ss_next = ss + 2.0 * alpha * sd + alpha * alpha * dd
        if curvature <= 0.0 or math.sqrt(max(ss_next, 0.0)) >= radius:
            if curvature <= 0.0:
                exit_reason = SteihaugExit.NEGATIVE_CURVATURE
                negative_direction = direction.clone()
            else:
                exit_reason = SteihaugExit.BOUNDARY
            ss, sd, dd = dot(step, step), dot(step, direction), dot(direction, direction)
            slope = -dot(residual, direction)
            # Model change along the line: m(s + tau d) - m(s) = tau (g + Bs)'d + 1/2 tau^2 d'Bd.
            roots = _boundary_roots(ss, sd, dd, radius)
            tau = min(roots, key=lambda t: t * slope + 0.5 * t * t * curvature)
            step.add_(direction, alpha=tau)
            residual.add_(b_direction, alpha=-tau)
            break
        rr_new = cg_step_(step, residual, direction, b_direction, alpha, dot=dot, kernels=kernels)
        if not math.isfinite(rr_new):
            exit_reason = SteihaugExit.NONFINITE
            # Undo the update so the returned step is the last sane iterate.
            step.add_(direction, alpha=-alpha)
            residual.add_(b_direction, alpha=alpha)
            break
        if math.sqrt(rr_new) <= tolerance:
            exit_reason = SteihaugExit.CONVERGED
            break
        beta = rr_new / rr
        sd = beta * (sd + alpha * dd)
        dd = rr_new + beta * beta * dd
        ss = ss_next
        rr = rr_new
        if kernels is None:
            direction.mul_(beta).add_(residual)
        else:
            # The same pass sums d'd and s'd of the new direction: exact values at no extra read.
            dd, sd = kernels.cg_direction_(direction, residual, step, beta)

    pred = -0.5 * (dot(grad, step) - dot(residual, step))
    if not math.isfinite(pred):
        pred = float("nan")
    return SteihaugResult(step, pred, exit_reason, iterations, negative_direction)
