"""Data-parallel SGD (with optional momentum) over the hpcopt communication layer.

One packed allreduce of [gradient; loss] per step, the same layer the
second-order methods use, so comparisons measure the algorithms and not two
different communication stacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hpcopt.config import require
from hpcopt.errors import NonFiniteError
from hpcopt.optimizers.base import Optimizer, StepResult

if TYPE_CHECKING:
    from hpcopt.distributed.objective import Objective


@dataclass
class SGDConfig:
    """Options of ``--optimizer sgd``.

    Attributes:
        lr: learning rate (default 0.01).
        momentum: heavy-ball momentum coefficient (default 0.0).
        nesterov: Nesterov momentum (default off).
        weight_decay: L2 coefficient added to the gradient (default 0.0).
        warmup_steps: linear warm-up: the t-th step (1-based) uses lr·min(1, t/warmup_steps) (default 0: none).
    """

    lr: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    warmup_steps: int = 0

    def validate(self) -> None:
        require(self.lr > 0, f"sgd: lr must be > 0, got {self.lr}")
        require(0 <= self.momentum < 1, f"sgd: momentum must be in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, f"sgd: weight_decay must be >= 0, got {self.weight_decay}")
        require(not self.nesterov or self.momentum > 0, "sgd: nesterov needs momentum > 0")
        require(self.warmup_steps >= 0, f"sgd: warmup_steps must be >= 0, got {self.warmup_steps}")

    def learning_rate(self, step: int) -> float:
        """lr for the ``step``-th step (0-based)."""
        return linear_warmup(self.lr, step, self.warmup_steps)


def linear_warmup(lr: float, step: int, warmup_steps: int) -> float:
    """``lr·(step + 1)/warmup_steps`` for the first ``warmup_steps`` steps (0-based ``step``), then ``lr``.

    The large-batch practice of Goyal et al. that both the NLCG and the Neumann papers
    follow: the first steps of a large batch are too long for a learning rate scaled to it.
    """
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr


def check_finite_loss(name: str, loss: float, steps_taken: int) -> None:
    """Methods without a trust region cannot reject a step: stop instead of training on NaN.

    ``steps_taken`` counts the steps before this one; the message names this step as
    the run log numbers it (from 1).
    """
    if not torch.isfinite(torch.tensor(loss)):
        raise NonFiniteError(
            f"{name}: the mini-batch loss is {loss} at step {steps_taken + 1}; stopping instead of training on "
            "non-finite values (lower the learning rate)"
        )


class SGD(Optimizer):
    name = "sgd"
    config_class = SGDConfig

    def __init__(self, objective: Objective, config: SGDConfig) -> None:
        super().__init__(objective, config)
        self.momentum_buffer = torch.zeros_like(self.flat.data) if config.momentum > 0 else None

    def step(self) -> StepResult:
        cfg = self.config
        loss, grad = self.objective.value_and_grad()
        check_finite_loss(self.name, loss, self.steps)
        if cfg.weight_decay:
            grad.add_(self.flat.data, alpha=cfg.weight_decay)
        direction = grad
        if self.momentum_buffer is not None:
            self.momentum_buffer.mul_(cfg.momentum).add_(grad)
            direction = grad.add(self.momentum_buffer, alpha=cfg.momentum) if cfg.nesterov else self.momentum_buffer
        lr = cfg.learning_rate(self.steps)
        with torch.no_grad():
            self.flat.data.add_(direction, alpha=-lr)
        self.steps += 1
        return StepResult(loss=loss, step_norm=lr * float(direction.norm()))

    def state_dict(self) -> dict[str, Any]:
        buffer = self.momentum_buffer
        return {**super().state_dict(), "momentum_buffer": None if buffer is None else buffer.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if self.momentum_buffer is not None:
            self.momentum_buffer.copy_(state["momentum_buffer"])
