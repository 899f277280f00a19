"""The interface every optimizer sees: a ``Dataset`` pair of tensors and a ``Problem``.

An optimizer never looks inside a problem.  It asks for a model, maps inputs to
outputs with :meth:`Problem.forward`, scores them with :meth:`Problem.criterion`
(a *mean* over rows, so ``len(batch) * loss`` can be summed across ranks) and
evaluates with :meth:`Problem.eval_sums`, which returns plain sums so that ranks
can evaluate disjoint slices and allreduce one float64 buffer.

A problem's options are a :class:`ProblemOptions` dataclass, read by the
machinery of :mod:`hpcopt.config` (:func:`build_options`).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor, nn

from hpcopt.config import Wording, build_config, require
from hpcopt.errors import ConfigError
from hpcopt.numerics.jets import ScalarJet
from hpcopt.problems.defaults import TrainingDefaults

Net = Callable[[Tensor], Tensor]

#: Rows evaluated at once in ``eval_sums``; bounds activation memory on big validation sets.
EVAL_CHUNK = 1000


@dataclass
class Dataset:
    """Inputs and targets whose first dimension indexes samples.

    Attributes:
        inputs: float32 tensor, shape ``(N, ...)``.
        targets: shape ``(N, ...)``; int64 class labels or float32 values.
    """

    inputs: Tensor
    targets: Tensor

    def __post_init__(self) -> None:
        if self.inputs.shape[0] != self.targets.shape[0]:
            raise ValueError(f"Dataset: {self.inputs.shape[0]} input rows but {self.targets.shape[0]} target rows")

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def subset(self, index: Tensor | slice) -> Dataset:
        """Rows selected by a slice (a view) or an index tensor (a copy)."""
        return Dataset(self.inputs[index], self.targets[index])

    def chunks(self, size: int = EVAL_CHUNK) -> Iterator[Dataset]:
        """Consecutive slices of at most ``size`` rows, for bounded-memory evaluation."""
        for start in range(0, len(self), size):
            yield self.subset(slice(start, start + size))

    def batches(self, indices: Iterable[Tensor], num_workers: int = 0, read_ahead: int = 0) -> Iterator[Dataset]:
        """The rows of each index tensor in turn: this rank's shards of an epoch's global batches.

        ``num_workers`` and ``read_ahead`` are for rows read on demand
        (:class:`~hpcopt.problems.streamed.StreamedRows`); rows in memory need no reader.
        """
        del num_workers, read_ahead
        for index in indices:
            yield self.subset(index)

    def close(self) -> None:
        """End the reader processes of :meth:`batches`: rows in memory have none."""


#: Problem options keep the wording their errors had before they shared :mod:`hpcopt.config`.
PROBLEM_WORDING = Wording(
    unknown="unknown option '{key}' for problem '{what}' (choose from {names})",
    wrong_type="problem '{what}' option {key}={value}: expected {type}",
)


@dataclass
class ProblemOptions:
    """Base of every problem's options dataclass (``--set problem.KEY=VALUE``, ``[PROBLEM]`` tables).

    A subclass names its problem in ``problem`` and the least value of each numeric
    option in ``minimum``; :meth:`validate` checks those bounds.  Checks that need the
    data (MNIST's ``limit``) stay in the problem's constructor.  ``train_defaults`` are
    the problem's defaults for ``hpcopt train`` (epochs, stopping rule, batch size,
    optimizer options), used for every option the user leaves unset.
    """

    problem: ClassVar[str] = ""
    minimum: ClassVar[Mapping[str, float]] = {}
    train_defaults: ClassVar[TrainingDefaults] = TrainingDefaults()

    def validate(self) -> None:
        for key, low in self.minimum.items():
            value = getattr(self, key)
            require(value is None or value >= low, f"problem '{self.problem}' option {key}={value}: must be >= {low}")


OptionsT = TypeVar("OptionsT", bound=ProblemOptions)


def build_options(cls: type[OptionsT], given: Mapping[str, object] | None) -> OptionsT:
    """``cls`` filled from the user's options (may be ``None``), with types and bounds checked.

    Strings are parsed with the option's type because values from ``--set k=v`` arrive as text.

    Raises:
        ConfigError: an unknown key, a value that cannot be read as the option's type, or one out of bounds.
    """
    return build_config(cls, given or {}, what=cls.problem, wording=PROBLEM_WORDING)


@contextlib.contextmanager
def evaluation_mode(net: Net) -> Iterator[None]:
    """Put ``net`` (when it is a module) in eval mode and restore every submodule's flag after.

    Restoring per submodule, not with one ``train()`` call, keeps deliberately frozen
    parts (e.g. a batch-norm layer held in eval mode) as the caller left them.
    """
    if not isinstance(net, nn.Module):
        yield
        return
    modes = [(module, module.training) for module in net.modules()]
    net.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class Problem(abc.ABC):
    """A dataset, its models, its loss and its validation metric.

    Subclasses set the class-level descriptors and ``train``, ``val`` and
    ``default_batch_size`` in ``__init__``.
    """

    name: str
    metric_name: str
    metric_higher_is_better: bool
    default_model: str
    models: tuple[str, ...]
    train: Dataset
    val: Dataset
    default_batch_size: int
    #: The model is one module instance (a user's), whose rank-0 state every rank takes at start-up.
    model_from_rank0: bool = False

    def resolve_batch_size(self, requested: int | None = None) -> int:
        """The global mini-batch of a run: ``requested`` when given, else the problem's default.

        The one place that rule lives (``hpcopt train`` and ``hpcopt jobs`` both call it).
        The default is capped at the training set, so a smaller set (``--set problem.n=…``)
        still trains; a requested size is kept as given, for the sharding to check.
        """
        if requested is not None:
            return requested
        return min(self.default_batch_size, len(self.train))

    def build_model(self, name: str | None = None) -> nn.Module:
        """A freshly initialised model; deterministic given the caller's ``torch.manual_seed``.

        Raises:
            ConfigError: ``name`` is not one of ``self.models``.
        """
        chosen = self.default_model if name is None else name
        if chosen not in self.models:
            raise ConfigError(
                f"unknown model '{chosen}' for problem '{self.name}' (choose from {', '.join(self.models)})"
            )
        return self._make_model(chosen)

    @abc.abstractmethod
    def _make_model(self, name: str) -> nn.Module:
        """Build the (already validated) model ``name``."""

    def check_model(self, model: nn.Module, curvature: str | None) -> None:
        """Raise :class:`ConfigError` now if training ``model`` would fail later (no collectives).

        ``curvature`` names the curvature products the run's optimizer takes (``None``:
        gradients only).  The built-in problems are known to work; a user's problem
        (:mod:`hpcopt.problems.custom`) runs its pieces once on a few rows here.
        """
        del model, curvature

    def default_optimizer_options(self, optimizer: str) -> Mapping[str, object]:
        """Options of ``optimizer`` this problem suggests, used where the user sets none.

        The built-in problems' defaults are their ``train_defaults`` (applied by the command
        line); a user's problem declared ``least_squares`` suggests Gauss–Newton curvature.
        """
        del optimizer
        return {}

    @abc.abstractmethod
    def forward(self, net: Net, inputs: Tensor) -> Tensor:
        """Outputs that ``criterion`` compares with the targets.

        Must compose with ``torch.func`` transforms and with double backward,
        because ``net`` may be a ``functional_call`` wrapper inside ``jvp``/``vmap``.
        """

    @abc.abstractmethod
    def criterion(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean loss over rows (a scalar)."""

    @abc.abstractmethod
    def eval_sums(self, net: Net, data: Dataset) -> Tensor:
        """A 1-D float64 tensor of sums over ``data``, to be allreduced before ``eval_metrics``."""

    @abc.abstractmethod
    def eval_metrics(self, sums: Tensor) -> dict[str, float]:
        """``{"val_loss": ..., self.metric_name: ...}`` from (allreduced) ``eval_sums``."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {len(self.train)} train, {len(self.val)} val>"


@runtime_checkable
class JetProblem(Protocol):
    """A problem whose outputs depend on the network only through ``u``, ``∂_i u`` and ``∂_i² u``.

    PINNs implement it so that a pipeline of stages (APTS-IP), in which no rank holds
    the whole network, can still evaluate them: the stages carry the jet of ``u``
    (:mod:`hpcopt.numerics.jets`) and the last stage turns it into the outputs.
    """

    def jet_points(self, inputs: Tensor) -> Tensor:
        """The points ``(n, d)`` the network is evaluated at, out of input rows (flags dropped)."""
        ...

    def outputs_from_jet(self, jet: ScalarJet, inputs: Tensor) -> Tensor:
        """What ``forward(net, inputs)`` returns, from the jet of ``u = net`` at ``jet_points(inputs)``."""
        ...


def as_sums(*values: float | Tensor) -> Tensor:
    """Pack accumulated sums into the float64 vector that ``eval_sums`` returns."""
    return torch.tensor([float(v) for v in values], dtype=torch.float64)
