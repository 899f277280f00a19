"""Options shared by the APTS family (APTS-D, APTS-P, APTS-IP): the two radius policies.

Each variant's config dataclass derives from :class:`APTSOptions` and adds only
what is its own, so the documented defaults of §0 live in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hpcopt.config import require
from hpcopt.numerics.curvature import parse_curvature
from hpcopt.numerics.trust_region import RadiusPolicy

SOLVERS = ("cauchy", "steihaug", "lsr1", "subspace")
#: When a local phase ends (``local_stop``).
LOCAL_STOPS = ("iterations", "settled")


@dataclass
class APTSOptions:
    """Trust-region options common to the APTS variants (defaults: docs/algorithms.md §0).

    Attributes:
        radius: initial global trust-region radius Δ₀ (0.1).
        radius_min: lower bound Δ_min (1e-3).
        radius_max: upper bound Δ_max (2.0).
        eta1: accept when ρ ≥ eta1 (0.25).
        eta2: expand when ρ > eta2 and ‖s‖ ≥ 0.9Δ (0.75).
        gamma_inc: expansion factor (1.2).
        gamma_dec: shrink factor (0.9).
        shrink_to_step: on a rejection shrink from min(Δ, ‖s‖) instead of Δ (off) *(ours)*:
            a rejected step shorter than Δ is otherwise tried again unchanged.
        nonmonotone: window M of the non-monotone acceptance of the combined step (1: monotone)
            *(ours, Toint 1997)*: ρ = max(ρ, (f_ref − f(θ+s))/(f_ref − f(θ) + pred)), f_ref the
            largest f(θ) of the last M outer iterations.
        local_iterations: L, local TR iterations per outer iteration (3).
        local_stop: ``iterations`` (L iterations, or until the ball is full) or ``settled``
            *(ours)*: at most L, ending after an accepted interior step that solved the
            local model, or after the first rejection that follows an accepted step.
        local_solver: ``cauchy``, ``steihaug``, ``lsr1`` or ``subspace`` (lsr1).
        local_eta1: local phase: accept a local step when ρ ≥ local_eta1 (0.3).
        local_eta2: local phase: expand the local radius when ρ > local_eta2 (0.7).
        local_gamma_inc: local phase: radius expansion factor (1.5).
        local_gamma_dec: local phase: radius shrink factor (0.6).
        memory: L-SR1 memory (5).
        curvature: products for ``steihaug`` and ``subspace``: ``hessian`` or ``ggn`` (hessian).
        max_cg_iterations: cap on Steihaug CG iterations (20).
        cg_rtol: relative residual at which the CG of ``steihaug`` and ``lsr1`` solves stops
            (None: the superlinear forcing term min(0.5, √‖g‖)) *(ours)*.
        subspace_steps: ``subspace`` solver: the last steps that span its subspace with the
            gradient (2) *(ours)*.
    """

    option_prefix: ClassVar[str] = "apts"  # names the optimizer in error messages

    radius: float = 0.1
    radius_min: float = 1e-3
    radius_max: float = 2.0
    eta1: float = 0.25
    eta2: float = 0.75
    gamma_inc: float = 1.2
    gamma_dec: float = 0.9
    shrink_to_step: bool = False
    nonmonotone: int = 1
    local_iterations: int = 3
    local_stop: str = "iterations"
    local_solver: str = "lsr1"
    local_eta1: float = 0.3
    local_eta2: float = 0.7
    local_gamma_inc: float = 1.5
    local_gamma_dec: float = 0.6
    memory: int = 5
    curvature: str = "hessian"
    max_cg_iterations: int = 20
    cg_rtol: float | None = None
    subspace_steps: int = 2

    def validate(self) -> None:
        name = self.option_prefix
        require(self.radius > 0, f"{name}: radius must be > 0, got {self.radius}")
        require(
            0 < self.radius_min <= self.radius <= self.radius_max,
            f"{name}: need 0 < radius_min <= radius <= radius_max, got {self.radius_min}, "
            f"{self.radius}, {self.radius_max}",
        )
        require(
            isinstance(self.nonmonotone, int) and self.nonmonotone >= 1,
            f"{name}: nonmonotone (the window M) must be an integer >= 1, got {self.nonmonotone}",
        )
        require(self.local_iterations >= 0, f"{name}: local_iterations must be >= 0, got {self.local_iterations}")
        require(
            self.local_stop in LOCAL_STOPS,
            f"{name}: local_stop must be one of {', '.join(LOCAL_STOPS)}, got '{self.local_stop}'",
        )
        require(
            self.local_solver in SOLVERS,
            f"{name}: unknown local_solver '{self.local_solver}' (choose from {', '.join(SOLVERS)})",
        )
        require(self.memory >= 1, f"{name}: memory must be >= 1, got {self.memory}")
        require(self.max_cg_iterations >= 1, f"{name}: max_cg_iterations must be >= 1")
        require(
            self.cg_rtol is None or 0.0 < self.cg_rtol < 1.0,
            f"{name}: cg_rtol must be in (0, 1) or None, got {self.cg_rtol}",
        )
        require(self.subspace_steps >= 0, f"{name}: subspace_steps must be >= 0, got {self.subspace_steps}")
        parse_curvature(self.curvature)
        self.global_policy().validate()
        self.local_policy(1.0).validate()

    def global_policy(self) -> RadiusPolicy:
        return RadiusPolicy.from_options(self)

    def local_policy(self, ball: float) -> RadiusPolicy:
        # The local radius lives inside its ball (Δ/P or Δ/√P); its floor is relative to it.
        return RadiusPolicy.from_options(self, "local_", radius_min=1e-3 * ball, radius_max=ball)
