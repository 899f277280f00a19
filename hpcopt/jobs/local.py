"""The local sweep runner (``hpcopt jobs local``): every point of a sweep, now, under ``mpiexec``.

It runs the same ``hpcopt train`` line as the SLURM scripts of :mod:`hpcopt.jobs.render`
(which owns the sweep description), with ``mpiexec -n P`` instead of ``srun``, and
writes ``OUTDIR/<name>-local.h5`` plus the command's output ``OUTDIR/<name>-local.out``.
``hpcopt train`` runs in a child process, so this module imports no training code.

The child runs in a session of its own, and SIGINT, SIGTERM and SIGUSR1 sent to this
process are forwarded to it once each: a Ctrl-C then reaches ``mpiexec`` once (which
forwards it to every rank: a graceful stop, see :mod:`hpcopt.training.preemption`),
not twice (which ``mpiexec`` takes as "abort now").  A point that stops this way ends
the sweep with an error naming it and its status.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import IO

from hpcopt.errors import OutputError
from hpcopt.jobs.render import SweepSpec, prepare_outdir

__all__ = ["STOPPED", "launcher_for", "run_forwarding_signals", "run_local", "run_logged", "thread_env"]

# Exit statuses of a graceful stop of hpcopt train (hpcopt.training.preemption, not imported:
# this module stays free of training code).
STOPPED = {75: "preempted", 130: "interrupted"}
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def run_forwarding_signals(command: list[str], stream: IO[str], env: dict[str, str], timeout: float | None) -> int:
    """Run ``command`` in its own session; forward this process's stop signals to it; its exit status."""
    process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def forward(signum: int, frame: FrameType | None) -> None:
        process.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, forward) for signum in _FORWARDED}
    try:
        return int(process.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def launcher_for(python: str, mpiexec: str | None = None) -> str:
    """``mpiexec`` if given; else the one beside ``python``, which belongs to the MPI its
    mpi4py uses (the mpich wheel puts it into the venv's bin/); else ``mpiexec`` on PATH."""
    launcher = mpiexec or str(Path(python).parent / "mpiexec")
    return launcher if os.path.exists(launcher) else "mpiexec"


def thread_env(threads: int) -> dict[str, str]:
    """This process's environment with OpenMP/MKL limited to ``threads`` per rank."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_logged(
    what: str, command: list[str], log: Path, output: Path, env: dict[str, str], timeout: float | None
) -> int:
    """Run ``command`` with its output (headed by the command line) in ``output``; its exit status.

    A run past ``timeout`` or stopped by a signal (exit 75 or 130) is an :class:`OutputError`
    naming ``what``: the caller's later runs are not started.
    """
    with open(output, "w") as stream:
        stream.write("$ " + shlex.join(command) + "\n")
        stream.flush()
        try:
            code = run_forwarding_signals(command, stream, env, timeout)
        except subprocess.TimeoutExpired:
            raise OutputError(f"{what} ran past {timeout} s; see {output}") from None
    if code in STOPPED:
        raise OutputError(
            f"{what} was {STOPPED[code]} by a signal (exit {code}); run log {log} closed as {STOPPED[code]}, "
            f"later points not run; see {output}"
        )
    return code


def run_local(spec: SweepSpec, *, mpiexec: str | None = None, timeout: float | None = None) -> list[Path]:
    """Run every point now with ``mpiexec -n P`` (oversubscribing cores if P is larger); return the logs.

    Logs are ``OUTDIR/<name>-local.h5``.  A failing point raises :class:`OutputError`
    naming its output file, after the earlier points have finished.
    """
    outdir = prepare_outdir(spec)
    launcher = launcher_for(spec.python, mpiexec)
    env = thread_env(spec.threads)
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
        code = run_logged(f"sweep point {point.name}", command, log, output, env, timeout)
        if code != 0:
            raise OutputError(f"sweep point {point.name} failed (exit {code}); see {output}")
        logs.append(log)
    return logs
