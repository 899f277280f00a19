"""Shared fixtures: where the datasets are, and how to run hpcopt under mpiexec."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def datasets_dir() -> Path:
    """``$HPCOPT_DATA_DIR`` or ``../shared/datasets`` beside the repository."""
    return Path(os.environ.get("HPCOPT_DATA_DIR", REPO.parent / "shared" / "datasets"))


def mnist_dir() -> Path:
    path = datasets_dir() / "mnist"
    if not (path / "t10k-images-idx3-ubyte.gz").exists() and not (path / "t10k-images-idx3-ubyte").exists():
        pytest.skip(f"MNIST not found at {path}; set HPCOPT_DATA_DIR to the directory holding mnist/")
    return path


def run_hpcopt(args: list[str], *, ranks: int = 1, timeout: float = 120, cwd: Path | None = None):
    """Run ``hpcopt`` (under ``mpiexec -n ranks python -m mpi4py`` when ranks > 1)."""
    python = [sys.executable, "-m", "mpi4py", "-m", "hpcopt", *args]
    command = [str(BIN / "mpiexec"), "-n", str(ranks), *python] if ranks > 1 else python
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO, env=env, check=False
    )


@pytest.fixture
def one_thread():
    """One torch thread per rank for the test (use with ``pytest.mark.usefixtures``).

    hpcopt runs one rank per core; on a loaded machine torch's thread pool makes the
    tiny ops of the multi-rank tests up to 100x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
