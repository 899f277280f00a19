"""An α–β performance model of data-parallel training, and its calibration.

Time of one outer iteration on ``P`` ranks::

    T(P) = compute(P) + calls · allreduce(P, m)          m = bytes / calls

with ``calls`` and ``bytes`` the collectives per iteration taken from a run log (the
``comm_calls`` and ``comm_bytes`` columns; they do not depend on ``P`` for data
parallelism) and ``compute(P)`` the measured compute time per iteration
(``wall − comm``) at the reference rank count ``P0``, scaled ``P0/P`` for strong scaling
(the global batch is split) and kept for weak scaling (the batch per rank is fixed).
Every allreduce formula below is affine in ``m``, so ``calls · allreduce(P, m̄)`` with
the mean message size equals the sum over the individual messages exactly.

Allreduce of ``m`` bytes on ``P`` ranks, latency ``α`` (s), inverse bandwidth ``β`` (s/B):

* ``ring``:               ``2(P−1)·α + 2(P−1)/P · m·β``  (reduce-scatter + allgather
  around a ring; bandwidth-optimal, latency linear in P);
* ``recursive-doubling``: ``⌈log2 P⌉·(α + m·β)``  (latency-optimal, full message each round);
* ``rabenseifner``:       ``2⌈log2 P⌉·α + 2(P−1)/P · m·β``  (recursive halving + doubling);
* ``auto``:  the cheapest of the three for the message at hand, as MPI libraries pick
  (recursive doubling for short messages, Rabenseifner or ring for long ones).

The reduction arithmetic (γ term) is neglected; at 25 GB/s it is of the same order as
β and would shift the predictions by a constant factor on the bandwidth term.

Calibration: ``hpcopt calibrate`` under ``mpiexec`` times ``MPI_Allreduce`` for several
sizes on the ranks at hand (:func:`hpcopt.comm.calibration.measure_allreduce`);
:func:`fit_network` fits ``α`` and ``β`` by least squares through the chosen formula;
:func:`calibrate` does both, the timing in a child ``mpiexec`` (``hpcopt analyze --calibrate``).

This module never imports MPI: it may import numpy and :mod:`hpcopt.errors`, and
reaches the communication layer only through the ``hpcopt calibrate`` command line.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hpcopt.errors import ConfigError, DataError

if TYPE_CHECKING:  # annotations only: tables imports h5py
    from hpcopt.analysis.tables import Run

__all__ = [
    "ALGORITHMS",
    "CollectiveProfile",
    "Network",
    "Prediction",
    "allreduce_time",
    "calibrate",
    "fit_network",
    "predict",
]

ALGORITHMS: tuple[str, ...] = ("auto", "ring", "recursive-doubling", "rabenseifner")


@dataclass(frozen=True)
class Network:
    """Latency ``latency`` (s per message) and ``bandwidth`` (bytes/s per link) of an interconnect."""

    latency: float
    bandwidth: float
    algorithm: str = "auto"

    def __post_init__(self) -> None:
        if not (self.latency >= 0 and self.bandwidth > 0):
            raise ConfigError(f"network needs latency >= 0 and bandwidth > 0, got {self.latency}, {self.bandwidth}")
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"allreduce algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")

    def describe(self) -> str:
        return f"α={self.latency * 1e6:.3g} µs, bandwidth {self.bandwidth / 1e9:.3g} GB/s, {self.algorithm}"

    def to_json(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Network:
        try:
            values = json.loads(Path(path).read_text())
            return cls(float(values["latency"]), float(values["bandwidth"]), str(values.get("algorithm", "auto")))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DataError(f"cannot read network calibration {path}: {error}") from None


def _terms(algorithm: str, ranks: int) -> tuple[float, float]:
    """(latency count, bandwidth factor) of one allreduce: time = a·α + b·m·β."""
    if ranks <= 1:
        return 0.0, 0.0
    log_p = math.ceil(math.log2(ranks))
    if algorithm == "ring":
        return 2.0 * (ranks - 1), 2.0 * (ranks - 1) / ranks
    if algorithm == "recursive-doubling":
        return float(log_p), float(log_p)
    if algorithm == "rabenseifner":
        return 2.0 * log_p, 2.0 * (ranks - 1) / ranks
    raise ConfigError(f"no closed form for allreduce algorithm {algorithm!r}")


def allreduce_time(ranks: int, nbytes: float, network: Network) -> float:
    """Seconds for one allreduce of ``nbytes`` on ``ranks`` ranks (0 on one rank)."""
    algorithms = ALGORITHMS[1:] if network.algorithm == "auto" else (network.algorithm,)
    beta = 1.0 / network.bandwidth
    return min(a * network.latency + b * nbytes * beta for a, b in (_terms(alg, ranks) for alg in algorithms))


@dataclass
class CollectiveProfile:
    """What one outer iteration costs on the reference rank count.

    Attributes:
        name: label (the optimizer).
        calls: collectives per iteration.
        bytes: payload bytes per iteration, summed over the collectives.
        compute: seconds of compute per iteration at ``ref_ranks`` (wall − comm).
        ref_ranks: the rank count ``compute`` was measured on.
    """

    name: str
    calls: float
    bytes: float
    compute: float
    ref_ranks: int = 1

    @classmethod
    def from_run(cls, run: Run) -> CollectiveProfile:
        """Median compute time per step and mean collectives per step of a loaded run log.

        The first step (start-up, MPI connection set-up) is left out when there are more.
        """
        its = run.iterations
        wall = its.get("wall_time")
        if wall is None or not len(wall):
            raise DataError(f"run log {run.path} has no iterations to build a profile from")
        step_time = np.diff(wall, prepend=0.0)
        comm_time = its.get("comm_time", np.zeros_like(step_time))
        keep = slice(1, None) if len(step_time) > 1 else slice(None)
        compute = float(np.median(step_time[keep] - comm_time[keep]))
        return cls(
            name=str(run.attributes.get("optimizer", "run")),
            calls=float(np.mean(its.get("comm_calls", np.zeros(1))[keep])),
            bytes=float(np.mean(its.get("comm_bytes", np.zeros(1))[keep])),
            compute=max(compute, 0.0),
            ref_ranks=run.integer("world_size", 1),
        )


@dataclass
class Prediction:
    """Predicted time per iteration and efficiency at one rank count."""

    ranks: int
    compute: float
    comm: float
    efficiency: float
    speedup: float

    @property
    def time(self) -> float:
        return self.compute + self.comm


def predict(profile: CollectiveProfile, network: Network, ranks: Sequence[int], study: str) -> list[Prediction]:
    """Predictions for each rank count; efficiency is relative to one rank without communication.

    Strong scaling: ``E(P) = T(1) / (P · T(P))``, speed-up ``T(1)/T(P)``.
    Weak scaling: ``E(P) = T(1) / T(P)``, scaled speed-up ``P · E(P)``.
    """
    if study not in ("strong", "weak"):
        raise ConfigError(f"study must be strong or weak, got {study!r}")
    message = profile.bytes / profile.calls if profile.calls > 0 else 0.0
    serial = profile.compute * (profile.ref_ranks if study == "strong" else 1)
    out: list[Prediction] = []
    for p in ranks:
        compute = serial / p if study == "strong" else serial
        comm = profile.calls * allreduce_time(p, message, network)
        total = compute + comm
        efficiency = (serial / (p * total) if study == "strong" else serial / total) if total > 0 else math.nan
        out.append(Prediction(p, compute, comm, efficiency, p * efficiency))
    return out


def fit_network(samples: Sequence[tuple[int, float, float]], algorithm: str = "auto") -> Network:
    """Least-squares α and β from ``(ranks, bytes, seconds)`` samples through ``algorithm``'s formula.

    For ``auto`` the fit uses Rabenseifner's form, which MPICH uses for the messages
    that dominate training; on 2 ranks every formula has the same shape anyway.
    """
    form = "rabenseifner" if algorithm == "auto" else algorithm
    rows, times = [], []
    for ranks, nbytes, seconds in samples:
        a, b = _terms(form, ranks)
        if a == 0:
            continue
        rows.append((a, b * nbytes))
        times.append(seconds)
    if len(rows) < 2:
        raise DataError("calibration needs at least two allreduce timings on more than one rank")
    matrix, target = np.asarray(rows), np.asarray(times)
    # Relative least squares: small messages (latency) matter as much as large ones.
    weights = 1.0 / target
    (latency, beta), *_ = np.linalg.lstsq(matrix * weights[:, None], target * weights, rcond=None)
    if beta <= 0:
        raise DataError("calibration found no bandwidth term; measure larger messages")
    return Network(max(float(latency), 0.0), 1.0 / float(beta), algorithm)


#: Float32 counts of the calibration sweep: latency-bound to bandwidth-bound messages.
DEFAULT_SIZES: tuple[int, ...] = (16, 1024, 16_384, 262_144, 1_048_576, 4_194_304)


def calibrate(
    ranks: int = 2, *, sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 20, algorithm: str = "auto"
) -> tuple[Network, list[tuple[int, float, float]]]:
    """Time allreduces under ``mpiexec -n ranks`` (a child process) and fit a :class:`Network`."""
    if ranks < 2:
        raise ConfigError("calibration needs at least 2 ranks")
    mpiexec = Path(sys.executable).parent / "mpiexec"
    launcher = str(mpiexec) if mpiexec.exists() else "mpiexec"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "samples.json"
        command = [launcher, "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "hpcopt", "calibrate"]
        command += ["--sizes", ",".join(str(s) for s in sizes), "--repeats", str(repeats), "--json", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DataError(f"allreduce calibration under {launcher} failed: {tail[0]}")
        samples = [tuple(item) for item in json.loads(out.read_text())]
    return fit_network(samples, algorithm), samples
