"""Distributed Hessian-free (Newton–Krylov) with negative-curvature steps (docs/algorithms.md §4).

One outer iteration on the global batch B = ∪ B_r (every rank holds the whole model):

1. ``[g; f]`` at θ_k — one allreduce(n+1).
2. A curvature operator ``B`` (Gauss–Newton or Hessian) linearised at θ_k on the
   curvature sub-batch C ⊂ B (``curvature_fraction`` of the rows).  The
   distributed product is ``Bv = Σ_r w_r B_r v`` with ``w_r = |C_r|/|C|``
   (:class:`~hpcopt.distributed.data_parallel.DistributedCurvature`): one
   allreduce(n) per product and nothing else, because every Krylov vector is
   replicated and all inner products are local (the k of allreduce(n+k) is 0).
3. A Krylov solve: ``cg`` (Martens), ``bicgstab`` (He et al.) or ``steihaug``
   (trust region of §0, no damping).
4. A step chosen from the Newton-type candidate (after backtracking over the CG
   iterates and an Armijo line search, or the trust-region test) and, when a
   direction with ``dᵀBd < 0`` was met, a line-searched step along ±d; the one that
   lowers f more is taken.  Each trial value is one allreduce of one scalar.

Vector updates go through ``self.kernels`` where there is a fused backend (GPU):
Martens' CG and Steihaug's CG fuse their steps, and every trial point θ + s is
one ``tr_trial`` pass; BiCGSTAB stays on torch ops.

The curvature sub-batch is ``strided`` by default (rank-count invariant; see
:mod:`hpcopt.distributed.curvature_batch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hpcopt.config import require
from hpcopt.distributed.curvature_batch import sampled_curvature
from hpcopt.distributed.data_parallel import DistributedCurvature, DistributedObjective
from hpcopt.errors import NonFiniteError
from hpcopt.numerics.curvature import CurvatureKind, parse_curvature
from hpcopt.numerics.krylov.cg import steihaug_cg
from hpcopt.numerics.krylov.martens import HFSolveResult, bicgstab, martens_cg
from hpcopt.numerics.trust_region import RadiusPolicy, decide
from hpcopt.optimizers.base import Optimizer, StepResult
from hpcopt.optimizers.curvature_sample import require_curvature_sample

SOLVERS = ("cg", "bicgstab", "steihaug")


@dataclass
class HFConfig:
    """Options of ``--optimizer hf``.

    Attributes:
        solver: ``cg`` (Martens: SPD system, warm start, backtracking, Armijo),
            ``bicgstab`` (indefinite (H+λI)p = −g) or ``steihaug`` (trust region) (cg).
        curvature: ``ggn`` (Gauss–Newton, PSD) or ``hessian`` (ggn).
        curvature_fraction: share of the global batch used for curvature products (0.1).
        curvature_sampling: ``strided`` (rank-count invariant) or ``head`` (strided).
        damping: initial Levenberg–Marquardt λ; 0 disables damping and its adaptation (1.0).
        adapt_damping: ρ < 0.25 → λ·damping_inc, ρ > 0.75 → λ·damping_dec (on).
        damping_inc: factor on λ after a poor step (1.5).
        damping_dec: factor on λ after a good step (2/3).
        damping_min: lower bound on λ (1e-6).
        damping_max: upper bound on λ (1e6).
        max_iterations: curvature products per Krylov solve (50).
        rtol: stop the solve when ‖r‖ ≤ rtol·‖g‖ (1e-8).
        progress_tol: Martens' relative-progress threshold ε (5e-4).
        warm_start: CG/BiCGSTAB start from this multiple of the previous solution (0.95; 0 = cold).
        backtrack_iterates: evaluate f on the stored CG iterates and keep the best (on).
        armijo: sufficient-decrease constant c of the line searches (1e-2).
        line_search_shrink: step factor per backtracking trial (0.8).
        line_search_max: trials per line search (20).
        negative_curvature: try steps along directions with dᵀBd < 0 (on).
        curvature_step_scale: the ±d line search starts at length scale·|κ|, κ = dᵀBd/‖d‖² (1.0).
        curvature_step_max: cap on that initial length (10.0).
        radius: initial trust-region radius of ``steihaug`` (1.0) *(ours)*.
        radius_min: lower bound on that radius (1e-6).
        radius_max: upper bound on that radius (100.0).
        eta1: accept the step when ρ ≥ eta1 (0.25).
        eta2: expand the radius when ρ > eta2 (0.75).
        gamma_inc: radius expansion factor (2.0).
        gamma_dec: radius shrink factor (0.5).
    """

    solver: str = "cg"
    curvature: str = "ggn"
    curvature_fraction: float = 0.1
    curvature_sampling: str = "strided"
    damping: float = 1.0
    adapt_damping: bool = True
    damping_inc: float = 1.5
    damping_dec: float = 2.0 / 3.0
    damping_min: float = 1e-6
    damping_max: float = 1e6
    max_iterations: int = 50
    rtol: float = 1e-8
    progress_tol: float = 5e-4
    warm_start: float = 0.95
    backtrack_iterates: bool = True
    armijo: float = 1e-2
    line_search_shrink: float = 0.8
    line_search_max: int = 20
    negative_curvature: bool = True
    curvature_step_scale: float = 1.0
    curvature_step_max: float = 10.0
    radius: float = 1.0
    radius_min: float = 1e-6
    radius_max: float = 100.0
    eta1: float = 0.25
    eta2: float = 0.75
    gamma_inc: float = 2.0
    gamma_dec: float = 0.5

    def validate(self) -> None:
        require(self.solver in SOLVERS, f"hf: unknown solver '{self.solver}' (choose from {', '.join(SOLVERS)})")
        parse_curvature(self.curvature)
        require_curvature_sample("hf", self.curvature_fraction, self.curvature_sampling)
        require(self.damping >= 0, f"hf: damping must be >= 0, got {self.damping}")
        require(
            self.damping_inc >= 1 and 0 < self.damping_dec <= 1, "hf: need damping_inc >= 1 and 0 < damping_dec <= 1"
        )
        require(0 < self.damping_min <= self.damping_max, "hf: need 0 < damping_min <= damping_max")
        require(self.max_iterations >= 1, f"hf: max_iterations must be >= 1, got {self.max_iterations}")
        require(self.rtol >= 0 and self.progress_tol >= 0, "hf: rtol and progress_tol must be >= 0")
        require(0 <= self.warm_start <= 1, f"hf: warm_start must be in [0, 1], got {self.warm_start}")
        require(0 < self.armijo < 1, f"hf: armijo must be in (0, 1), got {self.armijo}")
        require(0 < self.line_search_shrink < 1, "hf: line_search_shrink must be in (0, 1)")
        require(self.line_search_max >= 1, "hf: line_search_max must be >= 1")
        require(self.curvature_step_scale > 0 and self.curvature_step_max > 0, "hf: curvature step sizes must be > 0")
        require(
            0 < self.radius_min <= self.radius <= self.radius_max,
            f"hf: need 0 < radius_min <= radius <= radius_max, got {self.radius_min}, {self.radius}, {self.radius_max}",
        )
        self.policy().validate()

    def policy(self) -> RadiusPolicy:
        return RadiusPolicy.from_options(self)


class HessianFree(Optimizer):
    name = "hf"
    config_class = HFConfig
    objective: DistributedObjective
    state_attributes = ("damping", "radius", "previous", "newton_steps", "curvature_steps")

    def __init__(self, objective: DistributedObjective, config: HFConfig) -> None:
        super().__init__(objective, config)
        self.kind: CurvatureKind = parse_curvature(config.curvature)
        self.damping = config.damping
        self.radius = config.radius if config.solver == "steihaug" else math.nan
        self.policy = config.policy()
        self.previous: torch.Tensor | None = None
        self.newton_steps = 0
        self.curvature_steps = 0
        self.evaluations = 0

    # -- pieces -----------------------------------------------------------------

    def curvature_operator(self, damping: float) -> DistributedCurvature:
        """The distributed damped curvature at the current parameters, on the curvature sub-batch."""
        cfg = self.config
        operator, self.curvature_rows = sampled_curvature(
            self.objective, self.kind, cfg.curvature_fraction, cfg.curvature_sampling, damping, watch_negative=True
        )
        return operator

    def _value_at(self, theta: torch.Tensor, step: torch.Tensor) -> float:
        self.move_to(theta, step)
        self.evaluations += 1
        value = self.objective.value()
        return value if math.isfinite(value) else math.inf

    def _armijo(
        self,
        theta: torch.Tensor,
        loss: float,
        direction: torch.Tensor,
        slope: float,
        curvature: float,
        t: float,
        first_value: float | None = None,
    ) -> tuple[float, float]:
        """Backtrack t until f(θ+t·d) ≤ f + c·(t·slope + ½t²·curvature); returns (t, f) or (0, f)."""
        cfg = self.config
        value = first_value if first_value is not None else self._value_at(theta, t * direction)
        for trial in range(cfg.line_search_max):
            if value <= loss + cfg.armijo * (t * slope + 0.5 * t * t * min(curvature, 0.0)):
                return t, value
            if trial == cfg.line_search_max - 1:
                break
            t *= cfg.line_search_shrink
            value = self._value_at(theta, t * direction)
        return 0.0, loss

    def _curvature_candidate(
        self, theta: torch.Tensor, loss: float, grad: torch.Tensor, matvec: DistributedCurvature
    ) -> tuple[torch.Tensor, float] | None:
        """A line-searched step along ±d for the most negative-curvature direction met."""
        d = matvec.negative_direction
        if not self.config.negative_curvature or d is None:
            return None
        unit = d / d.norm()
        slope = float(torch.dot(grad, unit))
        if slope > 0:
            unit.neg_()
            slope = -slope
        kappa = matvec.negative_curvature
        length = min(self.config.curvature_step_scale * abs(kappa), self.config.curvature_step_max)
        t, value = self._armijo(theta, loss, unit, slope, kappa, length)
        if t == 0.0:
            return None
        return t * unit, value

    # -- one outer iteration ----------------------------------------------------

    def step(self) -> StepResult:
        cfg = self.config
        theta = self.flat.clone()
        evaluations_before = self.evaluations
        loss, grad_view = self.objective.value_and_grad()
        if not math.isfinite(loss):
            raise NonFiniteError(
                f"hf: the mini-batch loss is {loss} at step {self.steps + 1}; a Newton step cannot start from a "
                "non-finite value (lower the damping's floor or check the data)"
            )
        grad = grad_view.clone()
        damping = 0.0 if cfg.solver == "steihaug" else self.damping
        matvec = self.curvature_operator(damping)
        extras: dict[str, object] = {"damping": self.damping, "curvature_rows": self.curvature_rows}
        candidates: list[tuple[str, torch.Tensor, float]] = []
        ratio = math.nan
        radius_before = self.radius
        if cfg.solver == "steihaug":
            tr = steihaug_cg(matvec, grad, self.radius, rtol=None, max_iter=cfg.max_iterations, kernels=self.kernels)
            step_norm = float(tr.step.norm())
            trial = self._value_at(theta, tr.step)
            decision = decide(self.policy, self.radius, loss, trial, tr.pred, step_norm)
            self.radius = decision.radius
            ratio = decision.ratio
            if decision.accepted:
                candidates.append(("newton", tr.step, trial))
            extras.update(solver_exit=str(tr.exit), krylov_iterations=tr.iterations, pred=tr.pred)
        else:
            x0 = None
            if self.previous is not None and cfg.warm_start > 0:
                x0 = cfg.warm_start * self.previous
            solve = martens_cg if cfg.solver == "cg" else bicgstab
            # BiCGSTAB's updates match no fused kernel; Martens' CG fuses its step.
            options = {"progress_tol": cfg.progress_tol, "kernels": self.kernels} if cfg.solver == "cg" else {}
            result: HFSolveResult = solve(
                matvec,
                grad,
                x0=x0,
                max_iter=cfg.max_iterations,
                rtol=cfg.rtol,
                **options,
            )
            if bool(torch.isfinite(result.step).all()):
                self.previous = result.step.clone()
            else:
                self.previous = None
            extras.update(solver_exit=result.exit, krylov_iterations=result.iterations)
            newton = self._newton_candidate(theta, loss, grad, result)
            ratio = newton[3]
            if newton[0] is not None:
                candidates.append(("newton", newton[0], newton[1]))
            extras["line_search_t"] = newton[2]
        curvature = self._curvature_candidate(theta, loss, grad, matvec)
        if curvature is not None:
            candidates.append(("curvature", *curvature))
        extras["negative_curvature"] = matvec.negative_curvature
        chosen = min(candidates, key=lambda c: c[2]) if candidates else None
        if chosen is not None and chosen[2] < loss:
            self.move_to(theta, chosen[1])
            step_norm = float(chosen[1].norm())
            if chosen[0] == "newton":
                self.newton_steps += 1
            else:
                self.curvature_steps += 1
            extras["chosen"] = chosen[0]
            accepted = True
        else:
            self.flat.copy_(theta)  # bit-identical θ_k
            step_norm = 0.0
            extras["chosen"] = "none"
            accepted = False
        self.steps += 1
        extras.update(
            curvature_products=matvec.products,
            value_evaluations=self.evaluations - evaluations_before,
            newton_steps=self.newton_steps,
            curvature_steps=self.curvature_steps,
        )
        return StepResult(
            loss=loss, radius=radius_before, step_norm=step_norm, ratio=ratio, accepted=accepted, extras=extras
        )

    def _newton_candidate(
        self, theta: torch.Tensor, loss: float, grad: torch.Tensor, result: HFSolveResult
    ) -> tuple[torch.Tensor | None, float, float, float]:
        """Backtracking over iterates, ρ and the damping update, Armijo: (step, f, t, ρ)."""
        cfg = self.config
        # Martens: from the last iterate backwards, keep going while f keeps falling.
        iterates = result.stored if (cfg.solver == "cg" and cfg.backtrack_iterates and result.stored) else []
        if iterates:
            best = iterates[-1]
            best_value = self._value_at(theta, best.step)
            for candidate in reversed(iterates[:-1]):
                value = self._value_at(theta, candidate.step)
                if value >= best_value:
                    break
                best, best_value = candidate, value
            step, model_value, value = best.step, best.model_value, best_value
        else:
            step, model_value = result.step, result.model_value
            value = self._value_at(theta, step) if bool(torch.isfinite(step).all()) else math.inf
        # ρ against the undamped model: m(p) = m_λ(p) − ½λ‖p‖².
        pred = -(model_value - 0.5 * self.damping * float(torch.dot(step, step)))
        ratio = (loss - value) / pred if pred > 0 and math.isfinite(pred) and math.isfinite(value) else math.nan
        if cfg.adapt_damping and self.damping > 0:
            if not math.isfinite(ratio) or ratio < 0.25:
                self.damping = min(cfg.damping_max, self.damping * cfg.damping_inc)
            elif ratio > 0.75:
                self.damping = max(cfg.damping_min, self.damping * cfg.damping_dec)
        slope = float(torch.dot(grad, step))
        if not (slope < 0 and math.isfinite(slope)):
            return None, math.inf, 0.0, ratio  # not a descent direction (indefinite system)
        t, value = self._armijo(theta, loss, step, slope, 0.0, 1.0, first_value=value)
        if t == 0.0:
            return None, math.inf, 0.0, ratio
        return t * step, value, t, ratio
