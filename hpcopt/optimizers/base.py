"""What every optimizer provides to the trainer, and what it records per step."""

from __future__ import annotations

import abc
import contextlib
import copy
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from hpcopt.distributed.data_parallel import DistributedObjective
from hpcopt.kernels import Kernels, fused_backend


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
    """A distributed optimizer driving a :class:`DistributedObjective`.

    Subclasses set ``name`` and ``config_class`` and implement :meth:`step`,
    which is called once per global mini-batch after ``objective.set_batch``.

    ``kernels`` is the fused-kernel backend of the hot vector updates, chosen once
    here from the device of the flat parameters (:func:`hpcopt.kernels.fused_backend`):
    the CUDA kernels on a GPU with CuPy, else ``None`` (the plain torch code).  A
    test may set it to :class:`~hpcopt.kernels.CpuKernels` to run the fused paths on CPU.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, objective: DistributedObjective, config: Any) -> None:
        self.objective = objective
        self.config = config
        self.flat = objective.flat
        self.steps = 0
        self.kernels: Kernels | None = fused_backend(self.flat.data.device)

    @abc.abstractmethod
    def step(self) -> StepResult:
        """One outer iteration on the current batch."""

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
