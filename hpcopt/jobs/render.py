"""SLURM job scripts of a scaling sweep (``hpcopt jobs render``), and the sweep description itself.

A sweep is one training configuration run at several rank counts:

* ``strong``: the global batch ``B`` is fixed, each of the ``P`` ranks takes ``B/P``;
* ``weak``: the batch per rank ``B`` is fixed, the global batch is ``B·P``.

Every point writes its HDF5 run log to ``OUTDIR/<name>-<job id>.h5`` (``<name>-local.h5``
for the local runner, :mod:`hpcopt.jobs.local`), so ``hpcopt analyze OUTDIR/*.h5``
tabulates the sweep either way.

Templates are files, ``jobs/templates/{cpu,gpu}.sbatch`` and ``submit.sh``, read with
:class:`string.Template` (``${name}`` is a placeholder, ``$$`` a literal ``$``).  ``cpu``
places ``ranks_per_node`` ranks on each node with ``--cpus-per-task`` cores each and sets
the OpenMP/torch thread count to match (``hpcopt train --threads``); ``gpu`` places one
rank per GPU and binds rank ``SLURM_LOCALID`` to GPU ``SLURM_LOCALID`` through
``CUDA_VISIBLE_DEVICES`` and trains with ``--device cuda``.  Both launch
``srun --mpi=pmi2 python -m mpi4py -m hpcopt train …``; the launcher is the shell
variable ``HPCOPT_LAUNCH`` (``srun --mpi=pmix`` or ``mpirun -n $SLURM_NTASKS`` where
PMI2 is missing), documented in ``docs/scaling.md``.

Every value written into a script is checked or quoted so that none can add a line:
option values must be one line without control characters, ``--time`` must be a SLURM
time, the optimizer a plain name, ``--sbatch-option`` a long option; paths and
``hpcopt train`` arguments arrive shell-quoted.

Requeue mode (``--requeue``) adds ``#SBATCH --requeue``, ``--open-mode=append`` and
``--signal=USR1@<signal_seconds>``: SLURM sends SIGUSR1 to the job step's tasks that many
seconds before the time limit, ``hpcopt train`` stops at the next step with a checkpoint
and exit status 75, and the script then calls ``scontrol requeue``.  The requeued job runs
the same script again (``SLURM_RESTART_COUNT`` > 0): it resumes from the job's checkpoint
``<name>-<job id>.ckpt`` and writes the run log ``<name>-<job id>.r<restart count>.h5``,
whose attribute ``previous_log`` names the log it continues.

Where the templates are found (first directory holding all of them wins), as
:func:`hpcopt.kernels.cuda.kernel_dir` finds the CUDA sources:

1. ``$HPCOPT_TEMPLATE_DIR`` (a site's own copies);
2. ``jobs/templates/`` beside the ``hpcopt`` package (a source checkout or an editable
   install);
3. ``<sys.prefix>/share/hpcopt/jobs/templates``, where ``pip install .`` puts them
   (``data_files`` in ``setup.py``), or the same under the user base after
   ``pip install --user .``.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import site
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hpcopt.errors import ConfigError, OutputError

__all__ = [
    "STUDIES",
    "TEMPLATES",
    "TEMPLATE_FILES",
    "SweepPoint",
    "SweepSpec",
    "fill_template",
    "make_outdir",
    "parse_ranks",
    "prepare_outdir",
    "render_sweep",
    "template_dir",
]

STUDIES: tuple[str, ...] = ("strong", "weak")

#: ``--template`` name -> its file in :func:`template_dir`.
TEMPLATE_FILES: dict[str, str] = {"cpu": "cpu.sbatch", "gpu": "gpu.sbatch"}
TEMPLATES: tuple[str, ...] = tuple(TEMPLATE_FILES)
_SUBMIT_FILE = "submit.sh"
_ALL_FILES = (*TEMPLATE_FILES.values(), _SUBMIT_FILE)


def template_dir() -> Path:
    """The directory holding the job templates (see the module docstring for the order)."""
    candidates: list[Path] = []
    if os.environ.get("HPCOPT_TEMPLATE_DIR"):
        candidates.append(Path(os.environ["HPCOPT_TEMPLATE_DIR"]))
    candidates.append(Path(__file__).resolve().parents[2] / "jobs" / "templates")
    for base in (sys.prefix, site.getuserbase()):
        candidates.append(Path(base) / "share" / "hpcopt" / "jobs" / "templates")
    for path in candidates:
        if all((path / name).is_file() for name in _ALL_FILES):
            return path
    raise ConfigError(
        f"hpcopt's job templates ({', '.join(_ALL_FILES)}) were not found in "
        f"{', '.join(str(p) for p in candidates)}; set HPCOPT_TEMPLATE_DIR to the jobs/templates directory"
    )


def fill_template(name: str, values: dict[str, object]) -> str:
    """The template ``name`` (a key of :data:`TEMPLATE_FILES`, or ``submit``) with ``values`` filled in.

    Raises:
        ConfigError: the template names a placeholder that ``values`` lacks, or holds a
            ``$`` that starts no placeholder (a site's copy in ``$HPCOPT_TEMPLATE_DIR``).
    """
    path = template_dir() / (_SUBMIT_FILE if name == "submit" else TEMPLATE_FILES[name])
    # utf-8 whatever the locale: the rendered scripts must not depend on the submit host.
    template = string.Template(path.read_text(encoding="utf-8"))
    try:
        return template.substitute(values)
    except KeyError as error:
        raise ConfigError(
            f"job template {path}: unknown placeholder {error} (known: {', '.join(sorted(values))})"
        ) from None
    except ValueError as error:
        raise ConfigError(f"job template {path}: {error}; write $$ for a literal $") from None


# SLURM's --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds (sbatch(1)), or no limit.
_SLURM_TIME = re.compile(r"(\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|UNLIMITED|INFINITE)")
# The optimizer names the job and its files: letters, digits and . _ - only.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: Seconds SLURM's --signal=SIG@SECONDS accepts.
MAX_SIGNAL_SECONDS = 65535


def _one_line(what: str, value: str) -> None:
    """Refuse a value that would break a script's line (a newline, or any control character)."""
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ConfigError(f"{what} must be one line without control characters, got {value!r}")


def parse_ranks(text: str) -> list[int]:
    """``"1,2,4,8"`` → ``[1, 2, 4, 8]``; :class:`ConfigError` on anything else."""
    try:
        ranks = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ConfigError(f"--ranks must be comma-separated integers like 1,2,4,8, got {text!r}") from None
    if not ranks or any(rank < 1 for rank in ranks):
        raise ConfigError(f"--ranks must list positive rank counts, got {text!r}")
    if len(set(ranks)) != len(ranks):
        raise ConfigError(f"--ranks lists a rank count twice: {text!r}")
    return sorted(ranks)


@dataclass
class SweepSpec:
    """A scaling sweep, as ``hpcopt jobs render|local`` takes it.

    Attributes:
        study: ``strong`` (fixed global batch) or ``weak`` (fixed batch per rank).
        ranks: rank counts, one job per entry.
        batch_size: the global batch (strong) or the batch per rank (weak).
        problem, optimizer: passed to ``hpcopt train``.
        template: ``cpu`` or ``gpu``.
        outdir: where scripts, SLURM output and run logs go.
        ranks_per_node: ranks on one node (CPU: cores / threads; GPU: GPUs per node).
        threads: cores per rank = ``--cpus-per-task`` = ``--threads``.
        time: SLURM wall-time limit.
        train_args: extra ``hpcopt train`` arguments (after ``--``), passed through.
        sbatch_options: extra ``#SBATCH`` options (``--partition=x``, ``--overcommit``).
        python: interpreter the job runs (default: this one, so a venv carries over).
        requeue: requeue mode (see the module docstring): the early-warning signal, a
            checkpoint per job, ``scontrol requeue`` on exit status 75, resume on restart.
        signal_seconds: in requeue mode, how long before the time limit SLURM sends
            SIGUSR1 (enough for one step and a checkpoint write; SLURM may send it up to
            60 s earlier).
    """

    study: str
    ranks: list[int]
    batch_size: int
    problem: str | None = None
    optimizer: str | None = None
    template: str = "cpu"
    outdir: str = "scaling"
    ranks_per_node: int = 32
    threads: int = 1
    time: str = "00:30:00"
    train_args: list[str] = field(default_factory=list)
    sbatch_options: list[str] = field(default_factory=list)
    python: str = sys.executable
    requeue: bool = False
    signal_seconds: int = 120

    def validate(self) -> None:
        if not self.ranks:
            raise ConfigError("a sweep needs at least one rank count (--ranks 1,2,4)")
        if self.study not in STUDIES:
            raise ConfigError(f"--study must be one of {', '.join(STUDIES)}, got {self.study!r}")
        if self.template not in TEMPLATES:
            raise ConfigError(f"--template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be positive, got {self.batch_size}")
        if self.ranks_per_node < 1 or self.threads < 1:
            raise ConfigError("--ranks-per-node and --threads must be positive")
        for ranks in self.ranks:
            if self.study == "strong" and self.batch_size % ranks != 0:
                raise ConfigError(
                    f"strong scaling keeps the global batch {self.batch_size}, which {ranks} ranks cannot "
                    f"share equally; choose a batch divisible by every rank count"
                )
        for option in self.sbatch_options:
            _one_line("--sbatch-option", option)
            if not option.startswith("--"):
                raise ConfigError(f"--sbatch-option takes a long sbatch option like --partition=cpu, got {option!r}")
        _one_line("--time", self.time)
        if not _SLURM_TIME.fullmatch(self.time):
            raise ConfigError(
                f"--time must be a SLURM time limit (MINUTES, HH:MM:SS, DAYS-HH:MM:SS, ...), got {self.time!r}"
            )
        if self.optimizer is not None and not _PLAIN_NAME.fullmatch(self.optimizer):
            raise ConfigError(
                f"--optimizer must be a plain name like apts-d (it names the jobs), got {self.optimizer!r}"
            )
        for what, value in (("--problem", self.problem), ("--outdir", self.outdir), ("--python", self.python)):
            if value is not None:
                _one_line(what, value)
        _one_line("the working directory", os.getcwd())
        for arg in self.train_args:
            _one_line("an hpcopt train argument after --", arg)
        if not 1 <= self.signal_seconds <= MAX_SIGNAL_SECONDS:
            raise ConfigError(f"--signal-seconds must be between 1 and {MAX_SIGNAL_SECONDS}, got {self.signal_seconds}")

    def points(self) -> list[SweepPoint]:
        return [SweepPoint(self, ranks) for ranks in self.ranks]


@dataclass
class SweepPoint:
    """One job of a sweep."""

    spec: SweepSpec
    ranks: int

    @property
    def global_batch(self) -> int:
        return self.spec.batch_size if self.spec.study == "strong" else self.spec.batch_size * self.ranks

    @property
    def name(self) -> str:
        optimizer = self.spec.optimizer or "default"
        return f"{self.spec.study}-{optimizer}-P{self.ranks}"

    def train_args(self) -> list[str]:
        args: list[str] = []
        if self.spec.problem:
            args += ["--problem", self.spec.problem]
        if self.spec.optimizer:
            args += ["--optimizer", self.spec.optimizer]
        args += ["--batch-size", str(self.global_batch), *self.spec.train_args]
        return args

    def render(self, outdir: Path) -> str:
        spec = self.spec
        per_node = min(spec.ranks_per_node, self.ranks)
        return fill_template(
            spec.template,
            {
                "study": spec.study,
                "ranks": self.ranks,
                "global_batch": self.global_batch,
                "name": self.name,
                "script": shlex.quote(str(outdir / f"{self.name}.sbatch")),
                "nodes": math.ceil(self.ranks / per_node),
                "ranks_per_node": per_node,
                "threads": spec.threads,
                "time": spec.time,
                "outdir": shlex.quote(str(outdir)),
                "workdir": shlex.quote(os.getcwd()),
                "sbatch_lines": "\n".join(f"#SBATCH {option}" for option in spec.sbatch_options),
                "python": shlex.quote(spec.python),
                "train_args": shlex.join(self.train_args()),
                "requeue": int(spec.requeue),
                "requeue_lines": (
                    f"#SBATCH --requeue\n#SBATCH --open-mode=append\n#SBATCH --signal=USR1@{spec.signal_seconds}"
                    if spec.requeue
                    else "# (requeue mode off: hpcopt jobs render --requeue)"
                ),
            },
        )


_RESERVED_TRAIN_ARGS = ("--out", "--threads", "--batch-size", "--overwrite")
# Requeue mode passes the job's checkpoint and, after a restart, --resume.
_RESERVED_REQUEUE_ARGS = ("--checkpoint", "--resume", "--stop-signal")


def prepare_outdir(spec: SweepSpec) -> Path:
    """Validate ``spec`` (options and the arguments after ``--``), create its outdir, return it (absolute)."""
    spec.validate()
    for arg in spec.train_args:
        if arg.split("=", 1)[0] in _RESERVED_TRAIN_ARGS:
            raise ConfigError(f"{arg.split('=', 1)[0]} is set by the sweep; leave it out of the arguments after --")
        if spec.requeue and arg.split("=", 1)[0] in _RESERVED_REQUEUE_ARGS:
            raise ConfigError(f"{arg.split('=', 1)[0]} is set by --requeue; leave it out of the arguments after --")
    return make_outdir(spec.outdir)


def make_outdir(outdir: str) -> Path:
    """``outdir`` created if need be (absolute); an :class:`OutputError` when it cannot be."""
    path = Path(outdir).resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create output directory {outdir}: {error.strerror or error}") from None
    return path


def render_sweep(spec: SweepSpec) -> list[Path]:
    """Write one ``<name>.sbatch`` per point and ``submit.sh``; return the script paths (submit.sh last)."""
    outdir = prepare_outdir(spec)
    scripts: list[Path] = []
    submissions: list[str] = []
    for point in spec.points():
        script = outdir / f"{point.name}.sbatch"
        script.write_text(point.render(outdir))
        script.chmod(0o755)
        scripts.append(script)
        # --parsable prints "jobid[;cluster]"; extra sbatch arguments come from $@.
        submissions.append(f'sbatch --parsable "$@" {shlex.quote(script.name)} | cut -d";" -f1 >> jobids.txt')
    submit_path = outdir / "submit.sh"
    submit_path.write_text(
        fill_template(
            "submit",
            {"study": spec.study, "outdir": shlex.quote(str(outdir)), "submissions": "\n".join(submissions)},
        )
    )
    submit_path.chmod(0o755)
    scripts.append(submit_path)
    return scripts
