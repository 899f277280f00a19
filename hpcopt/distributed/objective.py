"""The one interface between an objective and the optimizers, the trainer and checkpoints.

Owns :class:`Objective`, the structural type that both objectives satisfy: the
data-parallel :class:`~hpcopt.distributed.data_parallel.DistributedObjective` (the
whole model on every rank, the batch sharded) and the model-parallel
:class:`~hpcopt.distributed.pipeline.PipelineObjective` (one pipeline stage per
rank).  It holds only what code that does not know which of the two it drives reads
or writes; everything else stays on the concrete class, which an optimizer names
when it needs more (local values, curvature, replica collectives).  It may import
torch, :mod:`hpcopt.comm` and :mod:`hpcopt.numerics` for the types of its members,
and nothing from the optimizer, training or log layers, which import it.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from hpcopt.comm import Communicator
from hpcopt.numerics.flat import FlatParameters


class Objective(Protocol):
    """The global mini-batch loss as an optimizer, the trainer and a checkpoint see it.

    Attributes:
        flat: the parameters this rank holds and steps: the whole model's, or its
            pipeline stage's.
        comm: every rank of the run.
        step: the 1-based global step, set by the trainer before each optimizer step.
    """

    flat: FlatParameters
    comm: Communicator
    step: int

    def set_batch(self, inputs: Tensor, targets: Tensor, global_size: int, noise_seed: int) -> None:
        """Make ``(inputs, targets)`` this rank's part of a global batch of ``global_size`` rows."""
        ...

    def value_and_grad(self) -> tuple[float, Tensor]:
        """The global loss and this rank's block of the global gradient (a view, overwritten by the next call)."""
        ...

    def value(self) -> float:
        """The global loss at the current parameters (a trial evaluation)."""
        ...
