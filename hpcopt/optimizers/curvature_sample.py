"""The check of a curvature sub-batch's two options, shared by HF, NLCG and APTS-D.

Each of them takes curvature products on ``curvature_fraction`` of the batch, chosen by
``curvature_sampling`` (:mod:`hpcopt.distributed.curvature_batch`); this module
validates the pair once for all three, with the optimizer's name in the message.
"""

from __future__ import annotations

from hpcopt.config import require
from hpcopt.distributed.curvature_batch import SAMPLINGS


def require_curvature_sample(name: str, fraction: float, sampling: str) -> None:
    """Raise :class:`~hpcopt.errors.ConfigError` unless 0 < fraction ≤ 1 and sampling is known."""
    require(0 < fraction <= 1, f"{name}: curvature_fraction must be in (0, 1], got {fraction}")
    require(
        sampling in SAMPLINGS,
        f"{name}: curvature_sampling must be one of {', '.join(SAMPLINGS)}, got '{sampling}'",
    )
