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


def sampled_local_objective(objective: DistributedObjective, fraction: float, sampling: str) -> LocalObjective:
    """This rank's rows of the sub-batch at ``fraction`` as a local objective (its shard if it holds none).

    The rows :func:`sampled_local_curvature` uses at the same fraction and sampling.
    """
    return _sampled_rows(objective, fraction, sampling)[0]


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


class BatchCurvature:
    """The global curvature at the current parameters, on the whole batch or its sub-batch.

    A product builds the distributed operator on first use (:func:`sampled_curvature` or
    :meth:`DistributedObjective.curvature`: a forward and a backward with graph) and
    reduces n floats per product.  :meth:`gram` needs neither: each rank forms
    ``[vᵢᵀ B_r vⱼ]`` for a few replicated vectors (for Gauss–Newton by forward-mode
    Jacobian-vector products, :meth:`LocalObjective.gram`) and the ranks reduce k²
    scalars.  The subspace solver asks for the Gram, CG for products.
    """

    def __init__(self, objective: DistributedObjective, kind: CurvatureKind, fraction: float, sampling: str) -> None:
        self.objective = objective
        self.kind = kind
        self.fraction = fraction
        self.sampling = sampling
        self._operator: DistributedCurvature | None = None

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if self._operator is None:
            if self.fraction >= 1.0:
                self._operator = self.objective.curvature(self.kind)
            else:
                self._operator, _ = sampled_curvature(self.objective, self.kind, self.fraction, self.sampling)
        return self._operator(v)

    def gram(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        """``[vᵢᵀ(Σ_r w_r B_r)vⱼ]`` with one allreduce of k² scalars."""
        objective = self.objective
        k = len(vectors)
        if self.fraction >= 1.0:
            local_objective, count, weight = objective.local, 1, objective.weight
        else:
            local_objective, count, total = _sampled_rows(objective, self.fraction, self.sampling)
            weight = count / max(total, 1)
        local = torch.zeros(k, k, dtype=torch.float64)
        if count:
            # The batch's dropout mask, as for the product operator (_curvature_of).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(objective.noise_seed)
                local = weight * local_objective.gram(self.kind, vectors)
        summed = objective.comm.allreduce_scalars(local.flatten().tolist())
        return torch.tensor(summed, dtype=torch.float64).reshape(k, k)
