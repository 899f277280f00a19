"""APTS-P: parameter-decomposed additively preconditioned trust region (docs/algorithms.md §2).

The model is replicated; its flat parameter vector is owned piecewise
(:class:`~hpcopt.distributed.decomposition.ParameterDecomposition`: rank r owns the contiguous
range C_r).  One outer iteration:

1. ``[g; f]`` at θ_k — one allreduce(n+1), exactly as APTS-D.
2. Rank r runs L trust-region iterations over its owned coordinates only (all
   others frozen at θ_k) on its shard's first-order-consistent model
   ``f̃_r(θ) = f_r(θ) + (g − g_r)ᵀ(θ − θ_k)``, whose gradient at θ_k restricted to C_r
   is the global ``g|C_r``.  Local radius Δ/√P in the 2-norm (the blocks are
   disjoint, so ‖s‖² = Σ‖s_r‖² ≤ Δ²), or Δ with ``norm = inf``.
3. One Allgatherv of ``[s_r; pred_r]`` (n + P floats in all): the concatenation is
   the step (the ranges are contiguous and in rank order) and the P trailing
   scalars sum to pred — no allreduce of a zero-padded n-vector, and no separate
   collective for pred.
4. Trial point, ratio, radius update and the optional global pass: APTS-D's code.

``norm = inf`` is the ∞-norm *over blocks*, ``max_r ‖s_r‖₂ ≤ Δ``: each rank solves
in a 2-norm ball of radius Δ, and that block-max norm is what the radius expansion
test compares with Δ *(ours)*.  (It also bounds the elementwise ∞-norm by Δ.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from hpcopt.config import require
from hpcopt.distributed.data_parallel import DistributedObjective
from hpcopt.distributed.decomposition import BLOCK_MODES, ParameterDecomposition
from hpcopt.numerics.krylov.cg import MatVec
from hpcopt.optimizers.apts.apts_d import APTSD, APTSDConfig
from hpcopt.optimizers.apts.local_phase import first_order_consistent, local_phase


@dataclass
class APTSPConfig(APTSDConfig):
    """Options of ``--optimizer apts-p``: those of APTS-D plus the ones below.

    Its defaults are §0/§2's, not APTS-D's: ``combine=sum`` (it must stay so: the blocks
    are disjoint, so the pieces concatenate), ``local_start=ball``, ``global_solver=lsr1``,
    ``curvature=hessian``, ``gamma_inc=1.2``, ``gamma_dec=0.9``, ``metric=euclidean``,
    ``local_iterations=3``, ``global_passes=1``, ``local_solver=lsr1``,
    ``local_stop=iterations``, ``max_cg_iterations=20``, ``curvature_fraction=1.0``,
    ``local_fraction=1.0``, ``cg_rtol=None``.

    Attributes:
        gamma_inc: expansion factor (§0: 1.2).
        gamma_dec: shrink factor (§0: 0.9).
        curvature: products for ``steihaug`` and ``subspace``: ``hessian`` or ``ggn`` (§0: hessian).
        global_solver: ``cauchy``, ``steihaug``, ``lsr1`` or ``subspace`` (§2: lsr1).
        combine: ``sum`` only (§2: the owned blocks concatenate).
        local_start: ``ball`` only (§2: each block's local phase starts from its whole ball).
        metric: ``euclidean`` only (``adam`` is APTS-D's).
        local_iterations: L, local TR iterations per outer iteration (§2: 3).
        global_passes: G, TR iterations on the global f after the combination (§2: 1).
        local_solver: ``cauchy``, ``steihaug``, ``lsr1`` or ``subspace`` (§2: lsr1).
        local_stop: ``iterations`` or ``settled`` (§2: iterations).
        max_cg_iterations: cap on Steihaug CG iterations (20).
        curvature_fraction: share of the batch that curvature products are taken on (1.0).
        local_fraction: share of each rank's shard that its local phases see (1.0).
        cg_rtol: relative residual at which CG solves stop (None: the forcing term
            min(0.5, √‖g‖)).
        blocks: ``auto`` (whole tensors when balanced within ``max_imbalance``, else
            chunks), ``tensors`` or ``chunks`` (auto).
        max_imbalance: max/mean owned elements accepted by ``auto`` for whole tensors (1.25).
        norm: ``2`` (local radius Δ/√P, ‖s‖₂ ≤ Δ) or ``inf`` (local radius Δ,
            max_r ‖s_r‖₂ ≤ Δ) (2).
    """

    option_prefix: ClassVar[str] = "apts-p"

    # §2 as published (apts_d.SECTION_1_OPTIONS, checked in tests/optimizers/test_apts_p.py):
    # the owned blocks concatenate (no average, no local start from the combined step), and
    # APTS-D's Gauss–Newton pass and radius factors were measured for APTS-D only, so APTS-P
    # keeps §0's (the PINN defaults give it the Gauss–Newton pass).
    combine: str = "sum"
    local_start: str = "ball"
    global_solver: str = "lsr1"
    curvature: str = "hessian"
    gamma_inc: float = 1.2
    gamma_dec: float = 0.9
    metric: str = "euclidean"
    local_iterations: int = 3
    global_passes: int = 1
    local_solver: str = "lsr1"
    local_stop: str = "iterations"
    max_cg_iterations: int = 20
    curvature_fraction: float = 1.0
    local_fraction: float = 1.0
    cg_rtol: float | None = None
    blocks: str = "auto"
    max_imbalance: float = 1.25
    norm: str = "2"

    def validate(self) -> None:
        super().validate()
        require(self.combine == "sum", "apts-p: combine must be 'sum' (the owned blocks are concatenated)")
        require(self.local_start == "ball", "apts-p: local_start must be 'ball' (step is APTS-D's)")
        require(self.metric == "euclidean", "apts-p: metric must be 'euclidean' (adam is APTS-D's)")
        require(self.blocks in BLOCK_MODES, f"apts-p: blocks must be one of {', '.join(BLOCK_MODES)}")
        require(self.max_imbalance >= 1.0, f"apts-p: max_imbalance must be >= 1, got {self.max_imbalance}")
        require(self.norm in ("2", "inf"), f"apts-p: norm must be '2' or 'inf', got '{self.norm}'")


class APTSP(APTSD):
    name = "apts-p"
    config_class = APTSPConfig

    def __init__(self, objective: DistributedObjective, config: APTSPConfig) -> None:
        super().__init__(objective, config)
        comm = objective.comm
        flat = objective.flat
        self.decomposition = ParameterDecomposition.build(
            flat.names, flat.sizes, comm.size, config.blocks, config.max_imbalance
        )
        self.decomposition.validate(comm)
        self.owned = self.decomposition.owned(comm.rank)
        # Each rank contributes [s_r (|C_r|); pred_r (1)]; these pick the two parts back out.
        self._gather_counts = [count + 1 for count in self.decomposition.counts]
        ends = torch.tensor(self._gather_counts).cumsum(0)
        self._pred_positions = ends - 1
        is_step = torch.ones(int(ends[-1]), dtype=torch.bool)
        is_step[self._pred_positions] = False
        self._step_positions = is_step.nonzero().squeeze(1)
        self._send = torch.zeros(self._gather_counts[comm.rank], dtype=flat.dtype, device=flat.device)

    @property
    def imbalance(self) -> float:
        return self.decomposition.imbalance

    def run_attributes(self) -> dict[str, object]:
        """Run-log attributes describing the decomposition."""
        d = self.decomposition
        return {"apts_p_blocks": d.mode, "apts_p_owned": d.counts, "apts_p_imbalance": d.imbalance}

    # -- local phase on the owned block (no communication) -----------------------

    def _block_local_phase(
        self, theta_k: torch.Tensor, loss_local: float, grad_local: torch.Tensor, grad: torch.Tensor
    ) -> tuple[torch.Tensor, float, dict[str, float]]:
        cfg = self.config
        objective = self.objective
        flat = self.flat
        owned = self.owned
        ball = self.radius / math.sqrt(self.world_size) if cfg.norm == "2" else self.radius
        correction = (grad - grad_local)[owned] if cfg.foc else torch.zeros_like(grad[owned])
        grad0 = grad[owned] if cfg.foc else grad_local[owned]

        def move_to(step: torch.Tensor) -> None:
            flat.copy_(theta_k)
            with torch.no_grad():
                flat.data[owned].add_(step)

        def value(step: torch.Tensor) -> float:
            move_to(step)
            return objective.local_value()

        def value_and_grad(step: torch.Tensor) -> tuple[float, torch.Tensor]:
            move_to(step)
            loss, full_grad = objective.local_value_and_grad()
            return loss, full_grad[owned]

        def curvature(step: torch.Tensor) -> MatVec:
            # The FOC term is linear: the owned-block Hessian of f̃_r is that of f_r.
            move_to(step)
            operator = objective.local_curvature(self.curvature)
            padded = torch.zeros_like(theta_k)

            def matvec(v: torch.Tensor) -> torch.Tensor:
                padded.zero_()
                padded[owned] = v
                return operator(padded)[owned]

            return matvec

        model = first_order_consistent(value, value_and_grad, curvature, correction)
        phase = local_phase(model, self.local_solver, cfg, ball=ball, value0=loss_local, grad0=grad0)
        flat.copy_(theta_k)
        return phase.step, phase.decrease, dict(phase.counts)

    # -- combination: one Allgatherv of [s_r; pred_r] -------------------------------

    def _combined_step(
        self, theta_k: torch.Tensor, loss_local: float, grad_local: torch.Tensor, grad: torch.Tensor
    ) -> tuple[torch.Tensor, float, float, float, dict[str, float]]:
        step_r, pred_r, counts = self._block_local_phase(theta_k, loss_local, grad_local, grad)
        self._send[:-1] = step_r
        self._send[-1] = pred_r
        gathered = self.objective.comm.allgatherv(self._send, self._gather_counts)
        step = gathered[self._step_positions]
        pred = float(gathered[self._pred_positions].sum())
        if self.config.norm == "2":
            step_norm = combined_norm = float(step.norm())
            if step_norm > self.radius:  # rounding guard only: Σ‖s_r‖² ≤ Δ²
                step.mul_(self.radius / step_norm)
                step_norm = self.radius
        else:
            step_norm = combined_norm = max(
                float(step[self.decomposition.owned(r)].norm()) for r in range(self.world_size)
            )
        if self.config.predicted == "model":
            pred = self.model_decrease(grad, step)
        counts["imbalance"] = self.decomposition.imbalance
        return step, pred, step_norm, combined_norm, counts
