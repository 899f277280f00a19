"""The local sweep runner (``hpcopt jobs local``): every point of a sweep, now, under ``mpiexec``.

It runs the same ``hpcopt train`` line as the SLURM scripts of :mod:`hpcopt.jobs.render`
(which owns the sweep description), with ``mpiexec -n P`` instead of ``srun``, and
writes ``OUTDIR/<name>-local.h5`` plus the command's output ``OUTDIR/<name>-local.out``.
``hpcopt train`` runs in a child process, so this module imports no training code.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from hpcopt.errors import OutputError
from hpcopt.jobs.render import SweepSpec, prepare_outdir

__all__ = ["run_local"]


def run_local(spec: SweepSpec, *, mpiexec: str | None = None, timeout: float | None = None) -> list[Path]:
    """Run every point now with ``mpiexec -n P`` (oversubscribing cores if P is larger); return the logs.

    Logs are ``OUTDIR/<name>-local.h5``.  A failing point raises :class:`OutputError`
    naming its output file, after the earlier points have finished.
    """
    outdir = prepare_outdir(spec)
    # The mpiexec beside the jobs' interpreter first: it belongs to the MPI that
    # interpreter's mpi4py uses (the mpich wheel puts it into the venv's bin/).
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
