"""Data-parallel Adam over the hpcopt communication layer (one packed allreduce per step)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hpcopt.config import require
from hpcopt.optimizers.base import Optimizer, StepResult
from hpcopt.optimizers.sgd import check_finite_loss, linear_warmup

if TYPE_CHECKING:
    from hpcopt.distributed.objective import Objective


def second_moment_root(exp_avg_sq: torch.Tensor, beta2: float, steps: int, eps: float) -> torch.Tensor:
    """√(v / (1 − β₂ᵗ)) + ε, Adam's per-coordinate denominator after t updates of v (a new tensor).

    APTS-D's ``metric=adam`` measures its trust region in the same diagonal.
    """
    return (exp_avg_sq / (1 - beta2**steps)).sqrt_().add_(eps)


@dataclass
class AdamConfig:
    """Options of ``--optimizer adam`` (Kingma & Ba; defaults as in the paper).

    Attributes:
        lr: step size (default 1e-3).
        beta1: first-moment decay (default 0.9).
        beta2: second-moment decay (default 0.999).
        eps: denominator guard (default 1e-8).
        weight_decay: L2 coefficient added to the gradient (default 0.0).
        warmup_steps: linear warm-up: the t-th step (1-based) uses lr·min(1, t/warmup_steps) (default 0: none).
    """

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0

    def validate(self) -> None:
        require(self.lr > 0, f"adam: lr must be > 0, got {self.lr}")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "adam: beta1 and beta2 must be in [0, 1)")
        require(self.eps > 0, f"adam: eps must be > 0, got {self.eps}")
        require(self.weight_decay >= 0, f"adam: weight_decay must be >= 0, got {self.weight_decay}")
        require(self.warmup_steps >= 0, f"adam: warmup_steps must be >= 0, got {self.warmup_steps}")


class Adam(Optimizer):
    name = "adam"
    config_class = AdamConfig

    def __init__(self, objective: Objective, config: AdamConfig) -> None:
        super().__init__(objective, config)
        self.exp_avg = torch.zeros_like(self.flat.data)
        self.exp_avg_sq = torch.zeros_like(self.flat.data)

    def step(self) -> StepResult:
        cfg = self.config
        loss, grad = self.objective.value_and_grad()
        check_finite_loss(self.name, loss, self.steps)
        if cfg.weight_decay:
            grad.add_(self.flat.data, alpha=cfg.weight_decay)
        self.steps += 1
        self.exp_avg.mul_(cfg.beta1).add_(grad, alpha=1 - cfg.beta1)
        self.exp_avg_sq.mul_(cfg.beta2).addcmul_(grad, grad, value=1 - cfg.beta2)
        bias1 = 1 - cfg.beta1**self.steps
        denom = second_moment_root(self.exp_avg_sq, cfg.beta2, self.steps, cfg.eps)
        update = self.exp_avg / denom
        lr = linear_warmup(cfg.lr, self.steps - 1, cfg.warmup_steps)
        step_size = lr / bias1
        with torch.no_grad():
            self.flat.data.add_(update, alpha=-step_size)
        return StepResult(loss=loss, step_norm=step_size * float(update.norm()))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "exp_avg": self.exp_avg.clone(), "exp_avg_sq": self.exp_avg_sq.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)  # ``steps`` drives the bias correction
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
