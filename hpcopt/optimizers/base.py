"""What every optimizer provides to the trainer, and what it records per step."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hpcopt.objective import DistributedObjective


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
    """

    name: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, objective: DistributedObjective, config: Any) -> None:
        self.objective = objective
        self.config = config
        self.flat = objective.flat
        self.steps = 0

    @abc.abstractmethod
    def step(self) -> StepResult:
        """One outer iteration on the current batch."""
