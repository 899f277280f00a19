"""Tests of hpcopt.analysis.scaling and ``hpcopt analyze`` on sweeps: tables, CSV, figures, the model."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from hpcopt.analysis.perfmodel import Network
from hpcopt.analysis.report import analyze
from hpcopt.analysis.scaling import SCALING_COLUMNS, find_sweeps, scaling_rows
from hpcopt.analysis.tables import load_run
from hpcopt.log.runlog import EvaluationRecord, IterationRecord, RunLog
from tests.conftest import run_hpcopt


def write_point(path: Path, *, ranks: int, batch: int, step_time: float, comm_time: float) -> None:
    """Five steps of ``step_time`` s (the first 3× slower, as start-up is), ``comm_time`` s of it in collectives."""
    with RunLog(path) as log:
        log.open(
            {"optimizer": "sgd", "problem": "logistic", "model": "linear", "world_size": ranks, "batch_size": batch},
            metric_names=["val_accuracy"],
        )
        wall = 0.0
        for step in range(1, 6):
            wall += step_time * (3 if step == 1 else 1)
            log.log_iteration(
                IterationRecord(step, step / 5, 1.0 / step, math.nan, 0.1, math.nan, True, wall, 2, 800, comm_time)
            )
        log.log_evaluation(EvaluationRecord(1.0, wall, 0.3, 0.35, {"val_accuracy": 0.5 + 0.1 * ranks}))


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    # Strong: global batch 64 on 1, 2, 4 ranks; weak: 64 per rank (the 1-rank run is shared).
    write_point(tmp_path / "s1.h5", ranks=1, batch=64, step_time=1.0, comm_time=0.0)
    write_point(tmp_path / "s2.h5", ranks=2, batch=64, step_time=0.625, comm_time=0.125)
    write_point(tmp_path / "s4.h5", ranks=4, batch=64, step_time=0.5, comm_time=0.25)
    write_point(tmp_path / "w2.h5", ranks=2, batch=128, step_time=1.25, comm_time=0.25)
    return tmp_path


def test_sweeps_and_rows(sweep_dir: Path) -> None:
    runs = [load_run(path) for path in sorted(sweep_dir.glob("*.h5"))]
    sweeps = find_sweeps(runs)
    assert [(s.study, s.ranks) for s in sweeps] == [("strong", [1, 2, 4]), ("weak", [1, 2])]
    rows = scaling_rows(sweeps)
    assert list(rows[0]) == list(SCALING_COLUMNS)
    strong = {row["ranks"]: row for row in rows if row["study"] == "strong"}
    assert strong[1]["iter_time"] == 1.0 and strong[1]["speedup"] == 1.0
    assert strong[2]["speedup"] == pytest.approx(1.6) and strong[2]["efficiency"] == pytest.approx(0.8)
    assert strong[4]["speedup"] == pytest.approx(2.0) and strong[4]["efficiency"] == pytest.approx(0.5)
    # 5 steps of 0.25 s communication over 7 × 0.5 s of wall time (first step 3×).
    assert strong[4]["comm_fraction"] == pytest.approx(1.25 / 3.5)
    assert strong[4]["bytes_per_iter"] == 800.0 and strong[4]["final_metric"] == pytest.approx(0.9)
    weak = [row for row in rows if row["study"] == "weak"]
    assert [row["global_batch"] for row in weak] == [64, 128]
    assert weak[1]["efficiency"] == pytest.approx(0.8) and weak[1]["speedup"] == pytest.approx(1.6)


def test_analyze_directory_csv_plots_and_model(sweep_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("out")
    text = analyze(
        [str(sweep_dir)],
        csv=str(out / "summary.csv"),
        plot=str(out / "fig"),
        network=Network(2e-6, 25e9),
        model_ranks=[64, 1024],
    )
    assert "scaling (median time per iteration" in text and "α–β model" in text
    with open(out / "summary-scaling.csv", newline="") as stream:
        records = list(csv.DictReader(stream))
    assert len(records) == 5 and float(records[2]["efficiency"]) == pytest.approx(0.5)
    for name in ("curves.png", "scaling.png"):
        data = (out / "fig" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    model_lines = text.split("α–β model")[1].splitlines()
    # 1, 2, 4, 64, 1024 (strong) and 1, 2, 64, 1024 (weak)
    assert sum(line.startswith(("strong", "weak")) for line in model_lines) == 9


def test_cli_model_needs_network(sweep_dir: Path) -> None:
    done = run_hpcopt(["analyze", str(sweep_dir), "--model"])
    assert done.returncode == 2
    assert done.stderr.strip().startswith("hpcopt: error: --model needs a network")
    done = run_hpcopt(["analyze", str(sweep_dir), "--model", "--latency", "2e-6", "--bandwidth", "25e9"])
    assert done.returncode == 0, done.stderr
    assert "α–β model (α=2 µs, bandwidth 25 GB/s, auto" in done.stdout


def test_single_run_output_unchanged(sweep_dir: Path) -> None:
    # One run: only the summary table (what scripts parsing the old output expect).
    assert len(analyze([str(sweep_dir / "s1.h5")]).splitlines()) == 3
