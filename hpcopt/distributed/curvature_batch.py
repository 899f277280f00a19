"""The curvature sub-batch: which rows of the global batch curvature products use.

Hessian-free and NLCG's curvature step length take their curvature products on a
share ``fraction`` of the global batch, which makes a product cost that share of a
gradient.  ``strided`` sampling *(ours)* uses global row p when
``⌈(p+1)·fraction⌉ > ⌈p·fraction⌉``, so the sub-batch is the same set of rows
whatever the number of ranks and a run is rank-count invariant; ``head`` (each
rank's first ``fraction`` of its shard, as in He et al.) is cheaper to slice but
makes the sub-batch depend on P.
"""

from __future__ import annotations

import math

import torch

from hpcopt.distributed.data_parallel import DistributedCurvature, DistributedObjective
from hpcopt.numerics.curvature import CurvatureKind, CurvatureOperator, LocalObjective

SAMPLINGS = ("strided", "head")


def curvature_rows(
    local_size: int, offset: int, global_size: int, fraction: float, sampling: str
) -> tuple[torch.Tensor, int]:
    """This rank's curvature rows (indices into its shard) and the global count |C|.

    ``offset`` is the position of the shard's first row in the global batch.
    """
    if sampling == "head":
        count = max(1, math.ceil(fraction * local_size)) if local_size else 0
        return torch.arange(count), round(count * global_size / max(local_size, 1))
    positions = torch.arange(offset, offset + local_size, dtype=torch.float64)
    selected = torch.ceil((positions + 1) * fraction) > torch.ceil(positions * fraction)
    everywhere = torch.arange(global_size, dtype=torch.float64)
    total = int((torch.ceil((everywhere + 1) * fraction) > torch.ceil(everywhere * fraction)).sum())
    return torch.nonzero(selected).flatten(), total


def _sampled_rows(objective: DistributedObjective, fraction: float, sampling: str) -> tuple[LocalObjective, int, int]:
    """This rank's curvature sub-batch as a local objective, its row count, and |C|.

    Shards of unequal size (the last batch of an epoch) fall back to ``head``
    sampling: strided positions need every shard to have the same size.
    """
    local_objective = objective.local
    local_size = int(local_objective.inputs.shape[0])
    global_size = round(local_size / objective.weight) if objective.weight > 0 else 0
    size = objective.comm.size
    sampling = sampling if local_size * size == global_size else "head"
    rows, total = curvature_rows(local_size, objective.comm.rank * local_size, global_size, fraction, sampling)
    if 0 < len(rows) < local_size:
        local_objective = LocalObjective(
            local_objective.flat,
            objective.problem.forward,
            objective.problem.criterion,
            local_objective.inputs[rows],
            local_objective.targets[rows],
        )
    return local_objective, len(rows), total


def _curvature_of(
    objective: DistributedObjective, local_objective: LocalObjective, kind: CurvatureKind
) -> CurvatureOperator:
    # The same dropout mask on every evaluation of this batch, whatever the RNG did before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(objective.noise_seed)
        return local_objective.curvature(kind)


def sampled_curvature(
    objective: DistributedObjective,
    kind: CurvatureKind,
    fraction: float,
    sampling: str,
    damping: float = 0.0,
    *,
    watch_negative: bool = False,
) -> tuple[DistributedCurvature, int]:
    """The damped curvature at the current parameters on the curvature sub-batch, and |C|."""
    local_objective, count, total = _sampled_rows(objective, fraction, sampling)
    local = _curvature_of(objective, local_objective, kind) if count else None
    operator = DistributedCurvature(objective, local, count / max(total, 1), damping, watch_negative=watch_negative)
    return operator, total


def sampled_local_curvature(
    objective: DistributedObjective, kind: CurvatureKind, fraction: float, sampling: str
) -> CurvatureOperator | None:
    """This rank's own curvature B_r on its rows of the curvature sub-batch (no communication).

    The mean over those rows, so it estimates the shard's B_r at ``fraction`` of the
    cost; ``None`` when the rank holds none of them (``head`` keeps at least one row).
    """
    local_objective, count, _ = _sampled_rows(objective, fraction, sampling)
    return _curvature_of(objective, local_objective, kind) if count else None
