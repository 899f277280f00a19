"""The norm of APTS-D's trust region: Euclidean, or an ellipsoid from Adam's second moments.

With ``metric=adam`` *(ours, after the ellipsoidal trust regions of Adolphs, Kohler and
Lucchi, "Ellipsoidal trust region methods and the marginal value of Hessian information
for neural network training", 2019)* the trust region is ‖s‖_A ≤ Δ with
A = diag(√v̂ + ε) normalised to mean 1, v̂ the bias-corrected moving average of the
squared global gradient (Adam's second moment, β₂).  Every solve runs in the scaled
coordinates u = A^½ s, where the region is a ball again: the model's gradient is
A^-½ g, its curvature A^-½ B A^-½, and the step is s = A^-½ u.  The model's steepest
descent step is then -A⁻¹g, Adam's direction, and the curvature decides how far along
it and what to add.  Normalising A to mean 1 keeps Δ, ``radius_min`` and
``radius_max`` on the scale of Euclidean lengths.

A is updated once per outer iteration from the allreduced gradient, so every rank
holds the same A; between updates the local phases, the combination, the ratio test
and the global pass all use the same one.  No communication is added.
"""

from __future__ import annotations

from typing import Any

import torch

from hpcopt.numerics.krylov.cg import MatVec
from hpcopt.optimizers.adam import second_moment_root


class EuclideanMetric:
    """‖s‖₂: every map is the identity (the APTS papers' trust region)."""

    name = "euclidean"

    def update(self, grad: torch.Tensor) -> None:
        """Nothing to learn."""

    def step(self, scaled: torch.Tensor) -> torch.Tensor:
        """The step s for the scaled step u (here u itself)."""
        return scaled

    def gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """The model's gradient in scaled coordinates (here g itself)."""
        return grad

    def curvature(self, matvec: MatVec) -> MatVec:
        """The model's curvature product in scaled coordinates (here ``matvec`` itself)."""
        return matvec

    def pair(self, step: torch.Tensor, grad_change: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A quasi-Newton pair (s, y) in scaled coordinates (here unchanged)."""
        return step, grad_change

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


class AdamMetric(EuclideanMetric):
    """‖s‖_A with A = diag(√v̂ + ε) / mean(√v̂ + ε), v̂ Adam's bias-corrected second moment.

    Args:
        beta: decay of the moving average of g² (Adam's β₂).
        eps: added to √v̂ before normalising (Adam's ε).
    """

    name = "adam"

    def __init__(self, beta: float = 0.999, eps: float = 1e-8) -> None:
        self.beta = beta
        self.eps = eps
        self.second_moment: torch.Tensor | None = None
        self.updates = 0
        #: A^-½, elementwise; ``None`` before the first update (the metric is then Euclidean).
        self.inverse_root: torch.Tensor | None = None

    def update(self, grad: torch.Tensor) -> None:
        """Fold the (replicated) gradient of this outer iteration into v and rebuild A^-½."""
        squared = grad.detach().square()
        if self.second_moment is None:
            self.second_moment = torch.zeros_like(squared)
        self.second_moment.mul_(self.beta).add_(squared, alpha=1.0 - self.beta)
        self.updates += 1
        self._rebuild()

    def _rebuild(self) -> None:
        assert self.second_moment is not None
        diagonal = second_moment_root(self.second_moment, self.beta, self.updates, self.eps)
        diagonal.div_(diagonal.mean())
        self.inverse_root = diagonal.rsqrt_()

    def step(self, scaled: torch.Tensor) -> torch.Tensor:
        return scaled if self.inverse_root is None else scaled * self.inverse_root

    def gradient(self, grad: torch.Tensor) -> torch.Tensor:
        return grad if self.inverse_root is None else grad * self.inverse_root

    def curvature(self, matvec: MatVec) -> MatVec:
        inverse_root = self.inverse_root
        if inverse_root is None:
            return matvec

        def scaled_matvec(v: torch.Tensor) -> torch.Tensor:
            return matvec(v * inverse_root) * inverse_root

        return scaled_matvec

    def pair(self, step: torch.Tensor, grad_change: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # u = A^½ s and the gradient change of u ↦ f(θ + A^-½ u) is A^-½ y, with this A.
        if self.inverse_root is None:
            return step, grad_change
        return step / self.inverse_root, grad_change * self.inverse_root

    def state_dict(self) -> dict[str, Any]:
        # An empty tensor stands for "no gradient seen yet", which checkpoints store as is.
        moment = torch.empty(0) if self.second_moment is None else self.second_moment.clone()
        return {"second_moment": moment, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        moment = state.get("second_moment")
        has_moment = moment is not None and torch.as_tensor(moment).numel() > 0
        self.second_moment = torch.as_tensor(moment).clone() if has_moment else None
        self.updates = int(state.get("updates", 0))
        self.inverse_root = None
        if self.second_moment is not None and self.updates > 0:
            self._rebuild()


METRICS = ("euclidean", "adam")


def make_metric(name: str, beta: float, eps: float) -> EuclideanMetric:
    """The trust-region norm called ``name`` (``euclidean`` or ``adam``)."""
    return AdamMetric(beta, eps) if name == "adam" else EuclideanMetric()
