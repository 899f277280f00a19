"""Shared fixtures: where the datasets are, how to run hpcopt under mpiexec, and a test objective."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import h5py
import pytest
import torch
from torch import nn

if TYPE_CHECKING:  # hpcopt.comm starts MPI: imported when an objective is made, not by every test
    from hpcopt.comm import Communicator
    from hpcopt.distributed.data_parallel import DistributedObjective
    from hpcopt.problems.base import Problem

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def datasets_dir() -> Path:
    """``$HPCOPT_DATA_DIR`` or ``../shared/datasets`` beside the repository."""
    return Path(os.environ.get("HPCOPT_DATA_DIR", REPO.parent / "shared" / "datasets"))


def benchmark_script(name: str) -> ModuleType:
    """``benchmarks/NAME.py`` as a module, imported the way running it does (its folder on the path)."""
    folder = REPO / "benchmarks"
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder))
    sys.modules[name] = script  # a dataclass in it looks its module up there
    try:
        spec.loader.exec_module(script)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(name, None)
    return script


def mnist_dir() -> Path:
    path = datasets_dir() / "mnist"
    if not (path / "t10k-images-idx3-ubyte.gz").exists() and not (path / "t10k-images-idx3-ubyte").exists():
        pytest.skip(f"MNIST not found at {path}; set HPCOPT_DATA_DIR to the directory holding mnist/")
    return path


def run_hpcopt(
    args: list[str], *, ranks: int = 1, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``hpcopt`` (under ``mpiexec -n ranks python -m mpi4py`` when ranks > 1)."""
    python = [sys.executable, "-m", "mpi4py", "-m", "hpcopt", *args]
    command = [str(BIN / "mpiexec"), "-n", str(ranks), *python] if ranks > 1 else python
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO, env=env, check=False
    )


def gradient(parameter: torch.Tensor) -> torch.Tensor:
    """``parameter.grad``, which a backward pass has set."""
    assert parameter.grad is not None
    return parameter.grad


def logged_rows(path: Path) -> int:
    """Rows in a live run log's ``iterations`` (read with SWMR while rank 0 writes); 0 before it exists."""
    try:
        with h5py.File(path, "r", swmr=True) as log:
            return len(log["iterations/step"])
    except (OSError, KeyError):
        return 0  # not created yet


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


def make_objective(
    problem: str | Problem = "logistic",
    *,
    model: str | nn.Module | None = None,
    options: Mapping[str, object] | None = None,
    seed: int = 0,
    batch: tuple[torch.Tensor, torch.Tensor] | None = None,
    comm: Communicator | None = None,
    device: str | torch.device = "cpu",
) -> DistributedObjective:
    """A :class:`DistributedObjective` with its batch set, as an optimizer test starts.

    Args:
        problem: a name for :func:`hpcopt.problems.make_problem` (built with ``seed`` and
            ``options``), or a problem object used as it is.
        model: a model name for ``problem.build_model`` (built after ``torch.manual_seed(seed)``),
            or a module used as it is.
        options: the problem's options (only with a problem name).
        seed: seed of the problem's data, of the model's initialisation and the batch's noise seed.
        batch: ``(inputs, targets)``, this rank's rows of a global batch of ``comm.size`` times
            as many; default: this rank's contiguous shard of ``problem.train`` (``len // comm.size``
            rows each, the remainder left out).
        comm: the communicator; default ``Communicator()`` (every rank).
        device: where the model and the batch are put.

    The problem, flat parameters and communicator are ``objective.problem``, ``.flat`` and ``.comm``.
    """
    from hpcopt.comm import Communicator
    from hpcopt.distributed.data_parallel import DistributedObjective
    from hpcopt.numerics.flat import FlatParameters
    from hpcopt.problems import make_problem

    comm = comm if comm is not None else Communicator()
    if isinstance(problem, str):
        problem = make_problem(problem, seed=seed, options=options)
    if not isinstance(model, nn.Module):
        torch.manual_seed(seed)
        model = problem.build_model(model)
    objective = DistributedObjective(problem, FlatParameters(model.to(device)), comm)
    if batch is None:
        size = len(problem.train) // comm.size
        shard = problem.train.subset(slice(comm.rank * size, (comm.rank + 1) * size))
        batch = shard.inputs, shard.targets
    inputs, targets = batch
    objective.set_batch(inputs.to(device), targets.to(device), len(inputs) * comm.size, noise_seed=seed)
    return objective


ObjectiveFactory = Callable[..., "DistributedObjective"]


@pytest.fixture
def objective_factory() -> ObjectiveFactory:
    """:func:`make_objective`, for tests that build a data-parallel objective."""
    return make_objective
