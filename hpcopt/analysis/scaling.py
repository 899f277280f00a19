"""Scaling tables: group run logs into strong- and weak-scaling sweeps and compare rank counts.

A *sweep* is a set of runs of the same optimizer, problem and model at different rank
counts.  Runs with the same global batch form a strong-scaling sweep; runs with the same
batch per rank (and different global batches) a weak-scaling sweep.  A run at the
smallest rank count can belong to both (``hpcopt jobs render`` writes the same job for
the 1-rank point of either study).

Columns of :func:`scaling_rows` (``SCALING_COLUMNS``):

* ``iter_time``: median seconds per outer iteration (first step, i.e. start-up, excluded);
* ``speedup``: strong ``P0·t(P0)/t(P)``; weak (scaled speed-up) ``P·t(P0)/t(P)``,
  relative to the smallest rank count ``P0`` of the sweep;
* ``efficiency``: ``speedup / P`` (1 is ideal);
* ``comm_fraction``: time in collectives over wall time, summed over the steps (rank 0);
* ``bytes_per_iter``: collective payload bytes per iteration (rank 0);
* ``final_metric``: the last evaluation's first metric;
* ``file``: the run's shortest distinguishing path among the table's runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import numpy as np

from hpcopt.analysis.perfmodel import CollectiveProfile, Network, predict
from hpcopt.analysis.tables import Run, display_names

__all__ = ["SCALING_COLUMNS", "Sweep", "find_sweeps", "iteration_times", "scaling_rows"]

SCALING_COLUMNS: tuple[str, ...] = (
    "study",
    "optimizer",
    "ranks",
    "global_batch",
    "iter_time",
    "speedup",
    "efficiency",
    "comm_fraction",
    "bytes_per_iter",
    "final_metric",
    "file",
)


class ScalingRow(TypedDict):
    """One row of :func:`scaling_rows`, keys in the order of ``SCALING_COLUMNS``."""

    study: str
    optimizer: str
    ranks: int
    global_batch: int
    iter_time: float
    speedup: float
    efficiency: float
    comm_fraction: float
    bytes_per_iter: float
    final_metric: float
    file: str


@dataclass
class Sweep:
    """Runs of one configuration at increasing rank counts; ``study`` is ``strong`` or ``weak``."""

    study: str
    label: str
    runs: list[Run]

    @property
    def ranks(self) -> list[int]:
        return [_ranks(run) for run in self.runs]


def _ranks(run: Run) -> int:
    return run.integer("world_size", 1)


def _batch(run: Run) -> int:
    return run.integer("batch_size", 0)


def iteration_times(run: Run) -> np.ndarray:
    """Seconds of each step; the first (start-up) is dropped when there are more."""
    wall = run.iterations.get("wall_time")
    if wall is None or not len(wall):
        return np.zeros(0)
    times = np.diff(wall, prepend=0.0)
    return times[1:] if len(times) > 1 else times


def find_sweeps(runs: Sequence[Run]) -> list[Sweep]:
    """Strong sweeps (same global batch) then weak sweeps (same batch per rank), each with ≥ 2 rank counts.

    When a configuration was run twice at one rank count, the later file wins.
    """

    def config(run: Run) -> tuple[str, ...]:
        return tuple(str(run.attributes.get(key, "")) for key in ("optimizer", "problem", "model"))

    sweeps: list[Sweep] = []
    for study in ("strong", "weak"):
        groups: dict[tuple, dict[int, Run]] = {}
        for run in runs:
            ranks, batch = _ranks(run), _batch(run)
            if batch <= 0:
                continue
            if study == "strong":
                key = (*config(run), batch)
            elif batch % ranks == 0:
                key = (*config(run), batch // ranks)
            else:
                continue
            groups.setdefault(key, {})[ranks] = run
        for key, by_ranks in groups.items():
            if len(by_ranks) < 2:
                continue
            ordered = [by_ranks[p] for p in sorted(by_ranks)]
            if study == "weak" and len({_batch(run) for run in ordered}) < 2:
                continue
            unit = "global batch" if study == "strong" else "batch/rank"
            label = f"{key[0]} {key[1]} ({unit} {key[3]})"
            sweeps.append(Sweep(study, label, ordered))
    return sweeps


def _final_metric(run: Run) -> float:
    names = run.metric_names
    values = run.evaluations.get(names[0]) if names else None
    return float(values[-1]) if values is not None and len(values) else math.nan


def _comm_fraction(run: Run) -> float:
    its = run.iterations
    wall, comm = its.get("wall_time"), its.get("comm_time")
    if wall is None or comm is None or not len(wall) or wall[-1] <= 0:
        return math.nan
    return float(np.sum(comm) / wall[-1])


def scaling_rows(sweeps: Sequence[Sweep]) -> list[ScalingRow]:
    """One row per run of each sweep, with the columns of :data:`SCALING_COLUMNS`."""
    rows: list[ScalingRow] = []
    # One name per file, even for a run that belongs to a strong and a weak sweep.
    paths = list(dict.fromkeys(run.path for sweep in sweeps for run in sweep.runs))
    names = dict(zip(paths, display_names(paths)))
    for sweep in sweeps:
        base = sweep.runs[0]
        base_ranks = _ranks(base)
        base_times = iteration_times(base)
        base_time = float(np.median(base_times)) if len(base_times) else math.nan
        for run in sweep.runs:
            ranks = _ranks(run)
            times = iteration_times(run)
            iter_time = float(np.median(times)) if len(times) else math.nan
            ratio = base_time / iter_time if iter_time > 0 else math.nan
            speedup = base_ranks * ratio if sweep.study == "strong" else ranks * ratio
            bytes_per_iter = run.iterations.get("comm_bytes")
            rows.append(
                {
                    "study": sweep.study,
                    "optimizer": str(run.attributes.get("optimizer", "")),
                    "ranks": ranks,
                    "global_batch": _batch(run),
                    "iter_time": iter_time,
                    "speedup": speedup,
                    "efficiency": speedup / ranks,
                    "comm_fraction": _comm_fraction(run),
                    "bytes_per_iter": float(np.mean(bytes_per_iter)) if bytes_per_iter is not None else math.nan,
                    "final_metric": _final_metric(run),
                    "file": names[run.path],
                }
            )
    return rows


MODEL_COLUMNS: tuple[str, ...] = (
    "study",
    "optimizer",
    "ranks",
    "measured_eff",
    "model_eff",
    "model_iter_time",
    "model_comm_fraction",
)


class ModelRow(TypedDict):
    """One row of :func:`model_rows`, keys in the order of ``MODEL_COLUMNS``."""

    study: str
    optimizer: str
    ranks: int
    measured_eff: float
    model_eff: float
    model_iter_time: float
    model_comm_fraction: float


def model_rows(sweeps: Sequence[Sweep], network: Network, extra_ranks: Sequence[int] = ()) -> list[ModelRow]:
    """The α–β model of each sweep (profile from its smallest run) beside the measurement."""

    assert isinstance(network, Network)
    rows: list[ModelRow] = []
    measured = {(row["study"], row["optimizer"], row["ranks"]): row for row in scaling_rows(sweeps)}
    for sweep in sweeps:
        profile = CollectiveProfile.from_run(sweep.runs[0])
        ranks = sorted(set(sweep.ranks) | set(extra_ranks))
        # The model's efficiency is relative to 1 rank; the sweep's to its smallest run.
        base = predict(profile, network, [sweep.ranks[0]], sweep.study)[0]
        for prediction in predict(profile, network, ranks, sweep.study):
            row = measured.get((sweep.study, profile.name, prediction.ranks))
            rows.append(
                {
                    "study": sweep.study,
                    "optimizer": profile.name,
                    "ranks": prediction.ranks,
                    "measured_eff": row["efficiency"] if row else math.nan,
                    "model_eff": prediction.efficiency / base.efficiency,
                    "model_iter_time": prediction.time,
                    "model_comm_fraction": prediction.comm / prediction.time if prediction.time > 0 else math.nan,
                }
            )
    return rows
