"""``hpcopt.train``: the run of ``hpcopt train``, called from a user's script.

The same trainer (:func:`hpcopt.training.trainer.train`) runs it, so the run is the same
as on the command line: options checked on every rank before any collective, the run log,
the progress line, checkpoints, the watchdog, ``target`` and ``time_limit``.  Run the
script as one process (``python my_script.py``) or under MPI
(``mpiexec -n 4 python -m mpi4py my_script.py``): every rank calls :func:`train` with the
same arguments and gets the same result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpcopt.comm import Communicator
from hpcopt.config import build_config
from hpcopt.errors import ConfigError
from hpcopt.problems import PROBLEM_OPTIONS
from hpcopt.problems.base import Problem
from hpcopt.problems.defaults import resolve_optimizer_options
from hpcopt.training.config import TrainConfig
from hpcopt.training.trainer import train as run_training


@dataclass
class TrainResult:
    """What :func:`train` returns (the same on every rank).

    Attributes:
        metrics: the last evaluation's metrics: ``val_loss`` and the problem's metric.
        steps: optimizer steps taken.
        epochs: the epoch training ended in.
        final_loss: the global mini-batch loss of the last step.
        losses: the global mini-batch loss of every step.
        wall_time: seconds of training.
        run_log: the HDF5 run log (``None`` without ``out``).
        parameters: the final flat parameter vector (this rank's stage for APTS-IP).
        model: the trained module (``None`` for APTS-IP, where no rank holds all of it).
    """

    metrics: dict[str, float]
    steps: int
    epochs: int
    final_loss: float
    losses: list[float]
    wall_time: float
    run_log: Path | None
    parameters: torch.Tensor
    model: nn.Module | None


def _split_options(options: Mapping[str, object] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Optimizer options and ``problem.KEY`` options, as ``--set`` splits them."""
    optimizer_options: dict[str, Any] = {}
    problem_options: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if key.startswith("problem."):
            problem_options[key.removeprefix("problem.")] = value
        else:
            optimizer_options[key] = value
    return optimizer_options, problem_options


def train(
    problem: Problem | str,
    *,
    optimizer: str = "apts-d",
    epochs: int = 10,
    batch_size: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    options: Mapping[str, object] | None = None,
    comm: Communicator | None = None,
    **train_options: Any,
) -> TrainResult:
    """Train ``problem`` with ``optimizer`` as ``hpcopt train`` does; returns the result on every rank.

    Args:
        problem: a problem (:func:`hpcopt.problem`), or the name of a built-in problem
            (``"poisson2d"``) or plug-in (``"file.py:make_problem"``) as ``--problem`` takes it.
        optimizer: ``apts-d``, ``apts-p``, ``apts-ip``, ``hf``, ``nlcg``, ``neumann``, ``sgd``, ``adam``.
        epochs: passes over the training set.
        batch_size: the global mini-batch (divisible by the rank count); ``None``: the
            problem's default (for :func:`hpcopt.problem`: the training set, at most 1000 rows).
        seed: seeds the model's initial weights, the batch order and dropout.
        out: the HDF5 run log to write (``hpcopt analyze`` reads it).
        options: the optimizer's options as ``--set`` takes them (``{"radius": 0.5}``); for a
            problem given by name also its options as ``"problem.KEY"``.  A built-in problem's
            suggested options (``hpcopt options NAME``) fill what is not given, as on the
            command line, and so do those of a ``least_squares`` problem.
        comm: the ranks to train on (default: every rank of ``MPI_COMM_WORLD``).
        **train_options: any other option of ``hpcopt train`` by its field name
            (``max_steps``, ``eval_every``, ``target``, ``time_limit``, ``quiet``,
            ``checkpoint_every``, ``num_workers``, ``read_ahead``, ``threads``, ``overwrite``, …;
            ``hpcopt options train`` lists them).  ``threads`` defaults to 1, one rank per
            core; the caller's torch thread count is restored on return.

    Raises:
        hpcopt.errors.HpcoptError: bad input, raised on every rank before any collective.
    """
    optimizer_options, problem_options = _split_options(options)
    if isinstance(problem, Problem):
        if problem_options:
            raise ConfigError(
                f"problem options ({', '.join(problem_options)}) apply to a problem given by name; "
                "pass them to the function that builds this problem"
            )
        name, given = problem.name, problem
    elif isinstance(problem, str):
        name, given = problem, None
        if name in PROBLEM_OPTIONS:
            defaults = PROBLEM_OPTIONS[name].train_defaults
            optimizer_options = resolve_optimizer_options(defaults, optimizer, optimizer_options)
    else:
        raise ConfigError(f"problem must be a problem (hpcopt.problem(...)) or a name, got {type(problem).__name__}")
    values = {
        "problem": name,
        "optimizer": optimizer,
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        "out": None if out is None else str(out),
        **train_options,
    }
    cfg = build_config(TrainConfig, values, what="train")
    threads = torch.get_num_threads()
    try:
        result = run_training(cfg, optimizer_options, problem_options, comm=comm, problem=given)
    finally:
        torch.set_num_threads(threads)
    return TrainResult(
        metrics=result.metrics,
        steps=result.steps,
        epochs=result.epochs,
        final_loss=result.final_loss,
        losses=result.losses,
        wall_time=result.wall_time,
        run_log=None if cfg.out is None else Path(cfg.out),
        parameters=result.parameters,
        model=result.model,
    )


__all__ = ["TrainResult", "train"]
