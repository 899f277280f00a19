"""What ``hpcopt train`` uses for a problem when the user leaves an option unset: :class:`TrainingDefaults`.

``TrainConfig``'s own defaults (10 epochs, an evaluation every epoch, no target)
suit no problem in particular: ten full-batch steps leave a PINN worse than the zero
function.  So every built-in problem declares its own (``train_defaults`` on its
options dataclass, :mod:`hpcopt.problems`), and :func:`resolve_train_values` lays
them under what the user set, in the one place where the command line, the
``--config`` file and ``--set`` are merged (``hpcopt.cli.main``).  A value the
user set, in any of the three, always wins; a default never reaches an optimizer
it does not name.  One default depends on another: the time limit is there to bound
the default number of epochs within minutes, so a user who sets ``epochs`` gets those
epochs, not the problem's time limit (their own ``time_limit`` still applies).

It imports only the standard library and :mod:`hpcopt.config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hpcopt.config import require


def _key(name: str) -> str:
    # The command line and TOML accept max-cg-iterations for max_cg_iterations; compare one spelling.
    return name.replace("-", "_")


@dataclass(frozen=True)
class TrainingDefaults:
    """A problem's defaults for ``hpcopt train``, each used only when the user sets no value.

    Attributes:
        epochs: passes over the training set; with a ``target`` a cap, not a plan.
        batch_size: global mini-batch size (``None``: the whole training set); capped
            at the training set, so a smaller set (``--set problem.n=…``) still trains.
        eval_every: evaluate (and check ``target``) every this many epochs.
        target: stop at the first evaluation whose metric reaches this value (``None``: no target).
        time_limit: stop, and evaluate, after the first step that ends this many seconds in
            (``None``: no limit).
        optimizer_options: optimizer name → options of that optimizer only (e.g. the
            Gauss–Newton global pass of APTS-D for a least-squares loss).
    """

    epochs: int = 10
    batch_size: int | None = None
    eval_every: int = 1
    target: float | None = None
    time_limit: float | None = None
    optimizer_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.epochs >= 1, f"TrainingDefaults: epochs must be >= 1, got {self.epochs}")
        require(self.eval_every >= 1, f"TrainingDefaults: eval_every must be >= 1, got {self.eval_every}")
        require(self.batch_size is None or self.batch_size >= 1, "TrainingDefaults: batch_size must be >= 1")

    def train_values(self) -> dict[str, Any]:
        """The ``TrainConfig`` keys these defaults set (the batch size is the problem's to resolve)."""
        return {
            "epochs": self.epochs,
            "eval_every": self.eval_every,
            "target": self.target,
            "time_limit": self.time_limit,
        }

    def batch_for(self, train_rows: int) -> int:
        """The default global batch for a training set of ``train_rows`` rows."""
        return train_rows if self.batch_size is None else min(self.batch_size, train_rows)

    def rows(self) -> list[tuple[str, str]]:
        """``(option, default)`` pairs for ``hpcopt options PROBLEM``, optimizer options as ``OPTIMIZER: KEY``."""
        batch = "the whole training set" if self.batch_size is None else str(self.batch_size)
        shown: list[tuple[str, str]] = [("epochs", str(self.epochs)), ("batch_size", batch)]
        shown.append(("eval_every", str(self.eval_every)))
        shown.append(("target", "None" if self.target is None else f"{self.target:g}"))
        shown.append(("time_limit", "None" if self.time_limit is None else f"{self.time_limit:g}"))
        for optimizer, options in self.optimizer_options.items():
            shown.extend((f"{optimizer}: {key}", _spell(value)) for key, value in options.items())
        return shown


def _spell(value: object) -> str:
    """A value as ``--set`` spells it: ``true``/``false`` for booleans."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def under(defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` with each default added whose key ``given`` lacks (``-`` and ``_`` spell one key)."""
    taken = {_key(name) for name in given}
    merged = {name: value for name, value in defaults.items() if _key(name) not in taken}
    merged.update(given)
    return merged


def resolve_train_values(defaults: TrainingDefaults | None, train_values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``TrainConfig`` values of a run: the user's ``train_values``, then the problem's ``defaults``.

    The default ``time_limit`` comes only with the default ``epochs`` (see the module docstring).
    """
    if defaults is None:
        return dict(train_values)
    filled = defaults.train_values()
    if "epochs" in {_key(name) for name in train_values}:
        del filled["time_limit"]
    return under(filled, train_values)


def resolve_optimizer_options(
    defaults: TrainingDefaults | None, optimizer: str, given: Mapping[str, Any]
) -> dict[str, Any]:
    """Options of ``optimizer``: the user's ``given``, then the problem's defaults for that optimizer only."""
    if defaults is None:
        return dict(given)
    return under(defaults.optimizer_options.get(optimizer, {}), given)
