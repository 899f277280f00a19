"""Accept/reject and radius update of a trust-region step (docs/algorithms.md §0).

:func:`decide` is a pure function of floats.  In distributed runs the caller feeds it
allreduced scalars, so every rank takes the same decision and ranks never diverge;
this is the one place where the radius changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from hpcopt.errors import ConfigError

REASONS = ("accepted", "expanded", "rejected_ratio", "rejected_pred", "rejected_nonfinite")


@dataclass(frozen=True)
class RadiusPolicy:
    """Thresholds and factors of the radius update.

    Attributes:
        eta1: Reject when ``ratio < eta1`` (default 0.25).
        eta2: Expand when ``ratio > eta2`` and the step is long (default 0.75).
        gamma_inc: Expansion factor (default 1.2).
        gamma_dec: Shrink factor on rejection (default 0.9).
        radius_min: Lower clamp of the radius (default 1e-3).
        radius_max: Upper clamp of the radius (default 2.0).
        expand_fraction: Expand only when ``||s|| >= expand_fraction * radius``
            (default 0.9), i.e. when the radius actually limited the step.
        shrink_to_step: On a rejection shrink from ``min(radius, ||s||)`` instead of
            from the radius (default off).  A rejected step shorter than the radius
            (an interior CG solution, an average of local steps) would otherwise come
            back unchanged until the radius has shrunk below it.

    The defaults are the global defaults of the APTS papers' code.
    """

    eta1: float = 0.25
    eta2: float = 0.75
    gamma_inc: float = 1.2
    gamma_dec: float = 0.9
    radius_min: float = 1e-3
    radius_max: float = 2.0
    expand_fraction: float = 0.9
    shrink_to_step: bool = False

    def validate(self) -> None:
        """Raise :class:`ConfigError` unless every field is a sensible finite number."""
        if not isinstance(self.shrink_to_step, bool):
            raise ConfigError(f"radius policy shrink_to_step must be true or false, got {self.shrink_to_step!r}")
        for field in fields(self):
            if field.name == "shrink_to_step":
                continue
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"radius policy {field.name} must be a finite number, got {value!r}")
        if not 0.0 < self.eta1 <= self.eta2 < 1.0:
            raise ConfigError(f"radius policy needs 0 < eta1 <= eta2 < 1, got eta1={self.eta1}, eta2={self.eta2}")
        if not 0.0 < self.gamma_dec < 1.0:
            raise ConfigError(f"radius policy gamma_dec must be in (0, 1), got {self.gamma_dec}")
        if self.gamma_inc < 1.0:
            raise ConfigError(f"radius policy gamma_inc must be >= 1, got {self.gamma_inc}")
        if not 0.0 < self.radius_min <= self.radius_max:
            raise ConfigError(
                "radius policy needs 0 < radius_min <= radius_max, "
                f"got radius_min={self.radius_min}, radius_max={self.radius_max}"
            )
        if not 0.0 < self.expand_fraction <= 1.0:
            raise ConfigError(f"radius policy expand_fraction must be in (0, 1], got {self.expand_fraction}")

    @classmethod
    def from_options(cls, options: object, prefix: str = "", **overrides: float | bool) -> RadiusPolicy:
        """The policy named by an optimizer config's fields ``{prefix}eta1``, ``{prefix}gamma_inc``, ….

        Fields the config lacks keep their defaults; ``overrides`` win over both
        (e.g. the local ball's ``radius_min``/``radius_max``).
        """
        values = {f.name: getattr(options, prefix + f.name) for f in fields(cls) if hasattr(options, prefix + f.name)}
        values.update(overrides)
        return cls(**values)

    @classmethod
    def local_defaults(cls) -> RadiusPolicy:
        """Defaults of the local (per-rank) solves of APTS: eta 0.3/0.7, x1.5, x0.6."""
        return cls(eta1=0.3, eta2=0.7, gamma_inc=1.5, gamma_dec=0.6)

    @classmethod
    def classic(cls) -> RadiusPolicy:
        """Deterministic textbook behaviour close to scipy's ``trust-ncg``.

        Accept at ``ratio >= 0.15``, shrink x0.25, expand x2 when ``ratio > 0.75``,
        radius in ``[1e-12, 1e3]`` (scipy has no lower clamp; 1e-12 stands in for it).
        Unlike scipy, an accepted step with ``0.15 <= ratio < 0.25`` keeps the radius,
        because §0 shrinks only on rejection.
        """
        return cls(eta1=0.15, eta2=0.75, gamma_inc=2.0, gamma_dec=0.25, radius_min=1e-12, radius_max=1e3)


@dataclass(frozen=True)
class Decision:
    """Outcome of :func:`decide`.

    Attributes:
        accepted: Whether the trial point becomes the new iterate.
        ratio: Actual over predicted reduction (NaN when undefined).
        radius: The radius for the next iteration.
        reason: One of ``accepted``, ``expanded``, ``rejected_ratio``,
            ``rejected_pred``, ``rejected_nonfinite``.
    """

    accepted: bool
    ratio: float
    radius: float
    reason: str


def decide(
    policy: RadiusPolicy,
    radius: float,
    loss: float,
    trial_loss: float,
    pred: float,
    step_norm: float,
    reference: float | None = None,
) -> Decision:
    """Accept or reject a trial step and update the radius (docs/algorithms.md §0).

    Args:
        policy: Thresholds and factors.
        radius: Current radius.
        loss: ``f(theta)``.
        trial_loss: ``f(theta + s)``.
        pred: Predicted reduction ``m(0) - m(s)`` of the model.
        step_norm: ``||s||``.
        reference: A non-monotone reference value ``f_ref >= loss`` (None: monotone).
            The ratio is then ``max(ratio, (f_ref - trial_loss) / (f_ref - loss + pred))``
            (Toint 1997; :mod:`hpcopt.numerics.trust_region.nonmonotone`), and both the
            acceptance and the radius update use it.

    Returns:
        The :class:`Decision`.  A non-finite trial loss (or a ratio that overflows),
        ``pred <= 0`` or non-finite, and ``ratio < eta1`` all reject with
        ``radius <- max(radius_min, gamma_dec * radius)`` (``gamma_dec * min(radius, ||s||)``
        with ``shrink_to_step``).
    """
    base = min(radius, step_norm) if policy.shrink_to_step and step_norm > 0 else radius
    shrunk = max(policy.radius_min, policy.gamma_dec * base)
    nan = float("nan")
    if not (math.isfinite(trial_loss) and math.isfinite(loss)):
        return Decision(False, nan, shrunk, "rejected_nonfinite")
    # A model that predicts no decrease cannot justify a step, whatever f did.
    if not math.isfinite(pred) or pred <= 0.0:
        return Decision(False, nan, shrunk, "rejected_pred")
    ratio = (loss - trial_loss) / pred
    if reference is not None and math.isfinite(reference) and reference > loss:
        ratio = max(ratio, (reference - trial_loss) / (reference - loss + pred))
    if not math.isfinite(ratio):
        return Decision(False, ratio, shrunk, "rejected_nonfinite")
    if ratio < policy.eta1:
        return Decision(False, ratio, shrunk, "rejected_ratio")
    if ratio > policy.eta2 and step_norm >= policy.expand_fraction * radius:
        return Decision(True, ratio, min(policy.radius_max, policy.gamma_inc * radius), "expanded")
    return Decision(True, ratio, radius, "accepted")
