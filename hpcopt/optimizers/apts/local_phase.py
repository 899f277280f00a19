"""The local phase of the APTS variants: a rank's first-order-consistent model and its iterations.

APTS-D, APTS-P and APTS-IP each describe their shard's objective as functions of the
local step ``s`` (the whole vector, an owned block, a stage's parameters).  This
module adds the first-order-consistency term ``cᵀs`` with ``c = g − g_r`` and runs
the package's one trust-region loop
(:func:`~hpcopt.numerics.trust_region.loop.trust_region_loop`) on that model from
``s = 0`` inside the local ball (docs/algorithms.md §1 step 2): L iterations, with L-SR1
learning from accepted and rejected trials alike.  Nothing here communicates; it
imports torch, the trust-region numerics and the APTS options only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hpcopt.numerics.krylov.cg import MatVec
from hpcopt.numerics.trust_region import SubproblemSolver
from hpcopt.numerics.trust_region.loop import TrustRegionModel, trust_region_loop
from hpcopt.optimizers.apts.options import APTSOptions


def first_order_consistent(
    value: Callable[[torch.Tensor], float],
    value_and_grad: Callable[[torch.Tensor], tuple[float, torch.Tensor]],
    curvature: Callable[[torch.Tensor], MatVec],
    correction: torch.Tensor | None,
    value_then_grad: Callable[[torch.Tensor], tuple[float, Callable[[], torch.Tensor]]] | None = None,
) -> TrustRegionModel:
    """The model ``s ↦ f_r(θ_k + s) + cᵀs`` of a rank's shard loss ``f_r``.

    Args:
        value: ``s ↦ f_r(θ_k + s)``.
        value_and_grad: ``s ↦ (f_r(θ_k + s), ∇f_r)`` with the gradient in the step's
            coordinates; it may be a buffer that the next evaluation overwrites.
        curvature: ``s ↦`` the curvature product of ``f_r`` at ``θ_k + s``, which is
            that of the model too: the correction is linear.
        correction: ``c``; ``None`` leaves ``f_r`` as it is.
        value_then_grad: ``s ↦ (f_r(θ_k + s), finish)``, ``finish()`` the gradient of
            ``value_and_grad`` from the same pass, later (optional; see
            :class:`~hpcopt.numerics.trust_region.loop.TrustRegionModel`).
    """

    def shifted(loss: float, step: torch.Tensor) -> float:
        return loss if correction is None else loss + float(correction.dot(step))

    def shifted_grad(grad: torch.Tensor) -> torch.Tensor:
        # A copy either way: the caller's gradient may be a buffer the next pass overwrites.
        return grad.clone() if correction is None else grad + correction

    def corrected_value(step: torch.Tensor) -> float:
        return shifted(value(step), step)

    def corrected_value_and_grad(step: torch.Tensor) -> tuple[float, torch.Tensor]:
        loss, grad = value_and_grad(step)
        return shifted(loss, step), shifted_grad(grad)

    def corrected_value_then_grad(step: torch.Tensor) -> tuple[float, Callable[[], torch.Tensor]]:
        assert value_then_grad is not None
        loss, finish = value_then_grad(step)
        return shifted(loss, step), lambda: shifted_grad(finish())

    return TrustRegionModel(
        value=corrected_value,
        value_and_grad=corrected_value_and_grad,
        curvature=curvature,
        value_then_grad=None if value_then_grad is None else corrected_value_then_grad,
    )


@dataclass
class LocalStep:
    """The outcome of a local phase.

    Attributes:
        step: The local step ``s_r``.
        decrease: Its model decrease ``pred_r = φ(0) − φ(s_r)``.
        counts: ``local_accepted`` and ``local_rejected`` iterations, for the run log.
    """

    step: torch.Tensor
    decrease: float
    counts: dict[str, int]


def local_phase(
    model: TrustRegionModel,
    solver: SubproblemSolver,
    options: APTSOptions,
    *,
    ball: float,
    value0: float,
    grad0: torch.Tensor,
    radius: float | None = None,
) -> LocalStep:
    """At most ``options.local_iterations`` iterations on ``model`` from ``s = 0``, keeping ``‖s‖ ≤ ball``.

    With ``options.local_stop == "settled"`` the phase ends early where its model is
    solved inside the ball or stops describing the shard's loss
    (:func:`~hpcopt.numerics.trust_region.loop.trust_region_loop`'s ``stop_when_settled``).

    The solver starts from an empty memory; the local radius starts at ``radius``
    (default: ``ball``) under ``options.local_policy(ball)``.  ``value0`` and ``grad0``
    are the model's value and gradient at ``s = 0``.
    """
    solver.reset()
    result = trust_region_loop(
        model,
        solver,
        options.local_policy(ball),
        x0=torch.zeros_like(grad0),
        value0=value0,
        grad0=grad0,
        radius=ball if radius is None else min(radius, ball),
        max_iter=options.local_iterations,
        ball=ball,
        stop_when_settled=options.local_stop == "settled",
    )
    counts = {"local_accepted": result.accepted, "local_rejected": result.rejected}
    return LocalStep(result.x, value0 - result.value, counts)
