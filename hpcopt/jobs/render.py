"""Scaling sweeps: SLURM job scripts (``hpcopt jobs render``) and a local runner (``hpcopt jobs local``).

A sweep is one training configuration run at several rank counts:

* ``strong``: the global batch ``B`` is fixed, each of the ``P`` ranks takes ``B/P``;
* ``weak``: the batch per rank ``B`` is fixed, the global batch is ``B·P``.

Every point writes its HDF5 run log to ``OUTDIR/<name>-<job id>.h5`` (``<name>-local.h5``
for the local runner), so ``hpcopt analyze OUTDIR/*.h5`` tabulates the sweep either way.

Templates (Python string templates, below): ``cpu`` places ``ranks_per_node`` ranks on
each node with ``--cpus-per-task`` cores each and sets the OpenMP/torch thread count to
match (``hpcopt train --threads``); ``gpu`` places one rank per GPU and binds rank
``SLURM_LOCALID`` to GPU ``SLURM_LOCALID`` through ``CUDA_VISIBLE_DEVICES`` and trains
with ``--device cuda``.  Both
launch ``srun --mpi=pmi2 python -m mpi4py -m hpcopt train …``; the launcher is the
shell variable ``HPCOPT_LAUNCH`` (``srun --mpi=pmix`` or ``mpirun -n $SLURM_NTASKS``
where PMI2 is missing), documented in ``jobs/README.md``.
"""

from __future__ import annotations

import math
import os
import shlex
import string
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hpcopt.errors import ConfigError, OutputError

__all__ = ["STUDIES", "TEMPLATES", "SweepPoint", "SweepSpec", "parse_ranks", "render_sweep", "run_local"]

STUDIES: tuple[str, ...] = ("strong", "weak")

_CPU_TEMPLATE = """\
#!/bin/bash
# hpcopt ${study}-scaling point: ${ranks} rank(s), global batch ${global_batch} (CPU template).
# Rendered by: hpcopt jobs render; submit with: sbatch ${script}
#SBATCH --job-name=${name}
#SBATCH --nodes=${nodes}
#SBATCH --ntasks=${ranks}
#SBATCH --ntasks-per-node=${ranks_per_node}
#SBATCH --cpus-per-task=${threads}
#SBATCH --time=${time}
#SBATCH --output=${outdir}/${name}-%j.out
${sbatch_lines}
set -euo pipefail
cd ${workdir}

# One torch/OpenMP thread pool per rank, as large as the cores SLURM gave the rank.
export OMP_NUM_THREADS=$${SLURM_CPUS_PER_TASK:-${threads}}
export MKL_NUM_THREADS=$$OMP_NUM_THREADS
# srun only hands --cpus-per-task to the tasks when asked to (SLURM >= 22.05).
export SRUN_CPUS_PER_TASK=$$OMP_NUM_THREADS

# Launcher: PMI2 works with the mpich wheel and most MPI builds.  Alternatives:
#   HPCOPT_LAUNCH="srun --mpi=pmix"               (Open MPI / PMIx-only sites)
#   HPCOPT_LAUNCH="mpirun -n $$SLURM_NTASKS"       (no working srun/PMI plugin)
LAUNCH=$${HPCOPT_LAUNCH:-srun --mpi=pmi2 --cpu-bind=cores}
RUN_LOG=${outdir}/${name}-$${SLURM_JOB_ID}.h5

$$LAUNCH ${python} -m mpi4py -m hpcopt train ${train_args} \\
    --threads "$$OMP_NUM_THREADS" --out "$$RUN_LOG" --overwrite --quiet
"""

_GPU_TEMPLATE = """\
#!/bin/bash
# hpcopt ${study}-scaling point: ${ranks} rank(s) = GPUs, global batch ${global_batch} (GPU template).
# Rendered by: hpcopt jobs render; submit with: sbatch ${script}
# One MPI rank per GPU, trained with --device cuda (a rank without a GPU stops with an
# error instead of silently training on the CPU); a --device after "--" overrides it.
#SBATCH --job-name=${name}
#SBATCH --nodes=${nodes}
#SBATCH --ntasks=${ranks}
#SBATCH --ntasks-per-node=${ranks_per_node}
#SBATCH --gpus-per-node=${ranks_per_node}
#SBATCH --cpus-per-task=${threads}
#SBATCH --time=${time}
#SBATCH --output=${outdir}/${name}-%j.out
${sbatch_lines}
set -euo pipefail
cd ${workdir}

export OMP_NUM_THREADS=$${SLURM_CPUS_PER_TASK:-${threads}}
export SRUN_CPUS_PER_TASK=$$OMP_NUM_THREADS

# Launcher: see the CPU template (pmix, or mpirun -n $$SLURM_NTASKS as a fallback).
LAUNCH=$${HPCOPT_LAUNCH:-srun --mpi=pmi2 --gpu-bind=none}
RUN_LOG=${outdir}/${name}-$${SLURM_JOB_ID}.h5

# Each rank sees exactly one GPU: its node-local rank index picks it (device 0 inside).
# SLURM_LOCALID under srun; MPI_LOCALRANKID (MPICH hydra) or OMPI_COMM_WORLD_LOCAL_RANK under mpirun.
$$LAUNCH bash -c 'export CUDA_VISIBLE_DEVICES=$${SLURM_LOCALID:-$${MPI_LOCALRANKID:-$${OMPI_COMM_WORLD_LOCAL_RANK:-0}}}
exec "$$@"' hpcopt-rank \\
    ${python} -m mpi4py -m hpcopt train --device cuda ${train_args} \\
    --threads "$$OMP_NUM_THREADS" --out "$$RUN_LOG" --overwrite --quiet
"""

TEMPLATES: dict[str, str] = {"cpu": _CPU_TEMPLATE, "gpu": _GPU_TEMPLATE}

_SUBMIT_HEADER = """\
#!/bin/bash
# Submit every point of this ${study}-scaling sweep; job ids go to ${outdir}/jobids.txt.
set -euo pipefail
cd "$$(dirname "$$0")"
: > jobids.txt
"""


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

    def validate(self) -> None:
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
            if not option.startswith("--"):
                raise ConfigError(f"--sbatch-option takes a long sbatch option like --partition=cpu, got {option!r}")

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
        return string.Template(TEMPLATES[spec.template]).substitute(
            study=spec.study,
            ranks=self.ranks,
            global_batch=self.global_batch,
            name=self.name,
            script=shlex.quote(str(outdir / f"{self.name}.sbatch")),
            nodes=math.ceil(self.ranks / per_node),
            ranks_per_node=per_node,
            threads=spec.threads,
            time=spec.time,
            outdir=shlex.quote(str(outdir)),
            workdir=shlex.quote(os.getcwd()),
            sbatch_lines="\n".join(f"#SBATCH {option}" for option in spec.sbatch_options),
            python=shlex.quote(spec.python),
            train_args=shlex.join(self.train_args()),
        )


_RESERVED_TRAIN_ARGS = ("--out", "--threads", "--batch-size", "--overwrite")


def _check_train_args(args: Sequence[str]) -> None:
    for arg in args:
        if arg.split("=", 1)[0] in _RESERVED_TRAIN_ARGS:
            raise ConfigError(f"{arg.split('=', 1)[0]} is set by the sweep; leave it out of the arguments after --")


def _make_outdir(outdir: str) -> Path:
    path = Path(outdir).resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create output directory {outdir}: {error.strerror or error}") from None
    return path


def render_sweep(spec: SweepSpec) -> list[Path]:
    """Write one ``<name>.sbatch`` per point and ``submit.sh``; return the script paths (submit.sh last)."""
    spec.validate()
    _check_train_args(spec.train_args)
    outdir = _make_outdir(spec.outdir)
    scripts: list[Path] = []
    submit = [string.Template(_SUBMIT_HEADER).substitute(study=spec.study, outdir=shlex.quote(str(outdir)))]
    for point in spec.points():
        script = outdir / f"{point.name}.sbatch"
        script.write_text(point.render(outdir))
        script.chmod(0o755)
        scripts.append(script)
        # --parsable prints "jobid[;cluster]"; extra sbatch arguments come from $@.
        submit.append(f'sbatch --parsable "$@" {shlex.quote(script.name)} | cut -d";" -f1 >> jobids.txt\n')
    submit.append("echo \"submitted $(wc -l < jobids.txt) job(s): $(tr '\\n' ' ' < jobids.txt)\"\n")
    submit_path = outdir / "submit.sh"
    submit_path.write_text("".join(submit))
    submit_path.chmod(0o755)
    scripts.append(submit_path)
    return scripts


def run_local(spec: SweepSpec, *, mpiexec: str | None = None, timeout: float | None = None) -> list[Path]:
    """Run every point now with ``mpiexec -n P`` (oversubscribing cores if P is larger); return the logs.

    Logs are ``OUTDIR/<name>-local.h5``.  A failing point raises :class:`OutputError`
    naming its output file, after the earlier points have finished.
    """
    spec.validate()
    _check_train_args(spec.train_args)
    outdir = _make_outdir(spec.outdir)
    launcher = mpiexec or str(Path(spec.python).parent / "mpiexec")
    if not os.path.exists(launcher):
        launcher = "mpiexec"
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads), "MKL_NUM_THREADS": str(spec.threads)}
    logs: list[Path] = []
    for point in spec.points():
        log = outdir / f"{point.name}-local.h5"
        output = outdir / f"{point.name}-local.out"
        command = [
            launcher,
            "-n",
            str(point.ranks),
            spec.python,
            "-m",
            "mpi4py",
            "-m",
            "hpcopt",
            "train",
            *point.train_args(),
            "--threads",
            str(spec.threads),
            "--out",
            str(log),
            "--overwrite",
            "--quiet",
        ]
        with open(output, "w") as stream:
            stream.write("$ " + shlex.join(command) + "\n")
            stream.flush()
            try:
                code = subprocess.run(
                    command, stdout=stream, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False
                ).returncode
            except subprocess.TimeoutExpired:
                raise OutputError(f"sweep point {point.name} ran past {timeout} s; see {output}") from None
        if code != 0:
            raise OutputError(f"sweep point {point.name} failed (exit {code}); see {output}")
        logs.append(log)
    return logs
