"""APTS-D: data-parallel additively preconditioned trust region (docs/algorithms.md §1).

One outer iteration on the global batch B = ∪ B_r:

1. ``[g; f]`` at θ_k — one allreduce(n+1).
2. Each rank builds the first-order-consistent local model
   ``f̃_r(θ) = f_r(θ) + (g − g_r)ᵀ(θ − θ_k)`` (so ∇f̃_r(θ_k) = g) and runs L
   trust-region iterations on it from θ_k, all inside the ball of radius Δ/P, with
   no communication at all.
3. ``[Σ s_r; Σ pred_r]`` — one allreduce(n+1) (n+2 with ``local_start=local``:
   Σ ‖s_r‖ rides along).  Because every ‖s_r‖ ≤ Δ/P, the sum
   obeys ‖s‖ ≤ Δ.
4. The trial value f(θ_k + s) decides with the ratio test of §0.  With a global
   pass the trial gradient rides in the same allreduce(n+1), since the pass needs
   it when the step is accepted.
5. Optional global pass: G trust-region iterations on f itself.

Traffic per outer iteration: 2n floats without the global pass, 3n with one; every
scalar (losses, predicted reductions) is packed into those buffers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from hpcopt.config import require
from hpcopt.distributed.curvature_batch import BatchCurvature, sampled_local_curvature, sampled_local_objective
from hpcopt.distributed.data_parallel import DistributedObjective
from hpcopt.errors import NonFiniteError
from hpcopt.numerics.curvature import CurvatureOperator, parse_curvature
from hpcopt.numerics.krylov.cg import MatVec
from hpcopt.numerics.trust_region import LSR1Solver, ReferenceWindow, decide, make_subproblem_solver
from hpcopt.optimizers.apts.local_phase import first_order_consistent, local_phase
from hpcopt.optimizers.apts.metric import METRICS, make_metric
from hpcopt.optimizers.apts.options import SOLVERS, APTSOptions
from hpcopt.optimizers.apts.outcome import outer_step_result
from hpcopt.optimizers.base import Optimizer, StepResult
from hpcopt.optimizers.curvature_sample import require_curvature_sample
from hpcopt.testing import faults

#: Where each local phase starts (``local_start``).
LOCAL_STARTS = ("ball", "step", "local")
#: How the local steps combine (``combine``).
COMBINES = ("sum", "average", "scaled")

#: §1 as published (APTS-D's defaults until 2026-12-04): the fourteen options on which APTS-D's
#: defaults differ from it, as ``--set`` takes them (both take §1's three local iterations).
#: APTS-P's defaults are these values.
SECTION_1_OPTIONS: Mapping[str, object] = MappingProxyType(
    {
        "combine": "sum",
        "local_start": "ball",
        "global_solver": "lsr1",
        "curvature": "hessian",
        "gamma_inc": 1.2,
        "gamma_dec": 0.9,
        "metric": "euclidean",
        "global_passes": 1,
        "local_solver": "lsr1",
        "local_stop": "iterations",
        "max_cg_iterations": 20,
        "curvature_fraction": 1.0,
        "local_fraction": 1.0,
        "cg_rtol": None,
    }
)


@dataclass
class APTSDConfig(APTSOptions):
    """Options of ``--optimizer apts-d``: those of :class:`APTSOptions` and

    Attributes:
        gamma_inc: expansion factor (2.0; §0: 1.2), Hessian-free's: from Δ₀ = 1e-3 the
            radius reaches the steps' scale within five outer iterations.
        gamma_dec: shrink factor (0.5; §0: 0.9): from Δ₀ = 10, two rejections halve it twice.
        curvature: products for ``steihaug`` and ``subspace``: ``hessian`` or ``ggn`` (ggn; §0: hessian).
            The Gauss–Newton matrix is positive semi-definite for a convex loss of the
            outputs (cross-entropy, squared residuals), so the global pass's CG takes full
            Newton-like steps without meeting negative curvature.
        foc: first-order-consistency term in the local model (on).
        global_passes: G, TR iterations on the global f after the combination (0; §1: 1).
            Without them an outer iteration sends 2n floats and costs about five
            gradient evaluations on MNIST; the PINN problems add two Gauss–Newton passes.
        global_solver: ``cauchy``, ``steihaug``, ``lsr1`` or ``subspace`` (steihaug; §1: lsr1):
            a Steihaug CG solve of the whole batch's model, up to ``max_cg_iterations`` products.
            ``subspace`` *(ours)*: the exact step of the same model in span{g, the last
            ``subspace_steps`` steps}; its curvature is a k × k block per rank, summed by
            one allreduce of k² scalars instead of one n-float allreduce per product.
        combine: ``average`` *(ours)*: local radius Δ, s and pred are the
            means over ranks, or ``sum`` (§1: local radius Δ/P, s = Σ s_r, pred = Σ pred_r).
            The sum sees only 1/P of the curvature of each local step, so its ratio
            degrades as Δ grows; the average keeps ‖s‖ ≤ Δ without that bias.
            ``scaled`` *(ours, the default)*: the average, stretched or shrunk along itself to the
            minimiser of the whole batch's Gauss–Newton model on that line (one local
            product on ``curvature_fraction`` of the shard and one scalar allreduce), pred
            that model's decrease: the mean of P disagreeing steps is shorter than each.
        predicted: what the ratio test divides by for the combined step: ``sum``
            (§1: Σ pred_r, the mean for ``average``) or ``model`` *(ours)*: the decrease
            −(gᵀs + ½ sᵀBs) that the global L-SR1 model B predicts for the combined
            step s itself (needs ``global_solver=lsr1``; no extra communication).
            Σ pred_r ignores how the local steps interact; the global model does not.
        local_start: the local radius each local phase starts from: ``step`` *(ours, the
            default)*: local_gamma_inc × the length of the
            last combined step, or the last start × local_gamma_dec^L after a combination
            that made no local progress, within [radius_min, ball]; ``local`` *(ours)*: the
            same from the mean length of the last local steps (one more scalar in the
            combination's allreduce); or ``ball`` (§1: the
            whole local ball).  From the ball, the
            first local step of an empty L-SR1 memory is a gradient step to its edge,
            which on a network is rejected more often than not.  The average of P local
            steps is shorter than they are where they disagree, more so as P grows, so
            ``step`` shrinks the next local phases with P and ``local`` does not.
        curvature_fraction: share of the batch that curvature products (``steihaug``) are
            taken on, the global pass's and the local phase's (0.35; §1: 1.0) *(ours, as Hessian-free's)*:
            a product then costs that share of a gradient; gradients stay the whole batch's.
        curvature_sampling: ``strided`` (the same rows at any P) or ``head`` (each rank's
            first rows) for ``curvature_fraction`` < 1 (strided) and ``local_fraction`` < 1.
        local_fraction: share of each rank's shard that its local phases see (0.25; §1: 1.0)
            *(ours)*: their values, gradients and curvature products are those of
            these rows only (sampled as ``curvature_sampling`` says), so a local
            iteration costs that share of one on the whole shard, and the local
            products ignore ``curvature_fraction``.  The first-order-consistency
            term uses the rows' gradient at θ_k (one more evaluation of that share per
            outer iteration); the gradient, the combined trial and the global pass
            stay the whole batch's.
        shard: how the ranks split each global batch: ``batch`` (contiguous slices of
            the shuffled batch) or ``spatial`` (PINNs: the batch ordered by the first
            coordinate, so each rank owns an interval of x; the thesis' PINN variant).
        local_iterations: L, local TR iterations per outer iteration (3, as §1).
        local_stop: ``iterations`` (L iterations, or until the ball is full) or ``settled``
            *(ours)*: at most L, ending after an accepted interior step that solved the
            local model, or after the first rejection that follows an accepted step
            (settled; §1: iterations).
        local_solver: ``cauchy``, ``steihaug``, ``lsr1`` or ``subspace`` (steihaug; §1: lsr1):
            a Steihaug CG solve of the local Gauss–Newton model on ``local_fraction`` of the shard.
        max_cg_iterations: cap on Steihaug CG iterations, local and global (5; §1: 20).
        cg_rtol: relative residual at which the CG of ``steihaug`` and ``lsr1`` solves stops
            (0.1; §1: None, the forcing term min(0.5, √‖g‖)) *(ours)*: the forcing term is
            0.5 while ‖g‖ > 0.25, and one Cauchy step halves the residual, so local
            solves ended after one or two products far inside the local ball.
        metric: the trust region's norm: ``adam`` *(ours, the default)*: ‖s‖_A with
            A the diagonal of Adam's step (√v̂ + ε, normalised to mean 1), so that the
            model's steepest descent is Adam's direction (docs/optimizers/apts-d.md), or
            ``euclidean`` (§1).  The ``subspace`` solver needs ``euclidean``.
        metric_beta: ``metric=adam``: decay of the moving average of g² (0.999, Adam's β₂).
        metric_eps: ``metric=adam``: added to √v̂ (1e-8, Adam's ε).
    """

    option_prefix: ClassVar[str] = "apts-d"

    # APTS-D's defaults differ from §1 in fourteen options (SECTION_1_OPTIONS undoes them),
    # measured on the full MNIST split at P = 2..8 and over Δ₀ from 1e-3 to 10, on the
    # thesis CNN, the PINNs and TinyShakespeare (docs/results-apts-d.md, "APTS-D accuracy against
    # P and Δ₀"): HF's radius factors (a bad Δ₀ is left within a few outer iterations),
    # local phases that start from the last combined step's length, a trust region in
    # Adam's diagonal norm (on the transformer the ball's local steps stay short; the
    # ellipsoid's grow), and since 2026-12-06 no global pass: the local phases solve a
    # Gauss–Newton model with CG (at most three settled iterations of at most five products
    # to a tenth of the residual, on a quarter of the shard, products on 35 % of it), and
    # the average of the local steps is scaled to the whole batch's Gauss–Newton minimiser
    # on its line.  About five gradient evaluations' time and 2n floats per outer iteration
    # over a whole MNIST run, where the defaults before it (five L-SR1 local iterations and
    # a Gauss–Newton pass) took 27 gradient evaluations' time and 14.5–15.9 n.
    local_iterations: int = 3
    local_stop: str = "settled"
    local_solver: str = "steihaug"
    max_cg_iterations: int = 5
    cg_rtol: float | None = 0.1
    gamma_inc: float = 2.0
    gamma_dec: float = 0.5
    curvature: str = "ggn"
    foc: bool = True
    global_passes: int = 0
    global_solver: str = "steihaug"
    combine: str = "scaled"
    predicted: str = "sum"
    local_start: str = "step"
    curvature_fraction: float = 0.35
    curvature_sampling: str = "strided"
    local_fraction: float = 0.25
    shard: str = "batch"
    metric: str = "adam"
    metric_beta: float = 0.999
    metric_eps: float = 1e-8

    def validate(self) -> None:
        super().validate()
        name = self.option_prefix
        require(self.global_passes >= 0, f"{name}: global_passes must be >= 0, got {self.global_passes}")
        require(self.local_iterations + self.global_passes > 0, f"{name}: local_iterations + global_passes is 0")
        require(
            self.global_solver in SOLVERS,
            f"{name}: unknown global_solver '{self.global_solver}' (choose from {', '.join(SOLVERS)})",
        )
        require(self.combine in COMBINES, f"{name}: combine must be one of {', '.join(COMBINES)}, got '{self.combine}'")
        require(self.predicted in ("sum", "model"), f"{name}: predicted must be sum or model, got '{self.predicted}'")
        require(
            self.predicted == "sum" or self.global_solver == "lsr1",
            f"{name}: predicted=model uses the global L-SR1 model; it needs global_solver=lsr1, "
            f"not '{self.global_solver}'",
        )
        require(
            self.local_start in LOCAL_STARTS,
            f"{name}: local_start must be one of {', '.join(LOCAL_STARTS)}, got '{self.local_start}'",
        )
        require_curvature_sample(name, self.curvature_fraction, self.curvature_sampling)
        require(
            0 < self.local_fraction <= 1,
            f"{name}: local_fraction must be in (0, 1], got {self.local_fraction}",
        )
        require(self.shard in ("batch", "spatial"), f"{name}: shard must be batch or spatial, got '{self.shard}'")
        require(self.metric in METRICS, f"{name}: metric must be one of {', '.join(METRICS)}, got '{self.metric}'")
        require(0 <= self.metric_beta < 1, f"{name}: metric_beta must be in [0, 1), got {self.metric_beta}")
        require(self.metric_eps > 0, f"{name}: metric_eps must be > 0, got {self.metric_eps}")
        require(
            self.metric == "euclidean" or "subspace" not in (self.local_solver, self.global_solver),
            f"{name}: metric={self.metric} scales the CG solvers' products; the subspace solver needs metric=euclidean",
        )


class APTSD(Optimizer):
    name = "apts-d"
    config_class = APTSDConfig
    objective: DistributedObjective

    def __init__(self, objective: DistributedObjective, config: APTSDConfig) -> None:
        super().__init__(objective, config)
        self.radius = config.radius
        self.policy = config.global_policy()
        self.curvature = parse_curvature(config.curvature)
        # Both solves run on replicated (global) or rank-private (local) vectors, so the
        # fused kernels' local sums are the sums the solvers need.
        self.local_solver, self.global_solver = (
            make_subproblem_solver(
                name,
                memory=config.memory,
                max_iter=config.max_cg_iterations,
                kernels=self.kernels,
                subspace_steps=config.subspace_steps,
                rtol=config.cg_rtol,
            )
            for name in (config.local_solver, config.global_solver)
        )
        # [Σ u_r; Σ pred_r], and Σ ‖u_r‖ for local_start=local (the local steps' mean length).
        self.combined = objective.comm_buffer(scalars=2 if config.local_start == "local" else 1)
        self.local_norm = 0.0
        self.world_size = objective.comm.size
        self.window = ReferenceWindow(config.nonmonotone)
        # local_start=step or local: where the next local phases start, from replicated lengths only.
        self.local_start = config.radius
        # The trust region's norm; every solve below runs in its scaled coordinates u = A^½ s.
        self.metric = make_metric(config.metric, config.metric_beta, config.metric_eps)

    def state_dict(self) -> dict[str, Any]:
        # The local solver is reset every outer iteration; only the global one carries memory.
        return {
            **super().state_dict(),
            "radius": self.radius,
            "global_solver": self.global_solver.state_dict(),
            "window": self.window.state(),
            "local_start": self.local_start,
            "metric": self.metric.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.radius = float(state["radius"])
        self.global_solver.load_state_dict(dict(state["global_solver"]))
        self.window.load(list(state.get("window", [])))
        self.local_start = float(state.get("local_start", self.config.radius))
        self.metric.load_state_dict(dict(state.get("metric", {})))

    # -- local phase (no communication) ---------------------------------------

    def _local_phase(
        self, theta_k: torch.Tensor, loss_local: float, grad_local: torch.Tensor, grad: torch.Tensor
    ) -> tuple[torch.Tensor, float, dict[str, int], CurvatureOperator | None]:
        """L TR iterations on f̃_r inside the ball Δ/P; returns (u_r, pred_r, counts, B_r at θ_k).

        The last is the curvature operator the phase built at θ_k (None: it built none there).

        The phase runs in the metric's scaled coordinates: u_r is the scaled local step.
        """
        cfg = self.config
        objective = self.objective
        metric = self.metric
        ball = self.radius / self.world_size if cfg.combine == "sum" else self.radius
        correction = metric.gradient(grad - grad_local) if cfg.foc else torch.zeros_like(grad)

        def value(scaled: torch.Tensor) -> float:
            self.move_to(theta_k, metric.step(scaled))
            return objective.local_value()

        def value_and_grad(scaled: torch.Tensor) -> tuple[float, torch.Tensor]:
            self.move_to(theta_k, metric.step(scaled))
            loss_r, grad_r = objective.local_value_and_grad()
            return loss_r, metric.gradient(grad_r)

        def value_then_grad(scaled: torch.Tensor) -> tuple[float, Callable[[], torch.Tensor]]:
            self.move_to(theta_k, metric.step(scaled))
            loss_r, finish = objective.local_value_then_grad()
            return loss_r, lambda: metric.gradient(finish())

        # The operator at the local iterate, and the one at θ_k (combine=scaled needs B_r there too).
        built: dict[str, tuple[torch.Tensor, CurvatureOperator]] = {}

        def curvature(scaled: torch.Tensor) -> MatVec:
            # The local iterate moves only on an accepted step: after a rejection the
            # operator at it is the one already built (a forward and a backward saved).
            if "last" not in built or not torch.equal(built["last"][0], scaled):
                built["last"] = (scaled.clone(), self._local_matvec(theta_k, metric.step(scaled)))
                if not bool(scaled.any()):
                    built["theta_k"] = built["last"]
            return metric.curvature(built["last"][1])

        model = first_order_consistent(value, value_and_grad, curvature, correction, value_then_grad)
        faults.inject("local_solve", objective.comm.rank, objective.step)
        # f̃_r(θ_k) = f_r(θ_k); its gradient there is g with FOC and g_r without.
        start = ball if cfg.local_start == "ball" else min(ball, self.local_start)
        phase = local_phase(
            model,
            self.local_solver,
            cfg,
            ball=ball,
            value0=loss_local,
            grad0=metric.gradient(grad if cfg.foc else grad_local),
            radius=start,
        )
        self.flat.copy_(theta_k)
        at_theta_k = built["theta_k"][1] if "theta_k" in built else None
        return phase.step, phase.decrease, phase.counts, at_theta_k

    def _local_matvec(self, theta_k: torch.Tensor, step_r: torch.Tensor) -> CurvatureOperator:
        # The FOC term is linear, so f̃_r has the curvature of f_r at the current local point.
        self.move_to(theta_k, step_r)
        cfg = self.config
        if cfg.curvature_fraction < 1.0 and cfg.local_fraction == 1.0:
            # B_r on this rank's rows of the curvature sub-batch; a rank without any keeps its shard's.
            sampled = sampled_local_curvature(
                self.objective, self.curvature, cfg.curvature_fraction, cfg.curvature_sampling
            )
            if sampled is not None:
                return sampled
        return self.objective.local_curvature(self.curvature)

    def _combined_step(
        self, theta_k: torch.Tensor, loss_local: float, grad_local: torch.Tensor, grad: torch.Tensor
    ) -> tuple[torch.Tensor, float, float, float, dict[str, float]]:
        """Local phase and combination: one allreduce of [u_r; pred_r].

        Returns ``(s, pred, ‖u‖, ‖u‖ before the rounding guard, counts)``, u = A^½ s the
        step in the metric's coordinates (u = s for the Euclidean one); the hook that the
        parameter-decomposed variant (APTS-P) overrides.
        """
        step_r, pred_r, local_counts, operator_at_theta_k = self._local_phase(theta_k, loss_local, grad_local, grad)
        counts: dict[str, float] = dict(local_counts)
        combined = self.combined
        combined.vector.copy_(step_r)
        combined.scalars[0] = pred_r
        local_start_local = self.config.local_start == "local"
        if local_start_local:
            combined.scalars[1] = float(step_r.norm())
        self.objective.comm.allreduce_(combined.data)
        step = combined.vector.clone()
        pred = float(combined.scalars[0])
        if local_start_local:
            self.local_norm = float(combined.scalars[1]) / self.world_size
        if self.config.combine in ("average", "scaled"):
            step.div_(self.world_size)
            pred /= self.world_size
        if self.config.combine == "scaled":
            step, pred = self._scaled_along(theta_k, step, grad, pred, operator_at_theta_k)
            counts["scale_products"] = 1
        step_norm = combined_norm = float(step.norm())
        if step_norm > self.radius:
            # Σ‖s_r‖ ≤ Δ by construction; guard against rounding only.
            step.mul_(self.radius / step_norm)
            step_norm = self.radius
        if self.config.predicted == "model":
            pred = self.model_decrease(self.metric.gradient(grad), step)
        return self.metric.step(step), pred, step_norm, combined_norm, counts

    def _scaled_along(
        self,
        theta_k: torch.Tensor,
        mean: torch.Tensor,
        grad: torch.Tensor,
        pred: float,
        operator: CurvatureOperator | None = None,
    ) -> tuple[torch.Tensor, float]:
        """combine=scaled: α·ū at the minimiser along ū of the whole batch's Gauss–Newton model.

        m(α) = α gᵀū + ½ α² ūᵀBū, with B the curvature on ``curvature_fraction`` of the
        batch: each rank adds ūᵀB_r ū from one local product on its rows, and one
        allreduce of a scalar gives the mean, which is ūᵀBū because the ranks' rows are
        equal shares.  α ≤ min(P, Δ/‖ū‖): no longer than the sum of the local steps, and
        inside the trust region.  pred becomes m's decrease at α.  Where the local steps
        disagree their mean is shorter than each, while the curvature along it drops
        quadratically, so α > 1; where they overshoot together, α < 1.
        """
        metric = self.metric
        g = metric.gradient(grad)
        slope = float(g.dot(mean))
        # B_r at θ_k on the same rows is the local phase's first operator, when it built one.
        if operator is None:
            operator = self._local_matvec(theta_k, torch.zeros_like(theta_k))
        # ūᵀ(A^-½ B_r A^-½)ū = (A^-½ū)ᵀ B_r (A^-½ū): a quadratic form, with no backward through the model.
        local_curvature = operator.quadratic_form(metric.step(mean))
        self.flat.copy_(theta_k)
        (curvature,) = self.objective.comm.allreduce_scalars([local_curvature])
        curvature /= self.world_size
        length = float(mean.norm())
        if slope >= 0 or length == 0:
            return mean, pred  # no descent along ū: the ratio test decides on it as it is
        limit = min(float(self.world_size), self.radius / length)
        alpha = min(-slope / curvature, limit) if curvature > 0 else limit
        return mean * alpha, -(alpha * slope + 0.5 * alpha * alpha * curvature)

    def model_decrease(self, grad: torch.Tensor, step: torch.Tensor) -> float:
        """−(gᵀs + ½ sᵀBs): the decrease the global L-SR1 model predicts for ``step``.

        g and B are replicated (B is built from allreduced pairs), so every rank
        computes the same value without communication.  With no pairs stored yet B = 0
        and this is the first-order prediction −gᵀs.
        """
        solver = self.global_solver
        assert isinstance(solver, LSR1Solver), "validate() requires global_solver=lsr1 for predicted=model"
        curvature = solver.operator.matvec(step)
        return -float(grad.dot(step) + 0.5 * step.dot(curvature))

    def _next_local_start(self, pred: float, combined_norm: float) -> None:
        """Update where the next local phases start (local_start=step) from replicated values."""
        cfg = self.config
        length = self.local_norm if cfg.local_start == "local" else combined_norm
        if pred > 0 and length > 0:
            start = cfg.local_gamma_inc * length
        else:
            start = self.local_start * cfg.local_gamma_dec ** max(1, cfg.local_iterations)
        self.local_start = max(cfg.radius_min, start)

    def _global_curvature(self) -> MatVec:
        """The global pass's curvature at the current parameters: the whole batch or its sub-batch.

        Built on first use, so the subspace solver, which asks for a Gram matrix
        only, never pays for the product operator's set-up.
        """
        cfg = self.config
        return BatchCurvature(self.objective, self.curvature, cfg.curvature_fraction, cfg.curvature_sampling)

    # -- one outer iteration ----------------------------------------------------

    def step(self) -> StepResult:
        cfg = self.config
        objective = self.objective
        radius_before = self.radius
        theta_k = self.flat.clone()

        loss_local, grad_local_view = objective.local_value_and_grad()
        grad_local = grad_local_view.clone()
        loss, grad_view = objective.reduce_value_and_grad(loss_local, grad_local)
        if not math.isfinite(loss):
            raise NonFiniteError(
                f"apts-d: the loss at the current parameters is {loss} (step {self.steps + 1}); "
                "the trust region cannot recover from a non-finite starting value"
            )
        grad = grad_view.clone()
        self.metric.update(grad)  # replicated g: every rank builds the same A

        if cfg.local_fraction < 1.0:
            # The local phases and the combination see this rank's rows of the local share only.
            rows = sampled_local_objective(objective, cfg.local_fraction, cfg.curvature_sampling)
            with objective.local_rows(rows):
                loss_rows, grad_rows = objective.local_value_and_grad()
                step, pred, step_norm, combined_norm, counts = self._combined_step(
                    theta_k, loss_rows, grad_rows.clone(), grad
                )
        else:
            step, pred, step_norm, combined_norm, counts = self._combined_step(theta_k, loss_local, grad_local, grad)
        if cfg.local_start != "ball":
            self._next_local_start(pred, combined_norm)

        # Trial point; the trial gradient rides along when the global pass needs it.
        self.move_to(theta_k, step)
        trial_grad: torch.Tensor | None = None
        if cfg.global_passes > 0:
            trial_loss, trial_grad_view = objective.value_and_grad()
            trial_grad = trial_grad_view.clone()
        else:
            trial_loss = objective.value()
        # The loss is allreduced, so every rank keeps the same window and the same decision.
        reference = self.window.reference(loss)
        self.window.record(loss)
        decision = decide(self.policy, self.radius, loss, trial_loss, pred, step_norm, reference)
        self.radius = decision.radius
        if trial_grad is not None and math.isfinite(trial_loss) and step_norm > 0:
            self.global_solver.update(*self.metric.pair(step, trial_grad - grad))
        if decision.accepted:
            current_loss, current_grad = trial_loss, trial_grad
        else:
            self.flat.copy_(theta_k)  # bit-identical θ_k
            current_loss, current_grad = loss, grad

        global_accepted = 0
        for g_pass in range(cfg.global_passes):
            assert current_grad is not None
            # One allreduce per product: Σ_r w_r B_r v, the operator of Hessian-free's solves.
            matvec = self.metric.curvature(self._global_curvature()) if self.global_solver.needs_matvec else None
            result = self.global_solver.solve(self.metric.gradient(current_grad), self.radius, matvec)
            if not (result.pred > 0 and math.isfinite(result.pred)):
                break
            theta = self.flat.clone()
            pass_step = self.metric.step(result.step)
            self.move_to(theta, pass_step)
            if g_pass < cfg.global_passes - 1:
                pass_loss, pass_grad_view = objective.value_and_grad()
                pass_grad: torch.Tensor | None = pass_grad_view.clone()
            else:
                pass_loss, pass_grad = objective.value(), None
            pass_decision = decide(
                self.policy, self.radius, current_loss, pass_loss, result.pred, float(result.step.norm())
            )
            self.radius = pass_decision.radius
            if pass_grad is not None and math.isfinite(pass_loss):
                self.global_solver.update(*self.metric.pair(pass_step, pass_grad - current_grad))
            if pass_decision.accepted:
                global_accepted += 1
                current_loss, current_grad = pass_loss, pass_grad
            else:
                self.flat.copy_(theta)

        self.steps += 1
        counts["global_accepted"] = global_accepted
        extras = {"combined_norm": combined_norm, **counts}
        return outer_step_result(loss, radius_before, step_norm, decision, pred, trial_loss, extras)
