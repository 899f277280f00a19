"""Serial reference trust-region loop, built only from the pieces of this package.

It is the executable statement of how an optimizer combines a
:class:`~hpcopt.numerics.trust_region.subproblem.SubproblemSolver`, a
:class:`~hpcopt.numerics.trust_region.radius.RadiusPolicy` and :func:`decide`; the tests run it
against scipy.  Distributed optimizers follow the same order of operations with
allreduced gradients and scalars.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hpcopt.errors import ConfigError, NonFiniteError
from hpcopt.numerics.krylov.cg import default_dot
from hpcopt.numerics.trust_region.radius import RadiusPolicy, decide
from hpcopt.numerics.trust_region.subproblem import SubproblemSolver


@dataclass(frozen=True)
class IterationRecord:
    """One iteration of :func:`minimize_trust_region`.

    Attributes:
        iteration: 0-based iteration number.
        loss: ``f`` at the start of the iteration.
        grad_norm: ``||g||`` at the start of the iteration.
        radius: Radius used for the subproblem.
        trial_loss: ``f`` at the trial point.
        pred: Predicted reduction.
        ratio: Actual over predicted reduction.
        step_norm: ``||s||``.
        accepted: Whether the trial point was accepted.
        reason: Reason of the radius decision.
        exit: Exit reason of the subproblem solver.
        subproblem_iterations: Curvature products used by the solver.
    """

    iteration: int
    loss: float
    grad_norm: float
    radius: float
    trial_loss: float
    pred: float
    ratio: float
    step_norm: float
    accepted: bool
    reason: str
    exit: str
    subproblem_iterations: int


def minimize_trust_region(
    fun: Callable[[torch.Tensor], float],
    grad: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    *,
    solver: SubproblemSolver,
    policy: RadiusPolicy,
    radius: float,
    hessp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    max_iter: int = 200,
    gtol: float = 1e-8,
    update_on_reject: bool | None = None,
) -> tuple[torch.Tensor, list[IterationRecord]]:
    """Minimise ``fun`` by a trust-region method.

    Each iteration solves the subproblem at the current point, evaluates ``fun`` at
    the trial point and lets :func:`decide` accept or reject it and set the radius.
    After an accepted step the solver's memory receives ``(s, g_new - g_old)``.

    Args:
        fun: Objective, ``x -> f(x)``.
        grad: Gradient, ``x -> g(x)``.
        x0: Starting point (flat 1-D tensor; not modified).
        solver: Subproblem solver.
        policy: Radius policy (validated here).
        radius: Initial radius, finite and > 0.
        hessp: ``(x, v) -> H(x) v``; required when ``solver.needs_matvec``.
        max_iter: Iteration limit, rejected iterations included (default 200).
        gtol: Stop when ``||g|| <= gtol`` (default 1e-8).
        update_on_reject: Also feed ``(s, g(x + s) - g(x))`` of rejected steps (with a
            finite trial loss) to the solver's memory, at the cost of one gradient per
            rejection.  Default ``None``: ``solver.has_memory``.  SR1 learns from every
            pair, as in the textbook SR1 trust-region method; without it a model with a
            spurious direction of negative curvature can be rejected forever once the
            radius sits at ``radius_min``, because nothing changes between attempts.

    Returns:
        ``(x, history)``: the final point and one :class:`IterationRecord` per
        iteration (its length is the iteration count, comparable to scipy's ``nit``).

    Raises:
        ConfigError: Bad policy, radius, or a missing ``hessp``.
        NonFiniteError: ``f`` or ``g`` is not finite at ``x0``.
    """
    policy.validate()
    if not math.isfinite(radius) or radius <= 0.0:
        raise ConfigError(f"initial trust-region radius must be finite and > 0, got {radius}")
    if solver.needs_matvec and hessp is None:
        raise ConfigError(f"the {solver.name} subproblem solver needs hessp")
    if update_on_reject is None:
        update_on_reject = bool(getattr(solver, "has_memory", False))
    x = x0.detach().clone()
    loss = float(fun(x))
    g = grad(x)
    grad_norm = math.sqrt(default_dot(g, g))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise NonFiniteError(f"objective or gradient is not finite at the starting point (f={loss})")

    history: list[IterationRecord] = []
    for iteration in range(max_iter):
        if grad_norm <= gtol:
            break
        # Bind the current point now: the lambda must not see later updates of x.
        matvec = (lambda v, at=x: hessp(at, v)) if hessp is not None and solver.needs_matvec else None
        result = solver.solve(g, radius, matvec)
        step_norm = math.sqrt(default_dot(result.step, result.step))
        trial = x + result.step
        trial_loss = float(fun(trial))
        decision = decide(policy, radius, loss, trial_loss, result.pred, step_norm)
        history.append(
            IterationRecord(
                iteration=iteration,
                loss=loss,
                grad_norm=grad_norm,
                radius=radius,
                trial_loss=trial_loss,
                pred=result.pred,
                ratio=decision.ratio,
                step_norm=step_norm,
                accepted=decision.accepted,
                reason=decision.reason,
                exit=result.exit,
                subproblem_iterations=result.iterations,
            )
        )
        radius = decision.radius
        if decision.accepted:
            trial_grad = grad(trial)
            solver.update(result.step, trial_grad - g)
            x, loss, g = trial, trial_loss, trial_grad
            grad_norm = math.sqrt(default_dot(g, g))
        elif update_on_reject and math.isfinite(trial_loss):
            solver.update(result.step, grad(trial) - g)
    return x, history
