"""What every optimizer provides to the trainer and to checkpoints, and what it records per step.

An optimizer drives an :class:`~hpcopt.distributed.objective.Objective`.  The hooks
that build it, place the batch, evaluate, describe the run and move the model in and
out of a checkpoint default to what the data-parallel optimizers need (every rank
holds the whole model); a model-parallel optimizer (APTS-IP) overrides them, so the
trainer and the checkpoint code never ask which kind they drive.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import torch
from torch import nn

from hpcopt.comm import Communicator
from hpcopt.distributed.data_parallel import DistributedObjective
from hpcopt.distributed.objective import Objective
from hpcopt.distributed.sharding import contiguous_slice
from hpcopt.kernels import Kernels, fused_backend
from hpcopt.numerics.flat import FlatParameters
from hpcopt.problems.base import Problem, evaluation_mode


def _copied(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return copy.deepcopy(value)


@dataclass
class StepResult:
    """One outer iteration, as the run log records it.

    ``loss`` is the global mini-batch loss at the parameters the step started
    from; ``radius`` is the trust-region radius before the step (NaN for methods
    without one); ``ratio`` is ρ of the final accept/reject decision.
    """

    loss: float
    radius: float = math.nan
    step_norm: float = math.nan
    ratio: float = math.nan
    accepted: bool = True
    extras: dict[str, Any] = field(default_factory=dict)


class Optimizer(abc.ABC):
    """A distributed optimizer driving an :class:`~hpcopt.distributed.objective.Objective`.

    Subclasses set ``name`` and ``config_class`` and implement :meth:`step`,
    which is called once per global mini-batch after ``objective.set_batch``.  One
    that needs more of its objective than the protocol narrows the ``objective``
    annotation to the concrete class its :meth:`build` creates.

    ``kernels`` is the fused-kernel backend of the hot vector updates, chosen once
    here from the device of the flat parameters (:func:`hpcopt.kernels.fused_backend`):
    the CUDA kernels on a GPU with CuPy, else ``None`` (the plain torch code).  A
    test may set it to :class:`~hpcopt.kernels.CpuKernels` to run the fused paths on CPU.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, objective: Objective, config: Any) -> None:
        self.objective: Objective = objective
        self.config = config
        self.flat = objective.flat
        self.steps = 0
        self.kernels: Kernels | None = fused_backend(self.flat.data.device)

    # -- construction and data placement (before any instance exists) -------------

    @classmethod
    def build(cls, problem: Problem, model: nn.Module, comm: Communicator, config: Any) -> Self:
        """This rank's optimizer for ``model``, which is identical on every rank until now.

        Every rank keeps the whole model and is given its shard of each batch
        (:class:`~hpcopt.distributed.data_parallel.DistributedObjective`); no communication.
        """
        return cls(DistributedObjective(problem, FlatParameters(model), comm), config)

    @classmethod
    def data_shard(cls, config: Any, rank: int, world_size: int, batch_size: int) -> tuple[int, int]:
        """``(shard, shards)``: ``rank`` is given shard ``shard`` of ``shards`` of every global batch.

        Called before any collective, so a layout that cannot split a batch of
        ``batch_size`` rows raises :class:`~hpcopt.errors.ConfigError` on every rank alike.
        """
        del config, batch_size  # every rank its own shard, whatever the size
        return rank, world_size

    @classmethod
    def resolve_config(cls, config: Any, steps_per_epoch: int | None, run_epochs: float | None = None) -> Any:
        """``config`` with the options that depend on the data filled in where the user left them unset.

        ``steps_per_epoch``: the global batches of one pass over the training set (``hpcopt
        train`` knows them), or ``None`` where the caller does not (a loop of the user's own):
        then an option that needs them must be set, else :class:`~hpcopt.errors.ConfigError`.
        ``run_epochs``: the run's length in epochs where the caller knows it (``hpcopt train``'s
        ``--epochs``), for options that scale with it. No communication; the base needs
        nothing from the data.
        """
        del steps_per_epoch, run_epochs
        return config

    @classmethod
    def checkpoint_layout(cls, config: Any, model: nn.Module, world_size: int) -> dict[str, Any] | None:
        """How the model is laid out over the ranks, which a resumed run must match (no communication).

        ``None``: every rank holds the whole model, and the rank count (checked for
        every checkpoint) is all a resumed run must match.
        """
        del config, model, world_size
        return None

    # -- what the trainer and checkpoints ask of a running optimizer ---------------

    @abc.abstractmethod
    def step(self) -> StepResult:
        """One outer iteration on the current batch."""

    def run_step(
        self, inputs: torch.Tensor, targets: torch.Tensor, global_size: int, *, seed: int, step: int
    ) -> StepResult:
        """One outer iteration on this rank's part of a global batch of ``global_size`` rows.

        ``step`` counts the steps taken before this one and ``seed`` is the run's seed:
        together they seed the batch's dropout masks, so ``hpcopt train`` and
        :func:`hpcopt.optimizer` take the same step on the same batch.
        """
        self.objective.set_batch(inputs, targets, global_size, noise_seed=seed * 1_000_003 + step)
        self.objective.step = step + 1
        return self.step()

    def run_attributes(self) -> dict[str, object]:
        """Optimizer-specific run-log attributes, which override the trainer's.

        Every rank calls this, so an override may gather from all ranks.
        """
        return {}

    def evaluate(self, problem: Problem) -> dict[str, float]:
        """Collective: validation metrics at the current parameters.

        Each rank evaluates a contiguous slice of the validation set with the whole
        model and the sums are allreduced.
        """
        comm, flat = self.objective.comm, self.flat
        part = problem.val.subset(contiguous_slice(len(problem.val), comm.rank, comm.size))
        # The functional closure runs the module as it is: switch the module itself to
        # eval mode (dropout off, batch norm on its running statistics, left unchanged).
        with evaluation_mode(flat.model):
            sums = problem.eval_sums(flat.functional(flat.data), part).to(torch.float64)
        comm.allreduce_(sums, reuse=False)
        return problem.eval_metrics(sums)

    def gather_model(self) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Collective: the whole model's flat parameters and, per replica of it, its buffers.

        The buffers are ``name → tensor`` dicts under the whole model's names.  Every
        rank holds the whole model here, so this is the flat vector and the model's
        buffers themselves, with no communication; they are the live tensors, so a
        caller copies what it keeps.
        """
        return self.flat.data, [dict(self.flat.model.named_buffers())]

    def load_model(self, parameters: torch.Tensor, buffers: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Take this rank's part of :meth:`gather_model`'s result back (no communication)."""
        self.flat.copy_(parameters)
        own = dict(self.flat.model.named_buffers())
        with torch.no_grad():
            for name, value in buffers[0].items():
                own[name].copy_(value)

    def move_to(self, theta: torch.Tensor, step: torch.Tensor) -> None:
        """Set the parameters to the trial point ``θ + s`` (one fused pass with ``kernels``)."""
        if self.kernels is None:
            self.flat.copy_(theta + step)
            return
        with torch.no_grad():
            self.kernels.tr_trial(self.flat.data, theta, step)

    @contextlib.contextmanager
    def evaluation_parameters(self) -> Iterator[None]:
        """Temporarily hold the parameters the method stands for (evaluation, final model).

        Most methods iterate on the model itself and do nothing here; a method whose
        iterate is displaced (Neumann: w stands for w − μm) sets the model's
        parameters for the duration of the ``with`` block and restores them after.
        """
        yield

    #: Attributes (besides ``steps``) that a restart needs; tensors are saved as copies.
    state_attributes: ClassVar[tuple[str, ...]] = ()

    def state_dict(self) -> dict[str, Any]:
        """Everything a restart needs besides the parameters (tensors are copies).

        Subclasses list plain attributes in ``state_attributes`` or extend this; values
        are tensors, numbers, strings, ``None`` and lists/dicts of them, so
        ``torch.load(..., weights_only=True)`` reads a checkpoint back.
        """
        state: dict[str, Any] = {"steps": self.steps}
        for name in self.state_attributes:
            state[name] = _copied(getattr(self, name))
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, bit for bit."""
        self.steps = int(state["steps"])
        for name in self.state_attributes:
            setattr(self, name, _copied(state[name]))
