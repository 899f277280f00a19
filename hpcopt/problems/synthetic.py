"""Synthetic convex problems with a known minimiser, for checking optimizers against float64 references.

Both draw Gaussian inputs ``X`` ``(n, dim)`` and a random linear teacher ``(w*, b*)``
from a generator seeded by ``seed``; the model is ``linear`` (``dim -> 1``) and the
default batch is the full training set.

"quadratic": ``y = X w* + b* + noise * eps``; loss ``0.5 * mean((X w + b - y)^2)``
(the 1/2 makes the Hessian exactly ``A^T A / n`` with ``A = [X, 1]``).  Metric
``val_rel_error = ||pred - y|| / ||y||`` on held-out data, lower is better; it
cannot fall below the noise level.

"logistic": labels ``y ~ Bernoulli(sigmoid(X w* + b*))``, targets float 0/1; loss
the mean binary cross-entropy of the logit (no regulariser).  Sampled labels make
the classes overlap, so for ``n`` well above ``dim`` the data are not linearly
separable and the minimiser is finite.  Metric ``val_accuracy``, higher is better.

Options: :class:`QuadraticOptions` and :class:`LogisticOptions` (``hpcopt options quadratic``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcopt.config import to_dict
from hpcopt.errors import ConfigError
from hpcopt.problems import models
from hpcopt.problems.base import Dataset, Net, Problem, ProblemOptions, as_sums, build_options, evaluation_mode
from hpcopt.problems.defaults import TrainingDefaults


@dataclass
class SyntheticOptions(ProblemOptions):
    """Options of both synthetic problems.

    Attributes:
        n: training rows.
        n_val: validation rows.
        dim: features per row (inputs of the linear model).
    """

    minimum: ClassVar[Mapping[str, float]] = {"n": 1, "n_val": 1, "dim": 1}

    n: int = 1000
    n_val: int = 500
    dim: int = 20


@dataclass
class QuadraticOptions(SyntheticOptions):
    """Options of ``quadratic``: those of :class:`SyntheticOptions` and

    Attributes:
        noise: standard deviation of the Gaussian noise added to the teacher's outputs.
    """

    problem: ClassVar[str] = "quadratic"
    # Full-batch APTS-D is at the float64 minimiser to float32 precision (1e-7) after 8
    # epochs; 20 leave a margin for other seeds and sizes at no cost (docs/problems.md).
    train_defaults: ClassVar[TrainingDefaults] = TrainingDefaults(epochs=20)

    noise: float = 0.1


@dataclass
class LogisticOptions(SyntheticOptions):
    """Options of ``logistic``: those of :class:`SyntheticOptions` and

    Attributes:
        teacher_scale: norm of the teacher's weight ``w*`` (larger: cleaner labels).
    """

    problem: ClassVar[str] = "logistic"
    # At the minimiser to float32 precision after 15 full-batch epochs; 30 leave a margin.
    train_defaults: ClassVar[TrainingDefaults] = TrainingDefaults(epochs=30)

    teacher_scale: float = 2.0


class _LinearTeacherProblem(Problem):
    """Shared data generation, model and forward of the synthetic problems."""

    default_model = "linear"
    models = ("linear",)
    options_class: ClassVar[type[SyntheticOptions]]
    #: The resolved options as a plain dict: checkpoints record it to refuse a resume with other data.
    options: dict[str, Any]
    _opts: SyntheticOptions

    def __init__(
        self, *, data_dir: str | None = None, seed: int = 0, options: Mapping[str, object] | None = None
    ) -> None:
        del data_dir  # the data are generated
        self._opts = build_options(self.options_class, options)
        self.options = to_dict(self._opts)
        self.dim = self._opts.dim
        generator = torch.Generator().manual_seed(seed)
        n_total = self._opts.n + self._opts.n_val
        inputs = torch.randn(n_total, self.dim, generator=generator, dtype=torch.float64)
        weight = torch.randn(self.dim, generator=generator, dtype=torch.float64) / math.sqrt(self.dim)
        bias = torch.randn((), generator=generator, dtype=torch.float64)
        targets = self._targets(inputs @ weight + bias, generator)
        inputs, targets = inputs.to(torch.float32), targets.to(torch.float32)
        n = self._opts.n
        self.train = Dataset(inputs[:n], targets[:n])
        self.val = Dataset(inputs[n:], targets[n:])
        self.default_batch_size = self._opts.train_defaults.batch_for(n)
        self._minimizer: Tensor | None = None

    def _targets(self, teacher: Tensor, generator: torch.Generator) -> Tensor:
        """Targets from the teacher's float64 outputs ``X w* + b*``."""
        raise NotImplementedError

    def _make_model(self, name: str) -> nn.Module:
        return models.linear(self.dim, 1)

    def forward(self, net: Net, inputs: Tensor) -> Tensor:
        return net(inputs).squeeze(-1)

    def exact_minimizer(self) -> Tensor:
        """float64 minimiser of the training loss, flat in ``nn.Linear`` order (weight, then bias)."""
        if self._minimizer is None:
            design = self.train.inputs.to(torch.float64).numpy()
            design = np.concatenate([design, np.ones((len(design), 1))], axis=1)
            targets = self.train.targets.to(torch.float64).numpy()
            self._minimizer = torch.from_numpy(self._solve(design, targets))
        return self._minimizer.clone()

    def _solve(self, design: np.ndarray, targets: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class QuadraticProblem(_LinearTeacherProblem):
    """Linear least squares; see the module docstring."""

    name = "quadratic"
    metric_name = "val_rel_error"
    metric_higher_is_better = False
    options_class = QuadraticOptions
    _opts: QuadraticOptions

    def _targets(self, teacher: Tensor, generator: torch.Generator) -> Tensor:
        noise = torch.randn(teacher.shape, generator=generator, dtype=torch.float64)
        return teacher + self._opts.noise * noise

    def criterion(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * torch.mean((outputs - targets) ** 2)

    def eval_sums(self, net: Net, data: Dataset) -> Tensor:
        """``[sum (pred - y)^2, sum y^2, count]``."""
        squared_error, squared_target = 0.0, 0.0
        with torch.no_grad(), evaluation_mode(net):
            for chunk in data.chunks():
                residual = self.forward(net, chunk.inputs).to(torch.float64) - chunk.targets.to(torch.float64)
                squared_error += torch.sum(residual**2).item()
                squared_target += torch.sum(chunk.targets.to(torch.float64) ** 2).item()
        return as_sums(squared_error, squared_target, len(data))

    def eval_metrics(self, sums: Tensor) -> dict[str, float]:
        squared_error, squared_target, count = sums.tolist()
        # An all-zero target would make the ratio undefined; fall back to the absolute error.
        relative = math.sqrt(squared_error / (squared_target if squared_target > 0 else 1.0))
        return {"val_loss": 0.5 * squared_error / max(count, 1.0), "val_rel_error": relative}

    def _solve(self, design: np.ndarray, targets: np.ndarray) -> np.ndarray:
        solution, *_ = np.linalg.lstsq(design, targets, rcond=None)
        return solution


class LogisticProblem(_LinearTeacherProblem):
    """Binary logistic regression; see the module docstring."""

    name = "logistic"
    metric_name = "val_accuracy"
    metric_higher_is_better = True
    options_class = LogisticOptions
    _opts: LogisticOptions

    def _targets(self, teacher: Tensor, generator: torch.Generator) -> Tensor:
        # The teacher's weight has norm ~1; scaling the logits sets how clean the labels are.
        probability = torch.sigmoid(self._opts.teacher_scale * teacher)
        return torch.bernoulli(probability, generator=generator)

    def criterion(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(outputs, targets)

    def eval_sums(self, net: Net, data: Dataset) -> Tensor:
        """``[loss_sum, correct, count]``."""
        loss_sum, correct = 0.0, 0
        with torch.no_grad(), evaluation_mode(net):
            for chunk in data.chunks():
                logits = self.forward(net, chunk.inputs)
                loss_sum += F.binary_cross_entropy_with_logits(logits, chunk.targets, reduction="sum").item()
                correct += int(((logits > 0).to(chunk.targets.dtype) == chunk.targets).sum())
        return as_sums(loss_sum, correct, len(data))

    def eval_metrics(self, sums: Tensor) -> dict[str, float]:
        loss_sum, correct, count = sums.tolist()
        count = max(count, 1.0)
        return {"val_loss": loss_sum / count, "val_accuracy": correct / count}

    def _solve(self, design: np.ndarray, targets: np.ndarray) -> np.ndarray:
        # Imported here, not at the top: see _tridiagonal_newton in hpcopt/problems/pinn/allen_cahn.py.
        import scipy.optimize
        import scipy.special

        n = len(targets)

        def loss_and_grad(params: np.ndarray) -> tuple[float, np.ndarray]:
            logits = design @ params
            # log(1 + e^z) - y z, written with logaddexp so large |z| neither overflows nor cancels.
            loss = np.mean(np.logaddexp(0.0, logits) - targets * logits)
            grad = design.T @ (scipy.special.expit(logits) - targets) / n
            return float(loss), grad

        result = scipy.optimize.minimize(
            loss_and_grad,
            np.zeros(design.shape[1]),
            jac=True,
            method="BFGS",
            options={"gtol": 1e-10, "maxiter": 10_000},
        )
        gradient_norm = float(np.max(np.abs(loss_and_grad(result.x)[1])))
        # On separable data the loss only tends to 0 as |w| grows, with a vanishing gradient, so
        # the gradient cannot tell; a finite minimiser, however, never classifies every row correctly.
        margins = (2.0 * targets - 1.0) * (design @ result.x)
        if np.all(margins > 0):
            raise ConfigError(
                f"problem 'logistic': the training data (n={n}, dim={self.dim}) are linearly separable, "
                "so the loss has no finite minimiser: increase n or lower teacher_scale"
            )
        if not np.all(np.isfinite(result.x)) or gradient_norm > 1e-7:
            # Not a user error: well-posed logistic regression is smooth and strictly convex.
            raise RuntimeError(f"logistic exact_minimizer: BFGS stopped at gradient {gradient_norm:.1e}")
        return result.x
