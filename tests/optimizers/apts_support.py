"""Set-up shared by the APTS optimizer tests: the start of an outer iteration, taken apart.

The tests of APTS-D and APTS-P call a variant's local phase directly, with the
quantities that its ``step`` computes first; this module computes them the same way.
It imports torch and the data-parallel objective only.
"""

from __future__ import annotations

import torch

from hpcopt.distributed.data_parallel import DistributedObjective
from hpcopt.numerics.flat import FlatParameters


def outer_start(
    flat: FlatParameters, objective: DistributedObjective
) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """``(θ_k, f_r, g_r, g)`` at the current parameters; one allreduce, as ``step`` does.

    The gradients are copies: the objective's own buffers are overwritten by the next evaluation.
    """
    theta = flat.clone()
    loss_local, grad_local = objective.local_value_and_grad()
    grad_local = grad_local.clone()
    _, grad = objective.reduce_value_and_grad(loss_local, grad_local)
    return theta, loss_local, grad_local, grad.clone()
