"""A rank that dies or stalls ends the whole job, and the run log survives a SIGKILL.

Each test starts ``mpiexec -n 2`` and ``-n 4`` of ``python -m mpi4py -m hpcopt train``
as a subprocess with a fault from :mod:`hpcopt.testing.faults`; the subprocess ``timeout``
turns a hang into a test failure instead of a stuck CI job.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from hpcopt.errors import ConfigError
from hpcopt.testing import faults
from tests.conftest import BIN, REPO

pytestmark = pytest.mark.timeout(120)

TRAIN = ["train", "--problem", "logistic", "--set", "problem.n=400", "--batch-size", "80", "--epochs", "4", "--quiet"]
DEADLINE = 60  # seconds: start-up under load plus the watchdog; a hang is far longer


def _command(ranks: int, args: list[str]) -> list[str]:
    return [str(BIN / "mpiexec"), "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "hpcopt", *TRAIN, *args]


def _env(fault: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HPCOPT_FAULT": fault}


def _run(ranks: int, args: list[str], fault: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command(ranks, args), capture_output=True, text=True, timeout=DEADLINE, cwd=REPO, env=_env(fault), check=False
    )


def _log(path: Path) -> tuple[str, list[int]]:
    with h5py.File(path, "r", swmr=True) as log:
        return log.attrs["status"], log["iterations/step"][:].tolist()


def _error(path: Path) -> str:
    with h5py.File(path, "r", swmr=True) as log:
        return str(log.attrs.get("error", ""))


@pytest.mark.parametrize("ranks", [2, 4])
def test_exception_on_one_rank_ends_every_rank_and_marks_the_log_failed(ranks: int, tmp_path: Path) -> None:
    # Rank P-1 (never rank 0) raises in step 3; rank 0 learns of it from the notice
    # its watchdog loop receives, closes the log as failed and aborts the job.
    out = tmp_path / "run.h5"
    result = _run(
        ranks, ["--out", str(out), "--collective-timeout", "20"], f"rank={ranks - 1},step=3,where=local_solve"
    )
    assert result.returncode != 0
    expected = f"hpcopt: error: rank {ranks - 1} failed: hpcopt.testing.faults.InjectedFault"
    assert expected in result.stderr, result.stderr
    assert _log(out) == ("failed", [1, 2])
    assert _error(out).startswith(f"AbortError: rank {ranks - 1} failed: hpcopt.testing.faults.InjectedFault")


@pytest.mark.parametrize("ranks", [2])  # the 4-rank abort path is the one above, minus the notice
def test_without_watchdog_mpi4py_aborts_every_rank(ranks: int, tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    result = _run(ranks, ["--out", str(out)], f"rank={ranks - 1},step=3,where=local_solve")
    assert result.returncode != 0
    assert "InjectedFault: injected fault on rank" in result.stderr and "MPI_Abort" in result.stderr
    # Rank 0 was killed inside a blocking collective: the log is intact but says "running".
    assert _log(out) == ("running", [1, 2])


@pytest.mark.parametrize("ranks", [2, 4])
def test_stalled_rank_is_named_by_the_watchdog_and_the_job_aborts(ranks: int, tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    start = time.monotonic()
    result = _run(
        ranks, ["--out", str(out), "--collective-timeout", "2"], f"rank={ranks - 1},step=3,where=gradient,kind=hang"
    )
    assert result.returncode != 0
    assert time.monotonic() - start < DEADLINE
    assert "allreduce of" in result.stderr and "did not complete within --collective-timeout 2s" in result.stderr
    assert _log(out) == ("failed", [1, 2])


@pytest.mark.parametrize("ranks", [2, 4])
def test_sigkill_of_all_ranks_leaves_a_readable_log_with_every_flushed_row(ranks: int, tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    # Every rank pauses inside step 6 (rows 1..5 are flushed), then SIGKILLs itself.
    process = subprocess.Popen(
        _command(ranks, ["--out", str(out)]),
        env=_env("step=6,where=gradient,kind=hang,seconds=4;step=6,where=gradient,kind=sigkill"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        rows: list[int] = []
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline and len(rows) < 5 and process.poll() is None:
            time.sleep(0.2)
            try:
                status, rows = _log(out)  # a second process reading the live log
            except (OSError, KeyError):
                continue  # not created yet
        assert rows == [1, 2, 3, 4, 5] and status == "running"
        assert process.wait(timeout=DEADLINE) != 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert _log(out) == ("running", [1, 2, 3, 4, 5])


def test_a_malformed_fault_is_a_one_line_config_error_on_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, "where=gradient,step=soon")
    faults.reset()
    try:
        with pytest.raises(ConfigError, match="HPCOPT_FAULT: bad fault 'where=gradient,step=soon'") as caught:
            faults.inject("gradient", 0, 1, 1.0)
        assert "\n" not in str(caught.value)
        monkeypatch.setenv(faults.ENV, "where=trial,kind=nan")
        faults.reset()
        assert faults.inject("gradient", 0, 1, 1.0) == 1.0
        assert math.isnan(faults.inject("trial", 0, 1, 1.0))
    finally:
        faults.reset()  # read again, after monkeypatch restores the environment


def test_a_hang_pauses_each_matching_step_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # APTS-D computes several gradients a step: "pause step 5 for 4 s" must not become 16 s.
    slept: list[float] = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    faults.configure("step=5,where=gradient,kind=hang,seconds=4;step=all,where=trial,kind=hang,seconds=1")
    try:
        for step in (4, 5, 5, 5, 6):
            faults.inject("gradient", 0, step, 1.0)
        assert slept == [4.0]
        for step in (1, 1, 2, 2, 2, 3):
            faults.inject("trial", 0, step, 1.0)
        assert slept == [4.0, 1.0, 1.0, 1.0]
        faults.configure("step=5,where=gradient,kind=hang,seconds=4")  # a new plan pauses again
        faults.inject("gradient", 1, 5, 1.0)
        assert slept == [4.0, 1.0, 1.0, 1.0, 4.0]
    finally:
        faults.reset()


def test_a_malformed_fault_does_not_break_the_import() -> None:
    env = {**os.environ, "HPCOPT_FAULT": "where=nowhere"}
    done = subprocess.run(
        [sys.executable, "-c", "import hpcopt.testing.faults"], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr


def test_a_malformed_fault_ends_training_with_one_line_per_rank() -> None:
    result = _run(2, [], "where=nowhere")
    assert result.returncode != 0
    assert result.stderr.count("hpcopt: error: HPCOPT_FAULT: bad fault 'where=nowhere'") == 2, result.stderr
    assert "Traceback" not in result.stderr
