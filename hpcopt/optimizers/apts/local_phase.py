"""The communication-free local trust-region loop shared by APTS-P and APTS-IP.

The local model is given as callables of the local step ``s`` (in whatever
coordinates the caller works in: a rank's owned block, or a pipeline stage's
parameters), so the loop knows nothing of decompositions.  It is the loop of
APTS-D's local phase (ALGORITHMS.md §1 step 3): L iterations of §0 from ``s = 0``
inside a ball, with L-SR1 learning from accepted and rejected trials alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hpcopt.numerics.krylov.cg import MatVec
from hpcopt.numerics.trust_region import RadiusPolicy, SubproblemSolver, decide


@dataclass
class LocalModel:
    """The local objective as functions of the local step ``s``.

    Attributes:
        value: ``s ↦ φ(s)``.
        value_and_grad: ``s ↦ (φ(s), ∇φ(s))`` (the gradient in the caller's coordinates).
        curvature: ``s ↦`` a curvature product at ``s``; needed by ``steihaug`` only.
    """

    value: Callable[[torch.Tensor], float]
    value_and_grad: Callable[[torch.Tensor], tuple[float, torch.Tensor]]
    curvature: Callable[[torch.Tensor], MatVec] | None = None


@dataclass
class LocalResult:
    """The local step, its decrease ``φ(0) − φ(s)`` and the iteration counts."""

    step: torch.Tensor
    decrease: float
    accepted: int
    rejected: int


def local_trust_region(
    model: LocalModel,
    solver: SubproblemSolver,
    policy: RadiusPolicy,
    *,
    ball: float,
    iterations: int,
    value0: float,
    grad0: torch.Tensor,
) -> LocalResult:
    """``iterations`` TR iterations on ``model`` from ``s = 0``, keeping ``‖s‖ ≤ ball``."""
    step = torch.zeros_like(grad0)
    model_value, model_grad = value0, grad0.clone()
    radius = ball
    solver.reset()
    accepted = rejected = 0
    for iteration in range(iterations):
        room = ball - float(step.norm())
        if room <= 1e-9 * ball:
            break
        matvec = model.curvature(step) if solver.needs_matvec and model.curvature is not None else None
        result = solver.solve(model_grad, min(radius, room), matvec)
        if not (result.pred > 0 and math.isfinite(result.pred)):
            break  # stationary local model
        trial = step + result.step
        trial_grad: torch.Tensor | None = None
        if iteration == iterations - 1 and not solver.has_memory:
            trial_value = model.value(trial)  # nobody needs the last gradient
        else:
            trial_value, trial_grad = model.value_and_grad(trial)
        decision = decide(policy, radius, model_value, trial_value, result.pred, float(result.step.norm()))
        if trial_grad is not None and math.isfinite(trial_value):
            solver.update(result.step, trial_grad - model_grad)
        if decision.accepted:
            step, model_value = trial, trial_value
            if trial_grad is not None:
                model_grad = trial_grad
            accepted += 1
        else:
            rejected += 1
        radius = decision.radius
    return LocalResult(step, value0 - model_value, accepted, rejected)
