"""``benchmarks/large_batch.py --seeds``: one run per seed, the learning rate chosen on the first seed."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from tests.conftest import REPO, mnist_dir


def run_study(outdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(REPO / "benchmarks" / "large_batch.py"), "--data-dir", str(mnist_dir())]
    command += ["--outdir", str(outdir), "--train-size", "8000", "--batches", "4000", "--epochs", "1"]
    command += ["--ranks", "1", "--methods", "adam", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.timeout(300)
def test_every_seed_runs_and_the_first_chooses_the_learning_rate(tmp_path: Path) -> None:
    done = run_study(tmp_path, "--lrs", "adam=0.003:0.01", "--seeds", "0,1")
    assert done.returncode == 0, done.stdout + done.stderr
    runs = {row["run"]: row for row in rows(tmp_path / "large_batch.csv")}
    assert set(runs) == {f"adam.b4000.lr{lr}{suffix}" for lr in ("0.003", "0.01") for suffix in ("", ".s1")}
    for name, row in runs.items():
        seed = 1 if name.endswith(".s1") else 0
        assert int(row["seed"]) == seed
        with h5py.File(tmp_path / f"{name}.h5", "r") as log:
            assert int(log.attrs["seed"]) == seed  # the run was started with its own seed
    # another seed, other initial weights and batches: another result
    assert runs["adam.b4000.lr0.01"]["final_accuracy"] != runs["adam.b4000.lr0.01.s1"]["final_accuracy"]
    # the best learning rate is the first seed's: exactly one flagged run, of seed 0, the better of the two
    flagged = [name for name, row in runs.items() if row["best_lr_of_method"] == "1"]
    seed0 = {name: float(row["final_accuracy"]) for name, row in runs.items() if row["seed"] == "0"}
    assert flagged == [max(seed0, key=seed0.__getitem__)]
    # the seed table: each configuration's accuracies over its seeds, and their mean
    summaries = {row["configuration"]: row for row in rows(tmp_path / "large_batch_seeds.csv")}
    assert set(summaries) == {"adam.b4000.lr0.003", "adam.b4000.lr0.01"}
    for setting, summary in summaries.items():
        finals = [float(runs[name]["final_accuracy"]) for name in (setting, f"{setting}.s1")]
        assert summary["seeds"] == "0 1"
        assert [float(value) for value in summary["final_accuracy"].split()] == finals
        assert float(summary["mean"]) == pytest.approx(sum(finals) / 2, abs=0.006)
        assert float(summary["std"]) == pytest.approx(abs(finals[0] - finals[1]) / 2**0.5, abs=0.006)
    assert (tmp_path / "large_batch_seeds.png").stat().st_size > 0


def test_a_seed_given_twice_is_refused_before_any_run(tmp_path: Path) -> None:
    done = run_study(tmp_path, "--seeds", "0,1,0")
    assert done.returncode == 2
    assert "--seeds has a seed twice: (0, 1, 0)" in done.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.glob("*.h5"))
