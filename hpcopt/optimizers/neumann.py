"""The Neumann optimizer (docs/algorithms.md §6; Krishnan, Xiao & Saurous, ICLR 2018).

Data-parallel with one allreduce(n+1) of ``[g; loss]`` per step; the state
(m, v) is replicated.  The mini-batch Newton system is solved by a Neumann series
whose Hessian-vector products are replaced by gradients at displaced points, so
the stored parameters w are *displaced*: the model the method stands for is
``w − μ·m``, and evaluation, checkpoints and the final model use that
(:meth:`Neumann.evaluation_parameters`).

Per step t (gradient ĝ at the stored w), after ``warmup_steps`` of plain SGD (at ``lr``, or
rising linearly to it over ``ramp_epochs``):

* at a reset (the first step after warm-up, then after K steps, K doubling):
  ``m ← −η ĝ``;
* otherwise ``d = ĝ + (α‖w−v‖² − β/‖w−v‖²)·(w−v)/‖w−v‖``, ``m ← μ m − η d``,
  ``w ← w + μ m − η d``, ``v ← w + γ(v − w)``.

``d``'s extra term is the gradient of the cubic-plus-repulsive regulariser
``α/3‖w−v‖³ + β/‖w−v‖`` (:func:`regularizer`).  μ = clip(1 − 1/(1+e), μ_min, μ_max)
and η = lr/(1 + e) with e the epochs since step 0 (``schedule_origin=burn-in``: since
the warm-up); ``epoch_steps`` says how many steps an "epoch" of these schedules is, since an
optimizer does not see the data:
``hpcopt train`` sets it to the data's where the user does not
(:meth:`Neumann.resolve_config`), a loop of the user's own must.

With a fused-kernel backend (``self.kernels``: CUDA kernels on a GPU with CuPy) a
Neumann step is two passes, ``sq_distance`` (‖w−v‖²) and ``neumann_update`` (m, w
and v in place, and ‖Δw‖² for the logged step norm); without one (CPU) the plain
torch code runs.  The sums are local, which is
all there is: the state is replicated.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from hpcopt.config import require
from hpcopt.distributed.data_parallel import DistributedObjective
from hpcopt.errors import ConfigError
from hpcopt.kernels import Kernels, neumann_coefficient
from hpcopt.optimizers.base import Optimizer, StepResult
from hpcopt.optimizers.sgd import check_finite_loss, linear_warmup

BETA_RULES = ("paper", "relative")
SCHEDULE_ORIGINS = ("burn-in", "start")
NO_EPOCH = (
    "neumann: epoch_steps is not set: give the steps of one epoch of your data "
    "(its burn-in, resets and μ, η schedules count epochs)"
)

# The regulariser α/3·r³ + β/r (r = ‖w − v‖) is least at r* = (β/α)^¼.  The paper's constants
# (α = 1e-7, β = 1e-5·n) put it at r* = (100 n)^¼: 224.8 on its ResNet-50 (n = 25 557 032),
# whose weights have ‖w₀‖ = 268.2 at their usual initialisation (E‖W‖² = 2·c_in per conv with
# He fan-out init, BN γ = 1, the default init of the classifier; docs/optimizers/neumann.md).
# r*/‖w₀‖ = 0.84 is the scale-free part of the paper's choice; on a 47k-parameter CNN the same
# constants give r* = 46.5 ≈ 7.3·‖w₀‖ (‖w₀‖ = 6.4).
PAPER_SHELL_RATIO = 0.84


# The paper's schedules in epochs of ImageNet, from runs of about 230 epochs (2 % and 4 % of them).
PAPER_WARMUP_EPOCHS = 5.0
PAPER_RESET_EPOCHS = 10.0


def schedule_epochs(run_epochs: float | None) -> tuple[float, float]:
    """(burn-in, first reset period) in epochs for a run of ``run_epochs``: the paper's 5 and 10,
    at most a tenth and a fifth of the run; the paper's where the run's length is unknown.

    A tenth: the share of the run over which the large-batch practice warms every other method
    up (Goyal et al.; the large-batch study's SGD, Adam and NLCG); a fifth: the paper's first
    reset period of twice the burn-in. 1 and 2 epochs of a 10-epoch run, the paper's own on a
    run of 50 epochs or more (docs/optimizers/neumann.md#the-schedules-on-a-shorter-run).
    """
    if run_epochs is None:
        return PAPER_WARMUP_EPOCHS, PAPER_RESET_EPOCHS
    return min(PAPER_WARMUP_EPOCHS, run_epochs / 10), min(PAPER_RESET_EPOCHS, run_epochs / 5)


def relative_beta(alpha: float, shell_ratio: float, weight_norm: float) -> float:
    """β that puts the regulariser's minimum at ``shell_ratio·weight_norm``: α·r*⁴."""
    return alpha * (shell_ratio * weight_norm) ** 4


@dataclass
class NeumannConfig:
    """Options of ``--optimizer neumann`` (constants from the paper; only lr is meant to be tuned).

    Attributes:
        lr: learning-rate scale η₀ (0.01).
        alpha: cubic regulariser α (1e-7).
        beta_rule: ``relative`` (the default): β = α·(shell_ratio·‖w‖)⁴, ‖w‖ at the first reset, the
            paper's shell radius over ‖w‖, which gives back its β on its ResNet-50; ``paper``: β =
            beta_scale·n, the published constant, too strong on a small model.
        beta_scale: repulsive regulariser β = beta_scale·n, n = number of parameters (1e-5; beta_rule=paper).
        shell_ratio: the regulariser's minimum ‖w−v‖ over ‖w‖ (0.84, the paper's on ResNet-50; beta_rule=relative).
        gamma: decay of the moving anchor v (0.99).
        mu_min, mu_max: clip of the momentum μ (0.5, 0.9).
        epoch_steps: steps per "epoch" of the schedules below, > 0 and possibly fractional (None:
            the data's steps per epoch, which ``hpcopt train`` fills in and a loop of your own
            must give; or the run's steps over the paper's 230 epochs).
        warmup_epochs: epochs of plain SGD first (None: the paper's 5, at most a tenth of the run
            where the run's length is known, as in ``hpcopt train``: 1 of a 10-epoch run, 5 of the
            paper's 230; 5 in a loop of your own).
        ramp_epochs: the burn-in's learning rate rises linearly to lr over its first ramp_epochs
            epochs, the large-batch warm-up of Goyal et al. (0: none, Algorithm 2 as printed;
            at most warmup_epochs).
        reset_epochs: first reset period K in epochs; K doubles after each reset (None: the paper's
            10, at most a fifth of the run where its length is known: twice the burn-in, the paper's
            ratio; 10 in a loop of your own).
        schedule_origin: where the epochs e of the μ and η schedules count from: ``start``
            (step 0, the default: after a burn-in of at least one epoch the first momentum
            steps' effective step η/(1−μ) is lr, the burn-in's) or ``burn-in`` (its end, e = 0
            at the first reset: up to 2·lr, which can blow a run up at the switch; the
            large-batch study's ``neumann``). The paper says "epoch" and leaves the origin open.
    """

    lr: float = 0.01
    alpha: float = 1e-7
    beta_rule: str = "relative"
    beta_scale: float = 1e-5
    shell_ratio: float = PAPER_SHELL_RATIO
    gamma: float = 0.99
    mu_min: float = 0.5
    mu_max: float = 0.9
    epoch_steps: float | None = None
    warmup_epochs: float | None = None
    ramp_epochs: float = 0.0
    reset_epochs: float | None = None
    schedule_origin: str = "start"

    def validate(self) -> None:
        require(self.lr > 0, f"neumann: lr must be > 0, got {self.lr}")
        require(self.alpha >= 0 and self.beta_scale >= 0, "neumann: alpha and beta_scale must be >= 0")
        require(
            self.beta_rule in BETA_RULES,
            f"neumann: beta_rule must be one of {', '.join(BETA_RULES)}, got '{self.beta_rule}'",
        )
        require(self.shell_ratio > 0, f"neumann: shell_ratio must be > 0, got {self.shell_ratio}")
        require(0 <= self.gamma < 1, f"neumann: gamma must be in [0, 1), got {self.gamma}")
        require(0 <= self.mu_min <= self.mu_max < 1, "neumann: need 0 <= mu_min <= mu_max < 1")
        positive = self.epoch_steps is None or self.epoch_steps > 0
        require(positive, f"neumann: epoch_steps must be > 0, got {self.epoch_steps}")
        require(self.warmup_epochs is None or self.warmup_epochs >= 0, "neumann: warmup_epochs must be >= 0")
        require(
            0 <= self.ramp_epochs <= self.burn_in_epochs,
            f"neumann: ramp_epochs must be in [0, warmup_epochs = {self.burn_in_epochs:g}], got {self.ramp_epochs:g}",
        )
        require(self.reset_epochs is None or self.reset_epochs > 0, "neumann: reset_epochs must be > 0")
        require(
            self.schedule_origin in SCHEDULE_ORIGINS,
            f"neumann: schedule_origin must be one of {', '.join(SCHEDULE_ORIGINS)}, got '{self.schedule_origin}'",
        )

    @property
    def steps_per_epoch(self) -> float:
        """``epoch_steps``, which must be known by the time an optimizer is built."""
        if self.epoch_steps is None:
            raise ConfigError(NO_EPOCH)
        return self.epoch_steps

    @property
    def burn_in_epochs(self) -> float:
        """``warmup_epochs``, or, unresolved (:meth:`Neumann.resolve_config`), the paper's."""
        return schedule_epochs(None)[0] if self.warmup_epochs is None else self.warmup_epochs

    @property
    def first_reset_epochs(self) -> float:
        """``reset_epochs``, or, unresolved (:meth:`Neumann.resolve_config`), the paper's."""
        return schedule_epochs(None)[1] if self.reset_epochs is None else self.reset_epochs

    @property
    def warmup_steps(self) -> int:
        return round(self.burn_in_epochs * self.steps_per_epoch)

    @property
    def ramp_steps(self) -> int:
        return round(self.ramp_epochs * self.steps_per_epoch)

    def schedule(self, step: int) -> tuple[float, float]:
        """(η, μ) at step ``step`` (0-based) after the warm-up."""
        origin = self.warmup_steps if self.schedule_origin == "burn-in" else 0
        epochs = max(step - origin, 0) / self.steps_per_epoch
        mu = min(max(1.0 - 1.0 / (1.0 + epochs), self.mu_min), self.mu_max)
        return self.lr / (1.0 + epochs), mu


def regularizer(w: torch.Tensor, v: torch.Tensor, alpha: float, beta: float) -> tuple[float, torch.Tensor]:
    """Value ``α/3‖w−v‖³ + β/‖w−v‖`` and its gradient in w; (0, 0) when w = v."""
    diff = w - v
    distance = float(diff.norm())
    if distance == 0.0 or not math.isfinite(distance):
        return 0.0, torch.zeros_like(w)
    value = alpha / 3.0 * distance**3 + beta / distance
    return value, diff * ((alpha * distance**2 - beta / distance**2) / distance)


class Neumann(Optimizer):
    name = "neumann"
    config_class = NeumannConfig
    state_attributes = ("m", "v", "mu", "beta", "next_reset", "resets", "period")

    @classmethod
    def resolve_config(
        cls, config: NeumannConfig, steps_per_epoch: int | None, run_epochs: float | None = None
    ) -> NeumannConfig:
        """The schedules' unset options: ``epoch_steps`` the data's steps per epoch (ConfigError where
        they are unknown), the burn-in and the first reset period from the run's length
        (:func:`schedule_epochs`)."""
        epoch_steps = config.epoch_steps
        if epoch_steps is None:
            if steps_per_epoch is None:
                raise ConfigError(NO_EPOCH)
            epoch_steps = float(steps_per_epoch)
        warmup, reset = schedule_epochs(run_epochs)
        resolved = replace(
            config,
            epoch_steps=epoch_steps,
            warmup_epochs=warmup if config.warmup_epochs is None else config.warmup_epochs,
            reset_epochs=reset if config.reset_epochs is None else config.reset_epochs,
        )
        resolved.validate()  # ramp_epochs against the burn-in it now has
        return resolved

    def __init__(self, objective: DistributedObjective, config: NeumannConfig) -> None:
        super().__init__(objective, config)
        self.m = torch.zeros_like(self.flat.data)
        self.v: torch.Tensor | None = None
        self.mu = 0.0  # the μ of the current displacement w = (w − μm) + μm
        # beta_rule=relative fixes β at the first reset, from the weights the burn-in left.
        self.beta = config.beta_scale * self.flat.numel if config.beta_rule == "paper" else 0.0
        self.period = max(1, round(config.first_reset_epochs * config.steps_per_epoch))
        self.next_reset = config.warmup_steps
        self.resets = 0

    @contextlib.contextmanager
    def evaluation_parameters(self) -> Iterator[None]:
        """Temporarily set the parameters to w − μm, the model this method stands for."""
        saved = self.flat.clone()
        self.flat.copy_(saved - self.mu * self.m)
        try:
            yield
        finally:
            self.flat.copy_(saved)

    def step(self) -> StepResult:
        cfg = self.config
        loss, grad = self.objective.value_and_grad()
        check_finite_loss(self.name, loss, self.steps)
        w = self.flat.data
        phase = "sgd"
        eta, mu = cfg.schedule(self.steps)
        with torch.no_grad():
            if self.steps < cfg.warmup_steps:
                lr = linear_warmup(cfg.lr, self.steps, cfg.ramp_steps)
                w.add_(grad, alpha=-lr)
                step_norm = lr * float(grad.norm())
            elif self.steps == self.next_reset:
                if self.v is None:
                    self.v = w.clone()
                    if cfg.beta_rule == "relative":
                        self.beta = relative_beta(cfg.alpha, cfg.shell_ratio, float(w.norm()))
                self.m = grad * -eta
                self.mu = mu
                self.next_reset += self.period
                self.period *= 2
                self.resets += 1
                phase, step_norm = "reset", 0.0
            elif self.kernels is not None:
                assert self.v is not None
                step_norm = self._fused_update(self.kernels, w, self.v, grad, eta, mu)
                self.mu = mu
                phase = "neumann"
            else:
                assert self.v is not None
                _, reg_grad = regularizer(w, self.v, cfg.alpha, self.beta)
                d = grad + reg_grad
                self.m.mul_(mu).add_(d, alpha=-eta)
                update = self.m * mu - d * eta
                w.add_(update)
                self.v.sub_(w).mul_(cfg.gamma).add_(w)
                self.mu = mu
                phase, step_norm = "neumann", float(update.norm())
        self.steps += 1
        return StepResult(loss=loss, step_norm=step_norm, extras={"phase": phase, "eta": eta, "mu": mu})

    def _fused_update(
        self, kernels: Kernels, w: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, eta: float, mu: float
    ) -> float:
        """The Neumann update of m, w, v in one fused pass; returns ‖Δw‖."""
        cfg = self.config
        distance_sq = kernels.sq_distance(w, v)
        # As in regularizer(): no repulsive term at w = v or at a non-finite distance.
        coef = neumann_coefficient(distance_sq, cfg.alpha, self.beta) if math.isfinite(distance_sq) else 0.0
        return math.sqrt(kernels.neumann_update_(w, v, self.m, grad, coef, eta, mu, cfg.gamma))
