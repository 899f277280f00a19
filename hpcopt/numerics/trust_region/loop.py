"""The trust-region loop of docs/algorithms.md §0, on callables, and the serial reference built on it.

This module owns the order of operations of a trust-region iteration — subproblem
solve, trial evaluation, :func:`decide`, the solver's memory update, the move — for
every optimizer that iterates without talking to other ranks: the local phases of
APTS-D, APTS-P and APTS-IP (L iterations on a step from 0 inside a ball) and the
serial reference :func:`minimize_trust_region`, which the tests hold against scipy.
The objective arrives as functions of the iterate, so the loop knows nothing of
ranks, decompositions or pipelines; where those callers differ in a detail that
changes the numbers (how trial gradients are evaluated, when to stop, which norm),
the detail is a parameter of :func:`trust_region_loop`.  It imports torch, the
package's errors, the Krylov dot product and its sibling modules only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hpcopt.errors import ConfigError, NonFiniteError
from hpcopt.numerics.krylov.cg import MatVec, default_dot
from hpcopt.numerics.trust_region.radius import RadiusPolicy, decide
from hpcopt.numerics.trust_region.subproblem import SubproblemSolver

Norm = Callable[[torch.Tensor], float]


def tensor_norm(vector: torch.Tensor) -> float:
    """``‖v‖₂`` by ``torch.linalg.vector_norm``: the norm of the local phases."""
    return float(vector.norm())


def dot_norm(vector: torch.Tensor) -> float:
    """``√(v·v)`` by :func:`default_dot` (float64 accumulation): the norm of the serial reference."""
    return math.sqrt(default_dot(vector, vector))


@dataclass
class TrustRegionModel:
    """The objective as functions of the iterate ``x``.

    Attributes:
        value: ``x ↦ f(x)``.
        value_and_grad: ``x ↦ (f(x), ∇f(x))`` from one evaluation; needed with
            ``fused_gradient``.  The loop keeps the gradient across later calls, so
            it must not be a buffer that they overwrite.
        grad: ``x ↦ ∇f(x)``; needed without ``fused_gradient``.
        curvature: ``x ↦`` a curvature product at ``x``; needed by solvers that
            ``needs_matvec`` (without it they run with no products).
        value_then_grad: ``x ↦ (f(x), finish)`` with ``finish()`` returning ``∇f(x)``
            from the same evaluation, called at most once and before the next call
            of any other field (a forward now, its backward only if wanted).  With
            ``fused_gradient``, a solver without memory and neither ``gtol`` nor
            ``record``, the loop uses it so that a trial which is rejected, or
            after which the loop stops, costs a forward only.
    """

    value: Callable[[torch.Tensor], float]
    value_and_grad: Callable[[torch.Tensor], tuple[float, torch.Tensor]] | None = None
    grad: Callable[[torch.Tensor], torch.Tensor] | None = None
    curvature: Callable[[torch.Tensor], MatVec] | None = None
    value_then_grad: Callable[[torch.Tensor], tuple[float, Callable[[], torch.Tensor]]] | None = None


@dataclass(frozen=True)
class IterationRecord:
    """One iteration of :func:`trust_region_loop` (kept with ``record=True``).

    Attributes:
        iteration: 0-based iteration number.
        loss: ``f`` at the start of the iteration.
        grad_norm: ``||g||`` at the start of the iteration.
        radius: Radius of the trust region (the subproblem's is at most this).
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


@dataclass
class LoopResult:
    """Where :func:`trust_region_loop` stopped.

    Attributes:
        x: The last accepted iterate (``x0`` itself when none was accepted).
        value: ``f(x)``.
        radius: The radius after the last decision.
        accepted: Accepted iterations.
        rejected: Rejected iterations.
        history: One :class:`IterationRecord` per iteration with ``record=True``, else empty.
    """

    x: torch.Tensor
    value: float
    radius: float
    accepted: int
    rejected: int
    history: list[IterationRecord] = field(default_factory=list)


def trust_region_loop(
    model: TrustRegionModel,
    solver: SubproblemSolver,
    policy: RadiusPolicy,
    *,
    x0: torch.Tensor,
    value0: float,
    grad0: torch.Tensor,
    radius: float,
    max_iter: int,
    ball: float | None = None,
    gtol: float | None = None,
    stop_on_no_decrease: bool = True,
    fused_gradient: bool = True,
    update_on_reject: bool = True,
    norm: Norm = tensor_norm,
    record: bool = False,
    stop_when_settled: bool = False,
) -> LoopResult:
    """Up to ``max_iter`` trust-region iterations on ``model`` from ``x0``.

    Each iteration solves the subproblem at the current point, evaluates the trial
    point, lets :func:`decide` accept or reject it and set the radius, and feeds
    ``(s, ∇f(x + s) − ∇f(x))`` to the solver's memory when that gradient is at hand.
    The solver is used as given (its memory is not reset here).  The defaults of the
    rule parameters are the APTS local phases' rules; :func:`minimize_trust_region`
    sets the serial reference's.

    Args:
        model: The objective.
        solver: Subproblem solver.
        policy: Radius policy (not validated here).
        x0: Starting point (not modified; kept as the result when nothing is accepted).
        value0: ``f(x0)``.
        grad0: ``∇f(x0)`` (copied).
        radius: Initial radius.
        max_iter: Iteration limit, rejected iterations included.
        ball: Keep ``norm(x) ≤ ball``: the subproblem radius is at most the room left,
            and the loop stops once less than ``1e-5·ball`` is left.  The ball is
            centred at the origin of ``x``'s coordinates, so a caller with a ball
            iterates on the step from its centre (``x0 = 0``).  ``None``: no ball.
        gtol: Stop when ``norm(∇f(x)) ≤ gtol``; ``None``: never test the gradient.
        stop_on_no_decrease: Stop, before evaluating the trial point, when the model
            predicts no finite decrease (a stationary model stays stationary).
            Otherwise the trial is evaluated and :func:`decide` rejects it.
        fused_gradient: Evaluate every trial point with ``model.value_and_grad``,
            as a forward/backward pass yields both at once — except on the last
            iteration of a solver without memory, where nothing needs the gradient
            and ``model.value`` is used.  Otherwise evaluate ``model.value`` and call
            ``model.grad`` only for an accepted trial, or for a rejected one with a
            finite value when ``update_on_reject``.
        update_on_reject: Also feed the pairs of rejected trials with a finite value
            to the solver's memory.  SR1 learns from every pair, as in the textbook
            SR1 trust-region method; without it a model with a spurious direction of
            negative curvature can be rejected forever once the radius sits at
            ``radius_min``, because nothing changes between attempts.
        norm: The norm of steps, gradients and the ball.
        record: Keep one :class:`IterationRecord` per iteration.
        stop_when_settled: Also stop after an accepted iteration whose subproblem
            step was interior and solved the model (exit ``converged``: the model is
            minimised and the function agreed), and after a rejected iteration that
            follows an accepted one (the model no longer describes the function at
            this radius; what was gained is kept).  ``max_iter`` stays the limit.

    Returns:
        The :class:`LoopResult`.
    """
    x, value, grad = x0, value0, grad0.clone()
    track_grad_norm = gtol is not None or record
    grad_norm = norm(grad) if track_grad_norm else math.nan
    accepted = rejected = 0
    history: list[IterationRecord] = []
    # Without memory the solver uses a trial's gradient only to go on from it, so it is
    # finished only then (the model must not move before: the pass holds its graph).
    deferred = (
        fused_gradient and model.value_then_grad is not None and not solver.has_memory and gtol is None and not record
    )
    pending: Callable[[], torch.Tensor] | None = None
    for iteration in range(max_iter):
        if gtol is not None and grad_norm <= gtol:
            break
        room = math.inf
        if ball is not None:
            room = ball - norm(x)
            # A step to the edge leaves a float32 rounding's worth of room (~1e-7·ball),
            # and an iteration on that would cost an evaluation for nothing.
            if room <= 1e-5 * ball:
                break
        if pending is not None:
            grad, pending = pending(), None
        matvec = model.curvature(x) if solver.needs_matvec and model.curvature is not None else None
        result = solver.solve(grad, min(radius, room), matvec)
        if stop_on_no_decrease and not (result.pred > 0 and math.isfinite(result.pred)):
            break
        step_norm = norm(result.step)
        trial = x + result.step
        trial_grad: torch.Tensor | None = None
        finish: Callable[[], torch.Tensor] | None = None
        if not fused_gradient:
            trial_value = model.value(trial)
        elif iteration == max_iter - 1 and not solver.has_memory:
            trial_value = model.value(trial)
        elif deferred:
            assert model.value_then_grad is not None
            trial_value, finish = model.value_then_grad(trial)
        else:
            assert model.value_and_grad is not None
            trial_value, trial_grad = model.value_and_grad(trial)
        decision = decide(policy, radius, value, trial_value, result.pred, step_norm)
        learn = decision.accepted or (update_on_reject and math.isfinite(trial_value))
        if not fused_gradient and learn:
            assert model.grad is not None
            trial_grad = model.grad(trial)
        if record:
            history.append(
                IterationRecord(
                    iteration=iteration,
                    loss=value,
                    grad_norm=grad_norm,
                    radius=radius,
                    trial_loss=trial_value,
                    pred=result.pred,
                    ratio=decision.ratio,
                    step_norm=step_norm,
                    accepted=decision.accepted,
                    reason=decision.reason,
                    exit=result.exit,
                    subproblem_iterations=result.iterations,
                )
            )
        if trial_grad is not None and learn and math.isfinite(trial_value):
            solver.update(result.step, trial_grad - grad)
        if decision.accepted:
            x, value = trial, trial_value
            pending = finish
            if trial_grad is not None:
                grad = trial_grad
                if track_grad_norm:
                    grad_norm = norm(grad)
            accepted += 1
        else:
            rejected += 1
        radius = decision.radius
        if stop_when_settled and (
            (decision.accepted and result.exit == "converged") or (not decision.accepted and accepted > 0)
        ):
            break
    return LoopResult(x, value, radius, accepted, rejected, history)


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
    """Minimise ``fun`` by a trust-region method: the serial reference.

    :func:`trust_region_loop` with no ball, the gradient evaluated only when it is
    used, every trial evaluated (a model that predicts no decrease is rejected by
    :func:`decide`) and norms accumulated in float64.

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
        update_on_reject: See :func:`trust_region_loop`.  Default ``None``:
            ``solver.has_memory``, at the cost of one gradient per rejection.

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
    if not (math.isfinite(loss) and math.isfinite(dot_norm(g))):
        raise NonFiniteError(f"objective or gradient is not finite at the starting point (f={loss})")

    result = trust_region_loop(
        TrustRegionModel(
            value=lambda point: float(fun(point)),
            grad=grad,
            curvature=None if hessp is None else _bind_hessp(hessp),
        ),
        solver,
        policy,
        x0=x,
        value0=loss,
        grad0=g,
        radius=radius,
        max_iter=max_iter,
        gtol=gtol,
        stop_on_no_decrease=False,
        fused_gradient=False,
        update_on_reject=update_on_reject,
        norm=dot_norm,
        record=True,
    )
    return result.x, result.history


def _bind_hessp(
    hessp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], MatVec]:
    # The product must stay at the point it was built for, whatever the loop does next.
    def curvature(at: torch.Tensor) -> MatVec:
        return lambda v: hessp(at, v)

    return curvature
