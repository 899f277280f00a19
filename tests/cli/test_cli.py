"""The command line as a user runs it: ``mpiexec -n 2 python -m mpi4py -m hpcopt …``.

Bad input must end every rank with one clear line and a non-zero exit within
seconds: never a hang (the subprocess timeout would fail the test), never a
traceback.
"""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import h5py
import pytest

from tests.conftest import run_hpcopt

pytestmark = pytest.mark.timeout(180)

FAST = ["--problem", "logistic", "--epochs", "2", "--set", "problem.n=200"]


def _assert_clean_failure(result: subprocess.CompletedProcess[str], message: str, ranks: int = 2) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("hpcopt: error:")]
    assert len(lines) == ranks, result.stderr  # one line on every rank
    assert all(message in line for line in lines), lines


@pytest.fixture(scope="module")
def bad_idx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bad_mnist")
    with gzip.open(directory / "t10k-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(b"\x00\x00\x08\x03" + (10000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    with gzip.open(directory / "t10k-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(b"\x00\x00\x08\x01" + (10000).to_bytes(4, "big") + b"\x00" * 10000)
    return directory


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--problem", "cifar"], "unknown problem 'cifar'"),
        (["--optimizer", "lbfgs", "--problem", "logistic"], "unknown optimizer 'lbfgs'"),
        (["--problem", "mnist", "--data-dir", "/nonexistent/mnist"], "/nonexistent/mnist"),
        ([*FAST, "--batch-size", "75"], "not divisible by the 2 ranks"),
        ([*FAST, "--out", "/etc/hostname/run.h5"], "/etc/hostname"),
        ([*FAST, "--set", "radius=-1"], "radius must be > 0"),
        ([*FAST, "--set", "radius=abc"], "expected float"),
        ([*FAST, "--set", "no_such_option=1"], "unknown apts-d option 'no_such_option'"),
        ([*FAST, "--set", "radius"], "--set expects key=value"),
        ([*FAST, "--epochs", "0"], "--epochs must be >= 1"),
        ([*FAST, "--read-ahead", "2", "--num-workers", "1"], "two ways to read ahead: give one of them"),
    ],
)
def test_bad_input_fails_cleanly_on_every_rank(args: list[str], message: str) -> None:
    _assert_clean_failure(run_hpcopt(["train", *args], ranks=2, timeout=120), message)


def test_corrupted_idx_file_fails_cleanly(bad_idx_dir: Path) -> None:
    result = run_hpcopt(["train", "--problem", "mnist", "--data-dir", str(bad_idx_dir)], ranks=2, timeout=120)
    _assert_clean_failure(result, "truncated")


def test_malformed_config_file_fails_cleanly(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("epochs = [unclosed\n")
    _assert_clean_failure(run_hpcopt(["train", "--config", str(config)], ranks=2), "is not valid TOML")


def test_config_table_naming_nothing_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "typo.toml"
    config.write_text("[apts_d]\nradius = 0.5\n")
    _assert_clean_failure(run_hpcopt(["train", "--config", str(config)], ranks=2), "table [apts_d] names no")


def test_existing_output_is_refused_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    out.write_bytes(b"precious results")
    _assert_clean_failure(run_hpcopt(["train", *FAST, "--out", str(out)], ranks=2), "already exists")
    assert out.read_bytes() == b"precious results"


def test_train_and_analyze_end_to_end(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        'problem = "logistic"\nepochs = 3\n[apts-d]\nradius = 0.5\n[sgd]\nlr = 0.1\n[logistic]\nn = 200\n'
    )
    out = tmp_path / "run.h5"
    result = run_hpcopt(["train", "--config", str(config), "--out", str(out), "--seed", "2"], ranks=2)
    assert result.returncode == 0, result.stderr
    assert "epoch    3/3" in result.stdout and "done:" in result.stdout
    assert result.stdout.count("done:") == 1  # only rank 0 prints
    with h5py.File(out, "r", swmr=True) as log:
        assert log.attrs["status"] == "completed"
        assert log.attrs["world_size"] == 2
        assert log.attrs["optimizer"] == "apts-d"
        assert '"radius": 0.5' in log.attrs["config_json"]
        iterations = log["iterations"]
        assert len(iterations["loss"]) == 3 and len(iterations["comm_bytes"]) == 3
        assert (iterations["comm_bytes"][:] > 0).all()
        assert len(log["evaluations/val_accuracy"]) == 3
        assert len(log["ranks/compute_time"]) == 2
    table = run_hpcopt(["analyze", str(out)])
    assert table.returncode == 0 and "apts-d" in table.stdout and "logistic" in table.stdout
