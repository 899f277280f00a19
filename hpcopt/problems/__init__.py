"""Problems: datasets, models, losses and validation metrics, behind one interface.

``make_problem(name, data_dir=..., seed=..., options=...)`` builds a problem by name;
optimizers then use only the :class:`~hpcopt.problems.base.Problem` interface.
``PROBLEM_OPTIONS`` names each problem's options dataclass (``hpcopt options NAME``), whose
``train_defaults`` are the problem's defaults for ``hpcopt train`` (:mod:`.defaults`).
A problem knows nothing of ranks: it may import torch, :mod:`hpcopt.numerics` (jets),
:mod:`hpcopt.config` and :mod:`hpcopt.errors` (scipy lazily, where a reference solution
needs it), never MPI or the optimizers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

from hpcopt.errors import ConfigError
from hpcopt.problems.base import Dataset, Problem, ProblemOptions
from hpcopt.problems.mnist.problem import MnistOptions, MnistProblem
from hpcopt.problems.pinn.allen_cahn import (
    AllenCahnOptions,
    AllenCahnProblem,
    AllenCahnTimeOptions,
    AllenCahnTimeProblem,
)
from hpcopt.problems.pinn.poisson import PoissonProblem, poisson_options
from hpcopt.problems.plugin import entry_point_names, find_entry_point, is_spec, load_problem
from hpcopt.problems.synthetic import LogisticOptions, LogisticProblem, QuadraticOptions, QuadraticProblem
from hpcopt.problems.tinyshakespeare import TinyShakespeareOptions, TinyShakespeareProblem

#: Problem name -> constructor taking ``data_dir``, ``seed`` and ``options`` keywords.
PROBLEMS: dict[str, Callable[..., Problem]] = {
    "mnist": MnistProblem,
    "poisson1d": partial(PoissonProblem, dim=1),
    "poisson2d": partial(PoissonProblem, dim=2),
    "poisson3d": partial(PoissonProblem, dim=3),
    "allen-cahn": AllenCahnProblem,
    "allen-cahn-time": AllenCahnTimeProblem,
    "tinyshakespeare": TinyShakespeareProblem,
    "quadratic": QuadraticProblem,
    "logistic": LogisticProblem,
}

#: Problem name -> its options dataclass (the keys of ``--set problem.KEY=VALUE`` and of its TOML table).
PROBLEM_OPTIONS: dict[str, type[ProblemOptions]] = {
    "mnist": MnistOptions,
    "poisson1d": poisson_options(1),
    "poisson2d": poisson_options(2),
    "poisson3d": poisson_options(3),
    "allen-cahn": AllenCahnOptions,
    "allen-cahn-time": AllenCahnTimeOptions,
    "tinyshakespeare": TinyShakespeareOptions,
    "quadratic": QuadraticOptions,
    "logistic": LogisticOptions,
}


def make_problem(
    name: str, *, data_dir: str | None = None, seed: int = 0, options: Mapping[str, object] | None = None
) -> Problem:
    """Build the problem ``name``.

    Args:
        name: a key of :data:`PROBLEMS`, a plug-in ``MODULE:ATTR`` or ``path/to/file.py:ATTR``,
            or a name registered in the entry-point group ``hpcopt.problems`` (:mod:`.plugin`).
        data_dir: folder with the problem's data files (only MNIST reads files).
        seed: seed of generated data (collocation points, synthetic samples).
        options: values of the fields of ``PROBLEM_OPTIONS[name]`` (strings are parsed);
            for a plug-in, its factory's keyword arguments.

    Raises:
        ConfigError: unknown problem name or option, a plug-in that cannot be loaded.
        DataError: missing or malformed data files.
    """
    if name in PROBLEMS:
        return PROBLEMS[name](data_dir=data_dir, seed=seed, options=options)
    if is_spec(name) or find_entry_point(name) is not None:
        return load_problem(name, seed=seed, data_dir=data_dir, options=options)
    installed = entry_point_names()
    also = f"; installed: {', '.join(installed)}" if installed else ""
    raise ConfigError(
        f"unknown problem '{name}' (choose from {', '.join(PROBLEMS)}{also}; "
        "or MODULE:ATTR, path/to/file.py:ATTR for a problem of your own)"
    )


__all__ = ["PROBLEMS", "PROBLEM_OPTIONS", "Dataset", "Problem", "ProblemOptions", "make_problem"]
