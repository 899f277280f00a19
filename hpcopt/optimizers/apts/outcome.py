"""How an APTS outer iteration is reported: the run log's record of its ratio test.

APTS-D (and APTS-P through it) and APTS-IP end an outer iteration with one
:func:`~hpcopt.numerics.trust_region.decide` on the combined step.  This module turns
that decision and the step's scalars into the
:class:`~hpcopt.optimizers.base.StepResult` that the trainer logs, so that the
variants report the same fields under the same names.  It imports the optimizer
base class module and the trust-region decision only.
"""

from __future__ import annotations

from collections.abc import Mapping

from hpcopt.numerics.trust_region import Decision
from hpcopt.optimizers.base import StepResult


def outer_step_result(
    loss: float,
    radius: float,
    step_norm: float,
    decision: Decision,
    pred: float,
    trial_loss: float,
    extras: Mapping[str, object],
) -> StepResult:
    """The record of an outer iteration from θ_k with ``f(θ_k) = loss`` under the radius ``radius``.

    ``pred`` and ``trial_loss`` are the predicted reduction and ``f(θ_k + s)`` that
    ``decision`` was taken from; ``extras`` adds the variant's own fields.
    """
    return StepResult(
        loss=loss,
        radius=radius,
        step_norm=step_norm,
        ratio=decision.ratio,
        accepted=decision.accepted,
        extras={"pred": pred, "trial_loss": trial_loss, "reason": decision.reason, **extras},
    )
