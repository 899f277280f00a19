"""The PINN suite (Poisson 3-D, Allen–Cahn steady and in time) and the TinyShakespeare LM."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcopt.errors import ConfigError, DataError
from hpcopt.problems import make_problem
from hpcopt.problems.pinn.allen_cahn import steady_reference, time_reference
from hpcopt.problems.pinn.poisson import exact_solution
from hpcopt.problems.tinyshakespeare import TinyShakespeareProblem
from tests.conftest import datasets_dir

pytestmark = pytest.mark.timeout(60)


def _interface(diffusion: float):
    # u = -tanh((x - 1/2)/√(2D)) solves -D u'' + u³ - u = 0 exactly on the whole line
    # (and, being time-independent, u_t - D u_xx + u³ - u = 0 as well).
    scale = math.sqrt(2 * diffusion)

    def net(points: torch.Tensor) -> torch.Tensor:
        return -torch.tanh((points[:, :1] - 0.5) / scale)

    return net


@pytest.mark.parametrize("normalize", [True, False])
def test_poisson3d_residual_of_exact_solution_vanishes(normalize: bool) -> None:
    options = {"interior": 50, "boundary": 30, "val_grid": 3, "normalize_residual": normalize}
    problem = make_problem("poisson3d", options=options)
    inputs, targets = problem.train.inputs.double(), problem.train.targets.double()
    outputs = problem.forward(lambda x: exact_solution(x)[:, None], inputs)
    assert float(problem.criterion(outputs, targets)) < 1e-10
    # Normalised, a residual row's target f / (3 pi^2) is u* itself, at most 1; else f, up to 3 pi^2.
    residual = inputs[:, 3] < 0.5
    expected = exact_solution(inputs[residual, :3]) * (1.0 if normalize else 3 * math.pi**2)
    torch.testing.assert_close(targets[residual], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["allen-cahn", "allen-cahn-time"])
def test_allen_cahn_residual_of_exact_interface_vanishes(name: str) -> None:
    problem = make_problem(name, options={"diffusion": 0.01, "interior": 64, "val_grid": 11})
    inputs = problem.train.inputs.double()
    residual_rows = inputs[:, -1] < 0.5
    outputs = problem.forward(_interface(0.01), inputs)
    assert float(outputs[residual_rows].abs().max()) < 1e-9


def test_steady_reference_solves_the_discrete_problem_and_converges() -> None:
    x, u = steady_reference(2001, diffusion=1.0)
    assert u[0] == 1.0 and u[-1] == -1.0
    h = x[1] - x[0]
    residual = -(u[:-2] - 2 * u[1:-1] + u[2:]) / h**2 + u[1:-1] ** 3 - u[1:-1]
    assert np.abs(residual).max() < 1e-8
    # Second-order accuracy: a coarser grid agrees at shared nodes to O(h²).
    _, coarse = steady_reference(501, diffusion=1.0)
    assert np.abs(coarse - u[::4]).max() < 1e-5
    # With small D the solution is the tanh interface, up to the O(e^{-1/(2√(2D))}) boundary mismatch.
    x, u = steady_reference(2001, diffusion=0.01)
    assert np.abs(u + np.tanh((x - 0.5) / math.sqrt(0.02))).max() < 3e-3


def test_time_reference_matches_initial_boundary_and_self_convergence() -> None:
    x, _, u = time_reference(201, 400, 0.01, 1.0, save_every=40)
    assert np.allclose(u[0], 1 - 2 * x) and np.all(u[:, 0] == 1.0) and np.all(u[:, -1] == -1.0)
    _, _, fine = time_reference(401, 1600, 0.01, 1.0, save_every=160)
    assert np.abs(fine[:, ::2] - u).max() < 2e-2  # first order in time
    # The reaction sharpens the line into a decreasing interface bounded by the boundary values.
    assert np.all(np.diff(u[-1]) < 0) and np.abs(u).max() <= 1.0 + 1e-12
    assert abs(u[-1][50]) > abs(u[0][50])  # x = 1/4 moves from 1/2 towards 1


def test_allen_cahn_metric_is_zero_for_the_reference() -> None:
    problem = make_problem("allen-cahn", options={"val_grid": 101})
    sums = torch.tensor([0.0, float((problem.val.targets.double() ** 2).sum()), len(problem.val)], dtype=torch.float64)
    assert problem.eval_metrics(sums)["val_rel_l2_error"] == 0.0
    with pytest.raises(ConfigError):
        make_problem("allen-cahn", options={"diffusion": -1.0})


def _corpus(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "input.txt"
    path.write_text(text)
    return tmp_path


def test_lm_initial_loss_is_log_vocabulary(tmp_path: Path) -> None:
    text_dir = datasets_dir() / "tinyshakespeare"
    if not (text_dir / "input.txt").exists():
        text_dir = _corpus(tmp_path, "".join(chr(33 + i % 65) for i in range(20000)))
    problem = make_problem("tinyshakespeare", data_dir=str(text_dir), options={"train_windows": 64, "val_windows": 8})
    assert isinstance(problem, TinyShakespeareProblem)
    assert problem.vocab_size == 65
    torch.manual_seed(0)
    model = problem.build_model()
    assert isinstance(model, torch.nn.Sequential)
    batch = problem.train.subset(slice(0, 32))
    loss = float(problem.criterion(problem.forward(model, batch.inputs), batch.targets))
    assert abs(loss - math.log(65)) < 0.05
    metrics = problem.eval_metrics(problem.eval_sums(model, problem.val))
    assert abs(metrics["val_loss"] - math.log(65)) < 0.05
    assert metrics["val_bits_per_char"] == pytest.approx(metrics["val_loss"] / math.log(2))
    # Windows: targets are the inputs shifted by one character.
    assert torch.equal(problem.train.inputs[:, 1:], problem.train.targets[:, :-1])


def test_lm_is_causal(tmp_path: Path) -> None:
    problem = make_problem(
        "tinyshakespeare", data_dir=str(_corpus(tmp_path, "abcdefgh" * 100)), options={"context": 16}
    )
    assert isinstance(problem, TinyShakespeareProblem)
    torch.manual_seed(0)
    model = problem.build_model()
    tokens = problem.train.inputs[:2]
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % problem.vocab_size
    with torch.no_grad():
        assert torch.allclose(model(tokens)[:, :10], model(changed)[:, :10], atol=1e-6)


def test_lm_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no text file"):
        make_problem("tinyshakespeare", data_dir=str(tmp_path / "missing"))
    with pytest.raises(DataError, match="empty"):
        make_problem("tinyshakespeare", data_dir=str(_corpus(tmp_path, "")))
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(DataError, match="not a text file"):
        make_problem("tinyshakespeare", data_dir=str(binary))
    with pytest.raises(DataError, match="too short"):
        make_problem("tinyshakespeare", data_dir=str(_corpus(tmp_path, "short text")))
    with pytest.raises(DataError):
        make_problem("tinyshakespeare")
