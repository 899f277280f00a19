"""What a trust-region subproblem solver returns (shared by every solver module)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SubproblemResult:
    """A step and what the model predicts for it.

    Attributes:
        step: The step ``s``, ``||s|| <= radius``.
        pred: ``m(0) - m(s) = -(g's + 1/2 s'Bs)``.
        exit: ``converged``, ``boundary``, ``negative_curvature``, ``max_iters`` or
            ``nonfinite``.
        iterations: Curvature products used (0 for ``cauchy``).
    """

    step: torch.Tensor
    pred: float
    exit: str
    iterations: int
