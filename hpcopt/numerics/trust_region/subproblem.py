"""Trust-region subproblem solvers: ``min g's + 1/2 s'Bs`` subject to ``||s|| <= radius``.

Four interchangeable solvers share the :class:`SubproblemSolver` protocol:

* ``cauchy`` -- first-order model (``B = 0``): the step to the boundary along ``-g``.
* ``steihaug`` -- truncated CG on a curvature product the caller supplies per solve
  (Hessian-vector or Gauss-Newton product, possibly distributed).
* ``lsr1`` -- truncated CG on a limited-memory SR1 matrix kept by the solver and fed
  through :meth:`SubproblemSolver.update`.
* ``subspace`` -- the exact step in span{g, last steps} on a curvature the caller
  supplies (:mod:`hpcopt.numerics.trust_region.subspace`).

Optimizers choose one with :func:`make_subproblem_solver` and never branch on it.
The two CG-based solvers pass an optional fused-kernel backend on to
:func:`hpcopt.numerics.krylov.cg.steihaug_cg`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from hpcopt.errors import ConfigError
from hpcopt.numerics.krylov.cg import Dot, MatVec, SteihaugResult, default_dot, steihaug_cg
from hpcopt.numerics.trust_region.lsr1 import LSR1Operator
from hpcopt.numerics.trust_region.result import SubproblemResult
from hpcopt.numerics.trust_region.subspace import SubspaceSolver

if TYPE_CHECKING:
    from hpcopt.kernels import Kernels

SOLVER_NAMES = ("cauchy", "steihaug", "lsr1", "subspace")


@runtime_checkable
class SubproblemSolver(Protocol):
    """What an optimizer needs from a subproblem solver.

    Attributes:
        name: ``cauchy``, ``steihaug`` or ``lsr1``.
        needs_matvec: Whether :meth:`solve` needs a curvature product from the caller.
        has_memory: Whether :meth:`update` does anything (quasi-Newton memory), so that
            callers know when computing a gradient just for it is worthwhile.
    """

    name: str
    needs_matvec: bool
    has_memory: bool

    def solve(self, grad: torch.Tensor, radius: float, matvec: MatVec | None = None) -> SubproblemResult:
        """Return an approximate minimiser of the model within ``radius``."""
        ...

    def update(self, step: torch.Tensor, grad_change: torch.Tensor) -> None:
        """Feed a (step, gradient change) pair to quasi-Newton memory, if any."""
        ...

    def reset(self) -> None:
        """Forget quasi-Newton memory, if any."""
        ...

    def state_dict(self) -> dict[str, object]:
        """What a checkpoint must keep of the solver between steps (copies)."""
        ...

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


def _from_steihaug(result: SteihaugResult) -> SubproblemResult:
    return SubproblemResult(result.step, result.pred, result.exit.value, result.iterations)


class CauchySolver:
    """First-order step ``s = -radius g / ||g||`` with ``pred = radius ||g||``.

    Args:
        dot: Inner product (default :func:`hpcopt.numerics.krylov.cg.default_dot`).
    """

    name = "cauchy"
    needs_matvec = False
    has_memory = False

    def __init__(self, dot: Dot = default_dot) -> None:
        self.dot = dot

    def solve(self, grad: torch.Tensor, radius: float, matvec: MatVec | None = None) -> SubproblemResult:
        """Step to the boundary along ``-g``; ``matvec`` is ignored."""
        if not math.isfinite(radius) or radius <= 0.0:
            raise ValueError(f"trust-region radius must be finite and > 0, got {radius}")
        grad_norm_sq = self.dot(grad, grad)
        if not math.isfinite(grad_norm_sq):
            return SubproblemResult(torch.zeros_like(grad), 0.0, "nonfinite", 0)
        grad_norm = math.sqrt(max(grad_norm_sq, 0.0))
        if grad_norm == 0.0:
            return SubproblemResult(torch.zeros_like(grad), 0.0, "converged", 0)
        step = grad * (-radius / grad_norm)
        return SubproblemResult(step, radius * grad_norm, "boundary", 0)

    def update(self, step: torch.Tensor, grad_change: torch.Tensor) -> None:
        """No memory: nothing to do."""

    def reset(self) -> None:
        """No memory: nothing to do."""

    def state_dict(self) -> dict[str, object]:
        return {}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """No memory: nothing to restore."""


class SteihaugSolver:
    """Steihaug-Toint truncated CG on the curvature product passed to :meth:`solve`.

    Args:
        dot: Inner product (default :func:`hpcopt.numerics.krylov.cg.default_dot`).
        max_iter: Limit on curvature products per solve (default ``None``:
            ``min(n, 250)``, see :func:`hpcopt.numerics.krylov.cg.steihaug_cg`).
        rtol: Relative residual tolerance (default ``None``: ``min(0.5, sqrt(||g||))``).
        kernels: Fused vector updates (default ``None``: plain torch); needs the default ``dot``.
    """

    name = "steihaug"
    needs_matvec = True
    has_memory = False

    def __init__(
        self,
        dot: Dot = default_dot,
        max_iter: int | None = None,
        rtol: float | None = None,
        kernels: Kernels | None = None,
    ) -> None:
        self.dot = dot
        self.max_iter = max_iter
        self.rtol = rtol
        self.kernels = kernels
        #: Direction of negative curvature found by the last solve, else ``None``.
        self.negative_curvature_direction: torch.Tensor | None = None

    def solve(self, grad: torch.Tensor, radius: float, matvec: MatVec | None = None) -> SubproblemResult:
        """Run truncated CG on ``matvec``, which is required."""
        if matvec is None:
            raise TypeError("the steihaug subproblem solver needs a curvature product (matvec)")
        result = steihaug_cg(
            matvec, grad, radius, dot=self.dot, rtol=self.rtol, max_iter=self.max_iter, kernels=self.kernels
        )
        self.negative_curvature_direction = result.negative_curvature_direction
        return _from_steihaug(result)

    def update(self, step: torch.Tensor, grad_change: torch.Tensor) -> None:
        """No memory: nothing to do."""

    def reset(self) -> None:
        """Forget the last negative-curvature direction."""
        self.negative_curvature_direction = None

    def state_dict(self) -> dict[str, object]:
        # The negative-curvature direction belongs to the last solve, not to the state.
        return {}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """No memory: nothing to restore."""
        self.negative_curvature_direction = None


class LSR1Solver:
    """Truncated CG on a limited-memory SR1 matrix built from :meth:`update` pairs.

    Args:
        dot: Inner product (default :func:`hpcopt.numerics.krylov.cg.default_dot`).
        memory: Pairs kept (default 5).
        max_iter: Limit on CG iterations per solve (default ``None``: ``min(n, 250)``;
            exact arithmetic needs at most ``memory + 1``, since ``B - gamma I`` has rank
            ``memory``).
        skip_tol: SR1 skip tolerance (default 1e-8).
        rtol: Relative residual tolerance (default ``None``: ``min(0.5, sqrt(||g||))``).
        kernels: Fused vector updates of the CG (default ``None``: plain torch).
    """

    name = "lsr1"
    needs_matvec = False
    has_memory = True

    def __init__(
        self,
        dot: Dot = default_dot,
        memory: int = 5,
        max_iter: int | None = None,
        skip_tol: float = 1e-8,
        rtol: float | None = None,
        kernels: Kernels | None = None,
    ) -> None:
        self.dot = dot
        self.max_iter = max_iter
        self.rtol = rtol
        self.kernels = kernels
        self.operator = LSR1Operator(memory=memory, dot=dot, skip_tol=skip_tol)

    def solve(self, grad: torch.Tensor, radius: float, matvec: MatVec | None = None) -> SubproblemResult:
        """Run truncated CG on the SR1 operator; ``matvec`` is ignored."""
        result = steihaug_cg(
            self.operator.matvec,
            grad,
            radius,
            dot=self.dot,
            rtol=self.rtol,
            max_iter=self.max_iter,
            kernels=self.kernels,
        )
        return _from_steihaug(result)

    def update(self, step: torch.Tensor, grad_change: torch.Tensor) -> None:
        """Offer the pair to the SR1 memory (it may be skipped)."""
        self.operator.update(step, grad_change)

    def reset(self) -> None:
        """Forget all pairs."""
        self.operator.reset()

    def state_dict(self) -> dict[str, object]:
        return self.operator.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.operator.load_state_dict(state)


def make_subproblem_solver(
    name: str,
    *,
    dot: Dot = default_dot,
    memory: int = 5,
    max_iter: int | None = None,
    kernels: Kernels | None = None,
    subspace_steps: int = 2,
    rtol: float | None = None,
) -> SubproblemSolver:
    """Build a subproblem solver by name.

    Args:
        name: ``cauchy``, ``steihaug``, ``lsr1`` or ``subspace``.
        dot: Inner product for all solvers (default :func:`hpcopt.numerics.krylov.cg.default_dot`).
        memory: SR1 pairs kept by ``lsr1`` (default 5).
        max_iter: CG iteration limit for ``steihaug`` and ``lsr1`` (default ``None``).
        kernels: Fused vector updates for ``steihaug`` and ``lsr1`` (default ``None``).
        subspace_steps: last steps that span ``subspace``'s subspace with g (default 2).
        rtol: CG's relative residual tolerance for ``steihaug`` and ``lsr1`` (default
            ``None``: ``min(0.5, sqrt(||g||))``).

    Raises:
        ConfigError: For an unknown name.
    """
    if name == "cauchy":
        return CauchySolver(dot=dot)
    if name == "steihaug":
        return SteihaugSolver(dot=dot, max_iter=max_iter, rtol=rtol, kernels=kernels)
    if name == "lsr1":
        return LSR1Solver(dot=dot, memory=memory, max_iter=max_iter, rtol=rtol, kernels=kernels)
    if name == "subspace":
        return SubspaceSolver(dot=dot, steps=subspace_steps)
    raise ConfigError(f"unknown subproblem solver {name!r} (choose from {', '.join(SOLVER_NAMES)})")
