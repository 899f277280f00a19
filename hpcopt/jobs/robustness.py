"""The robustness study (``hpcopt study robustness``): each optimizer over a grid of its one tuning knob.

"Needs no tuning" is a claim about a curve: the final metric of a problem against the
value of the one option a user would otherwise tune — the learning rate of SGD, Adam,
NLCG and Neumann, the initial radius Δ₀ of the APTS variants, the initial damping of
HF.  :class:`RobustnessSpec` names the runs of that curve for several optimizers at
one rank count; :func:`run_robustness` runs them here with ``mpiexec`` (the same
``hpcopt train`` line as every other sweep, in a child process, so this module imports
no training code) and :mod:`hpcopt.analysis.robustness` draws the figure from the logs.

Run names are ``OPTIMIZER.KNOB=VALUE`` (``adam.lr=0.001``); logs ``OUTDIR/<name>.h5``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hpcopt.errors import ConfigError
from hpcopt.jobs.local import launcher_for, run_logged, thread_env
from hpcopt.jobs.render import make_outdir

__all__ = ["KNOBS", "RobustnessPoint", "RobustnessSpec", "parse_grid", "run_robustness"]

#: Each optimizer's tuning knob and the grid a study sweeps by default (five decades).
#: The APTS grids widen ``radius_min``/``radius_max`` where Δ₀ would leave them.
KNOBS: Mapping[str, tuple[str, tuple[float, ...]]] = {
    "sgd": ("lr", (1e-3, 1e-2, 1e-1, 1.0, 10.0)),
    "adam": ("lr", (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)),
    "nlcg": ("lr", (1e-3, 1e-2, 1e-1, 1.0, 10.0)),
    "neumann": ("lr", (1e-3, 1e-2, 1e-1, 1.0, 10.0)),
    "apts-d": ("radius", (1e-3, 1e-2, 1e-1, 1.0, 10.0)),
    "apts-p": ("radius", (1e-3, 1e-2, 1e-1, 1.0, 10.0)),
    "apts-ip": ("radius", (1e-3, 1e-2, 1e-1, 1.0, 10.0)),
    "hf": ("damping", (1e-3, 1e-2, 1e-1, 1.0, 10.0)),
}
# The APTS radius bounds (hpcopt.optimizers.apts.options defaults; not imported: no torch here).
_APTS_RADIUS_MIN, _APTS_RADIUS_MAX = 1e-3, 2.0
# Options the study sets itself; the arguments after -- must leave them out.
_RESERVED = ("--optimizer", "--problem", "--out", "--overwrite")


def parse_grid(text: str) -> tuple[str, tuple[float, ...]]:
    """``OPTIMIZER=V1,V2,…`` → (optimizer, values); a :class:`ConfigError` names what is wrong."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or name not in KNOBS:
        raise ConfigError(f"--grid {text!r}: expected OPTIMIZER=V1,V2,... with OPTIMIZER one of {', '.join(KNOBS)}")
    try:
        grid = tuple(float(value) for value in values.split(",") if value.strip())
    except ValueError:
        raise ConfigError(f"--grid {text!r}: the values must be numbers") from None
    if not grid or not all(math.isfinite(value) and value > 0 for value in grid):
        raise ConfigError(f"--grid {text!r}: give one or more finite values > 0")
    return name, grid


@dataclass(frozen=True)
class RobustnessPoint:
    """One run of the study: ``optimizer`` with its knob at ``value``."""

    optimizer: str
    knob: str
    value: float
    options: tuple[tuple[str, float], ...]

    @property
    def name(self) -> str:
        return f"{self.optimizer}.{self.knob}={self.value:g}"

    def set_args(self) -> list[str]:
        return [arg for key, value in self.options for arg in ("--set", f"{key}={value:g}")]


@dataclass
class RobustnessSpec:
    """The runs of one study.

    Args:
        problem: ``--problem`` of every run (a built-in name or a plug-in spec).
        optimizers: the optimizers compared, each over its grid.
        outdir: run logs (``<name>.h5``), outputs (``<name>.out``), CSV and PNG.
        ranks: ``mpiexec -n`` of every run.
        grids: per optimizer, the knob values (default: :data:`KNOBS`).
        threads: torch threads per rank.
        python: the interpreter of the runs (default: this one).
        train_args: further ``hpcopt train`` arguments, the same for every run.
    """

    problem: str
    optimizers: Sequence[str]
    outdir: str
    ranks: int = 1
    grids: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    threads: int = 1
    python: str = sys.executable
    train_args: Sequence[str] = ()

    def validate(self) -> None:
        unknown = [name for name in self.optimizers if name not in KNOBS]
        if not self.optimizers or unknown:
            raise ConfigError(
                f"study robustness: unknown optimizer(s) {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(KNOBS)}"
            )
        stray = [name for name in self.grids if name not in self.optimizers]
        if stray:
            raise ConfigError(f"study robustness: --grid for {', '.join(stray)}, which --optimizers does not name")
        if self.ranks < 1 or self.threads < 1:
            raise ConfigError(f"study robustness: --ranks and --threads must be >= 1, got {self.ranks}, {self.threads}")
        for arg in self.train_args:
            if arg.split("=", 1)[0] in _RESERVED:
                raise ConfigError(f"{arg.split('=', 1)[0]} is set by the study; leave it out of the arguments after --")
        if not self.problem:
            raise ConfigError("study robustness: --problem is required")

    def points(self) -> list[RobustnessPoint]:
        points = []
        for optimizer in self.optimizers:
            knob, default_grid = KNOBS[optimizer]
            for value in self.grids.get(optimizer, default_grid):
                options: list[tuple[str, float]] = [(knob, value)]
                if knob == "radius":
                    if value < _APTS_RADIUS_MIN:
                        options.append(("radius_min", value))
                    if value > _APTS_RADIUS_MAX:
                        options.append(("radius_max", value))
                points.append(RobustnessPoint(optimizer, knob, value, tuple(options)))
        return points

    def command(self, point: RobustnessPoint, launcher: str, log: Path) -> list[str]:
        """The ``mpiexec … hpcopt train`` line of one run; the knob comes last, so it wins."""
        return [
            launcher,
            "-n",
            str(self.ranks),
            self.python,
            "-m",
            "mpi4py",
            "-m",
            "hpcopt",
            "train",
            "--problem",
            self.problem,
            "--optimizer",
            point.optimizer,
            "--threads",
            str(self.threads),
            *self.train_args,
            *point.set_args(),
            "--out",
            str(log),
            "--overwrite",
        ]


def run_robustness(
    spec: RobustnessSpec, *, mpiexec: str | None = None, timeout: float | None = None
) -> list[tuple[RobustnessPoint, Path]]:
    """Run every point now, one after the other; return each point with its run log.

    A run that fails is reported in its ``<name>.out`` and left out (a knob value that
    makes an optimizer diverge is a result of the study, not an error); a run stopped
    by a signal ends the study with an :class:`OutputError` naming it.
    """
    spec.validate()
    outdir = make_outdir(spec.outdir)
    launcher = launcher_for(spec.python, mpiexec)
    env = thread_env(spec.threads)
    done: list[tuple[RobustnessPoint, Path]] = []
    for point in spec.points():
        log = outdir / f"{point.name}.h5"
        output = outdir / f"{point.name}.out"
        code = run_logged(f"study run {point.name}", spec.command(point, launcher, log), log, output, env, timeout)
        print(f"{point.name}: {'done' if code == 0 else f'failed (exit {code}), see {output}'}", flush=True)
        if code == 0:
            done.append((point, log))
    return done


def study_points(spec: RobustnessSpec) -> list[tuple[RobustnessPoint, Path]]:
    """Every point with the path its log has (or would have): for reporting without running."""
    spec.validate()
    outdir = Path(spec.outdir).resolve()
    return [(point, outdir / f"{point.name}.h5") for point in spec.points()]
