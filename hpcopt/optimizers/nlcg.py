"""Preconditioned nonlinear conjugate gradients (docs/algorithms.md §5; Adya et al.).

Data-parallel with one allreduce(n+1) of ``[g; loss]`` per step (and one scalar
allreduce more with ``step_length=curvature``); all state (the diagonal
preconditioner h, the previous gradient, direction and step) is replicated, so
every rank computes the same step from the same reduced values.

Per step, with s the previous step and y = g_k − g_{k−1}:

1. diagonal BFGS: if yᵀs > 1e-8 and sᵀdiag(h)s > 1e-8,
   ``h ← |h − (h∘s)²/(sᵀdiag(h)s) + (y∘y)/(yᵀs)|``; h₀ = 1, M = 1/(h + 1e-8);
2. r = −g, z = M∘r; Fletcher–Reeves β = rₖᵀzₖ / rₖ₋₁ᵀzₖ₋₁ or Polak–Ribière
   β = (rₖᵀzₖ − rₖᵀzₖ₋₁)/rₖ₋₁ᵀzₖ₋₁, clipped to [0, beta_max]; d = z + β d_{k−1};
3. θ ← θ + lr(t)·c·α·d, with c from the loss-average heuristic, lr(t) a linear
   warm-up followed by step decay, and α = 1 (``step_length=fixed``, the paper's) or
   *(ours)* α = −gᵀd / (dᵀBd + λ‖d‖²), the minimiser of the quadratic model along d
   with B the Gauss–Newton matrix on a strided curvature sub-batch
   (``step_length=curvature``): the exact line search of linear CG, applied to the
   model of the network's loss.  It costs, per step, a forward pass and two backward
   passes on the sub-batch (the Gauss–Newton quadratic form (Jd)ᵀH_L(Jd) needs no
   backward through the model after them) and one allreduce of one scalar, each
   rank's share of dᵀBd; gᵀd is a local dot of replicated vectors.

With a fused-kernel backend (``self.kernels``: CUDA kernels on a GPU with CuPy)
steps 1–3 are three passes over the state, updated in place: ``nlcg_dots``
(yᵀs, sᵀdiag(h)s), ``nlcg_precondition`` (h and z with rᵀz and rᵀz_prev) and
``nlcg_step`` (d, s, θ and sᵀs).  Their sums are local, which is all there is:
the state is replicated.  Without a backend (CPU) the plain torch code runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hpcopt.config import require
from hpcopt.distributed.curvature_batch import sampled_curvature
from hpcopt.distributed.data_parallel import DistributedObjective
from hpcopt.kernels import Kernels
from hpcopt.numerics.curvature import parse_curvature
from hpcopt.optimizers.base import Optimizer, StepResult
from hpcopt.optimizers.curvature_sample import require_curvature_sample
from hpcopt.optimizers.sgd import check_finite_loss

BETAS = ("fr", "pr")
STEP_LENGTHS = ("fixed", "curvature")

# Loss-average heuristic *(ours where §5 leaves the numbers open)*: the EMA ratio
# thresholds above 1.01 and the matching shrink factors, mildest first.
_SHRINK = ((1.05, 0.975), (1.1, 0.9), (1.5, 0.75), (math.inf, 0.5))


@dataclass
class NLCGConfig:
    """Options of ``--optimizer nlcg``.

    Attributes:
        lr: base step size (0.1).
        beta: ``fr`` (Fletcher–Reeves) or ``pr`` (Polak–Ribière) (fr).
        beta_max: upper clip of β (1.0, the paper's); 0 gives preconditioned gradient descent, a large value no clip.
        precondition: diagonal-BFGS preconditioner; off means M = I (on).
        warmup_steps: linear warm-up of lr over this many steps (0 = none) (0).
        decay_every: multiply lr by decay_factor every this many steps (0 = never) (0).
        decay_factor: factor applied to lr at each decay (0.1).
        loss_average: the loss-average step heuristic for c (on).
        ema: EMA factor of the loss (0.7).
        check_every: compare the loss EMA with its value this many steps before (5).
        c_grow: factor of c when the loss fell (ratio < 1.01) (1.05); c is capped at 1.
        c_min: floor of c (1e-4).
        step_length: ``fixed`` (θ += lr·c·d, the paper's) or ``curvature`` (θ += lr·c·α·d, α
            minimising the Gauss–Newton model along d) (fixed).
        curvature: curvature of the ``curvature`` step length: ``ggn`` or ``hessian`` (ggn).
        curvature_fraction: share of the global batch its curvature product uses (0.1).
        curvature_sampling: ``strided`` (rank-count invariant) or ``head`` (strided).
        damping: λ of the curvature step length, which divides by dᵀBd + λ‖d‖² (0.0).
    """

    lr: float = 0.1
    beta: str = "fr"
    beta_max: float = 1.0
    precondition: bool = True
    warmup_steps: int = 0
    decay_every: int = 0
    decay_factor: float = 0.1
    loss_average: bool = True
    ema: float = 0.7
    check_every: int = 5
    c_grow: float = 1.05
    c_min: float = 1e-4
    step_length: str = "fixed"
    curvature: str = "ggn"
    curvature_fraction: float = 0.1
    curvature_sampling: str = "strided"
    damping: float = 0.0

    def validate(self) -> None:
        require(self.lr > 0, f"nlcg: lr must be > 0, got {self.lr}")
        require(self.beta in BETAS, f"nlcg: beta must be one of {', '.join(BETAS)}, got '{self.beta}'")
        require(self.beta_max >= 0, f"nlcg: beta_max must be >= 0, got {self.beta_max}")
        require(self.warmup_steps >= 0 and self.decay_every >= 0, "nlcg: warmup_steps and decay_every must be >= 0")
        require(0 < self.decay_factor <= 1, f"nlcg: decay_factor must be in (0, 1], got {self.decay_factor}")
        require(0 <= self.ema < 1, f"nlcg: ema must be in [0, 1), got {self.ema}")
        require(self.check_every >= 1, f"nlcg: check_every must be >= 1, got {self.check_every}")
        require(self.c_grow >= 1 and 0 < self.c_min <= 1, "nlcg: need c_grow >= 1 and 0 < c_min <= 1")
        require(
            self.step_length in STEP_LENGTHS,
            f"nlcg: step_length must be one of {', '.join(STEP_LENGTHS)}, got '{self.step_length}'",
        )
        parse_curvature(self.curvature)
        require_curvature_sample("nlcg", self.curvature_fraction, self.curvature_sampling)
        require(self.damping >= 0, f"nlcg: damping must be >= 0, got {self.damping}")

    def learning_rate(self, step: int) -> float:
        """lr(t) for the t-th step (0-based)."""
        lr = self.lr
        if self.warmup_steps and step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        if self.decay_every:
            lr *= self.decay_factor ** (step // self.decay_every)
        return lr


def diagonal_bfgs_update(h: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> bool:
    """``h ← |h − (h∘s)²/(sᵀdiag(h)s) + (y∘y)/(yᵀs)|`` in place when both curvatures exceed 1e-8."""
    ys = float(torch.dot(y, s))
    hs = h * s
    shs = float(torch.dot(s, hs))
    if not (ys > 1e-8 and shs > 1e-8):
        return False
    h.sub_(hs * hs / shs).add_(y * y / ys).abs_()
    return True


def clipped_beta(kind: str, rz: float, rz_cross: float, prev_rz: float, beta_max: float) -> tuple[float, float]:
    """``(β clipped to [0, beta_max], raw β)``; ``rz_cross`` = rₖᵀzₖ₋₁ (used by ``pr`` only)."""
    raw_beta = rz / prev_rz if kind == "fr" else (rz - rz_cross) / prev_rz
    beta = min(max(raw_beta, 0.0), beta_max) if math.isfinite(raw_beta) else 0.0
    return beta, raw_beta


class NLCG(Optimizer):
    name = "nlcg"
    config_class = NLCGConfig
    objective: DistributedObjective
    state_attributes = (
        *("h", "prev_grad", "prev_z", "prev_rz", "direction", "prev_step"),
        *("c", "loss_ema", "ema_history"),
    )

    def __init__(self, objective: DistributedObjective, config: NLCGConfig) -> None:
        super().__init__(objective, config)
        self.h = torch.ones_like(self.flat.data)
        self.prev_grad: torch.Tensor | None = None
        self.prev_z: torch.Tensor | None = None
        self.prev_rz = 0.0
        self.direction: torch.Tensor | None = None
        self.prev_step: torch.Tensor | None = None
        self.c = 1.0
        self.loss_ema: float | None = None
        self.ema_history: list[float] = []

    def _update_c(self, loss: float) -> None:
        cfg = self.config
        self.loss_ema = loss if self.loss_ema is None else cfg.ema * self.loss_ema + (1 - cfg.ema) * loss
        self.ema_history.append(self.loss_ema)
        if len(self.ema_history) <= cfg.check_every or (len(self.ema_history) - 1) % cfg.check_every:
            return
        before = self.ema_history[-1 - cfg.check_every]
        self.ema_history = self.ema_history[-cfg.check_every - 1 :]
        ratio = self.loss_ema / before if before > 0 else 1.0
        if ratio < 1.01:
            self.c = min(1.0, self.c * cfg.c_grow)
            return
        factor = next(f for bound, f in _SHRINK if ratio < bound)
        self.c = max(cfg.c_min, self.c * factor)

    def step(self) -> StepResult:
        cfg = self.config
        if self.kernels is not None and cfg.step_length == "fixed":
            return self._fused_step(self.kernels)
        loss, grad = self.objective.value_and_grad()
        check_finite_loss(self.name, loss, self.steps)
        direction, beta, raw_beta, updated = self.search_direction(grad)
        extras: dict[str, object] = {}
        alpha = 1.0
        if cfg.step_length == "curvature":
            direction, alpha, extras = self.curvature_step_length(grad, direction)
            if extras["restarted"]:
                beta = 0.0
        if cfg.loss_average:
            self._update_c(loss)
        lr = cfg.learning_rate(self.steps)
        step = self.move(direction, lr * self.c * alpha)
        return StepResult(
            loss=loss,
            step_norm=float(step.norm()),
            extras={
                "beta": beta,
                "beta_raw": raw_beta,
                "c": self.c,
                "lr": lr,
                "preconditioner_updated": updated,
                **extras,
            },
        )

    def curvature_step_length(
        self, grad: torch.Tensor, direction: torch.Tensor
    ) -> tuple[torch.Tensor, float, dict[str, object]]:
        """``(d, α, extras)``: α = −gᵀd / (dᵀBd + λ‖d‖²) on the curvature sub-batch.

        A direction that does not descend (gᵀd ≥ 0, possible for FR without an exact
        line search) is replaced by the preconditioned gradient z, which always does,
        and β counts as 0.  Where the curvature along d is not positive (``hessian``
        only) α falls back to 1, the fixed step.  Every input of α is replicated, so
        every rank takes the same step.
        """
        cfg = self.config
        slope = float(torch.dot(grad, direction))
        restarted = False
        if slope >= 0 and self.prev_z is not None:
            direction = self.direction = self.prev_z
            slope = float(torch.dot(grad, direction))
            restarted = True
        # λ goes to the operator, whose quadratic form adds λ‖d‖² itself.
        operator, rows = sampled_curvature(
            self.objective, parse_curvature(cfg.curvature), cfg.curvature_fraction, cfg.curvature_sampling, cfg.damping
        )
        curvature = operator.quadratic_form(direction)
        alpha = -slope / curvature if curvature > 0 and slope < 0 else 1.0
        return (
            direction,
            alpha,
            {"alpha": alpha, "slope": slope, "dBd": curvature, "restarted": restarted, "curvature_rows": rows},
        )

    def search_direction(self, grad: torch.Tensor) -> tuple[torch.Tensor, float, float, bool]:
        """Steps 1–2 at the gradient ``grad``: ``(d, β, raw β, preconditioner updated)``.

        Reads the previous step and gradient and records this gradient and ``z``; the
        step length along ``d`` is :meth:`move`'s.  Split from :meth:`step` so that a
        test can drive the method with an exact line search, where §5 with M = I is
        linear CG.
        """
        cfg = self.config
        grad = grad.clone()  # the objective's view is overwritten by its next evaluation
        updated = False
        if cfg.precondition and self.prev_grad is not None and self.prev_step is not None:
            updated = diagonal_bfgs_update(self.h, self.prev_step, grad - self.prev_grad)
        residual = -grad
        z = residual / (self.h + 1e-8) if cfg.precondition else residual.clone()
        rz = float(torch.dot(residual, z))
        beta = raw_beta = 0.0
        if self.direction is not None and self.prev_z is not None and self.prev_rz > 0:
            cross = float(torch.dot(residual, self.prev_z)) if cfg.beta == "pr" else 0.0
            beta, raw_beta = clipped_beta(cfg.beta, rz, cross, self.prev_rz, cfg.beta_max)
            direction = z.add(self.direction, alpha=beta)
        else:
            direction = z
        self.prev_grad, self.prev_z, self.prev_rz, self.direction = grad, z, rz, direction
        return direction, beta, raw_beta, updated

    def move(self, direction: torch.Tensor, length: float) -> torch.Tensor:
        """Step 3: θ ← θ + length·d; returns the step (the next preconditioner update's s)."""
        step = direction * length
        with torch.no_grad():
            self.flat.data.add_(step)
        self.prev_step = step
        self.steps += 1
        return step

    # -- the same step through fused kernels --------------------------------------

    def _state_buffers(self) -> tuple[bool, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The in-place state ``(had a previous step, g_prev, z, d, s)``, allocated on the first fused step.

        The plain path leaves ``direction`` and ``prev_z`` as one tensor after a β = 0
        step (d = z); in-place kernels need them apart, so such a pair is split.
        """
        had_previous = self.prev_grad is not None and self.prev_step is not None
        zeros = self.flat.data.new_zeros
        n = self.flat.data.numel()
        self.prev_grad = zeros(n) if self.prev_grad is None else self.prev_grad
        self.prev_z = zeros(n) if self.prev_z is None else self.prev_z
        self.direction = zeros(n) if self.direction is None else self.direction
        self.prev_step = zeros(n) if self.prev_step is None else self.prev_step
        if self.direction is self.prev_z:
            self.direction = self.direction.clone()
        return had_previous, self.prev_grad, self.prev_z, self.direction, self.prev_step

    def _fused_step(self, kernels: Kernels) -> StepResult:
        cfg = self.config
        loss, grad = self.objective.value_and_grad()
        check_finite_loss(self.name, loss, self.steps)
        had_previous, grad_prev, z, direction, step = self._state_buffers()
        updated = False
        if cfg.precondition:
            ys, shs = kernels.nlcg_dots(step, grad, grad_prev, self.h) if had_previous else (0.0, 0.0)
            updated = had_previous and ys > 1e-8 and shs > 1e-8
            rz, cross = kernels.nlcg_precondition_(self.h, z, grad, grad_prev, step, ys, shs, update=updated)
        else:
            # M = I has nothing to fuse: z = r, and rᵀz_prev is needed before z is overwritten.
            residual = -grad
            cross = float(torch.dot(residual, z))
            z.copy_(residual)
            rz = float(torch.dot(residual, z))
        beta = raw_beta = 0.0
        if had_previous and self.prev_rz > 0:
            beta, raw_beta = clipped_beta(cfg.beta, rz, cross, self.prev_rz, cfg.beta_max)
        if cfg.loss_average:
            self._update_c(loss)
        lr = cfg.learning_rate(self.steps)
        with torch.no_grad():
            # β = 0 restarts the direction: d ← z + 0·d, d being zeros or a finite previous d.
            ss = kernels.nlcg_step_(self.flat.data, direction, step, z, beta, lr * self.c)
        grad_prev.copy_(grad)  # grad is a view of the collective's buffer, reused next step
        self.prev_rz = rz
        self.steps += 1
        return StepResult(
            loss=loss,
            step_norm=math.sqrt(ss),
            extras={"beta": beta, "beta_raw": raw_beta, "c": self.c, "lr": lr, "preconditioner_updated": updated},
        )
