"""The files of ``examples/`` run as a reader runs them, shortened by their own options.

Each example is a complete script; here each runs as a subprocess (one process, or
``mpiexec -n 2``) with fewer epochs or steps, and what it prints is checked: that it
trained (a loss that fell, an accuracy above chance), not only that it ran.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from tests.conftest import BIN, REPO, run_hpcopt

pytestmark = pytest.mark.timeout(240)

EXAMPLES = REPO / "examples"


def _python(args: list[str], *, ranks: int = 1, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    python = [sys.executable, "-m", "mpi4py", *args]
    command = [str(BIN / "mpiexec"), "-n", str(ranks), *python] if ranks > 1 else python
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=200, cwd=cwd, env=env, check=False)


def test_own_classifier_learns_its_clouds(tmp_path: Path) -> None:
    out = tmp_path / "clouds.h5"
    result = _python([str(EXAMPLES / "own_classifier.py"), "--epochs", "1", "--out", str(out)])
    assert result.returncode == 0, result.stderr
    match = re.search(r"(\d+) steps: val_accuracy ([\d.]+)", result.stdout)
    assert match is not None, result.stdout
    assert int(match[1]) == 5 and float(match[2]) > 0.8  # three classes: chance is 1/3
    with h5py.File(out, "r") as log:
        assert log.attrs["problem"] == "clouds" and log.attrs["model"] == "TwoLayerNet"


def test_helmholtz_script_trains_on_two_ranks(tmp_path: Path) -> None:
    out = tmp_path / "helmholtz.h5"
    result = _python([str(EXAMPLES / "helmholtz.py"), "--epochs", "10", "--out", str(out)], ranks=2)
    assert result.returncode == 0, result.stderr
    assert "2 rank(s), global batch 288" in result.stdout
    assert re.search(r"10 steps: relative L2 error \S+", result.stdout), result.stdout
    with h5py.File(out, "r") as log:
        losses = log["iterations/loss"][:]
        assert log.attrs["problem"] == "helmholtz1d"
    assert len(losses) == 10 and losses[-1] < 0.5 * losses[0]


def test_helmholtz_factory_on_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "helmholtz.h5"
    spec = "examples/helmholtz.py:make_problem"
    args = ["train", "--problem", spec, "--set", "problem.k=3", "--max-steps", "4", "--out", str(out), "--quiet"]
    result = run_hpcopt(args, ranks=2, timeout=200)
    assert result.returncode == 0, result.stderr
    with h5py.File(out, "r") as log:
        assert log.attrs["problem"] == spec and log.attrs["problem_options"] == '{"k": 3}'
        losses = log["iterations/loss"][:]
    assert len(losses) == 4 and losses[-1] < losses[0]
