"""Tests of hpcopt.analysis.tables: loading run logs, the summary table and the CSV output."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcopt.analysis.report import analyze
from hpcopt.analysis.tables import SUMMARY_COLUMNS, format_table, load_run, summary_rows
from hpcopt.errors import DataError, OutputError
from hpcopt.log.runlog import EvaluationRecord, IterationRecord, RunLog


def write_run(path: Path, *, optimizer: str, fail: bool = False) -> None:
    """Four steps (1 s, 1 s, 2 s, 1 s; two accepted) and two evaluations."""
    wall_times = [1.0, 2.0, 4.0, 5.0]
    log = RunLog(path)
    log.open(
        {"optimizer": optimizer, "problem": "mnist_mlp", "world_size": 4, "hostnames": ["n1"]},
        metric_names=["val_accuracy"],
    )
    for step, wall_time in enumerate(wall_times):
        log.log_iteration(
            IterationRecord(
                step=step,
                epoch=0.5 * (step + 1),
                loss=2.0 - 0.25 * step,
                radius=1.0 if optimizer != "sgd" else math.nan,
                step_norm=0.1,
                ratio=0.5,
                accepted=step % 2 == 0,
                wall_time=wall_time,
                comm_calls=3 + step % 2,
                comm_bytes=1000 * (step + 1),
                comm_time=0.01,
            )
        )
    log.log_evaluation(EvaluationRecord(1.0, 2.5, 1.5, 1.6, {"val_accuracy": 0.9}))
    log.log_evaluation(EvaluationRecord(2.0, 5.5, 1.25, 1.375, {"val_accuracy": 0.9375}))
    log.set_rank_times([4.0, 4.0, 4.0, 4.0], [1.0, 1.0, 1.0, 1.0])
    log.close("failed" if fail else "completed")


@pytest.mark.timeout(60)
def test_integer_reads_a_numeric_attribute_back_as_int(tmp_path: Path) -> None:
    write_run(tmp_path / "run.h5", optimizer="sgd")
    run = load_run(tmp_path / "run.h5")
    ranks = run.integer("world_size")
    assert ranks == 4 and type(ranks) is int  # h5py stores a numpy integer
    assert run.integer("batch_size", 7) == 7  # missing: the default
    assert run.integer("optimizer", 1) == 1  # not a number: the default
    with pytest.raises(KeyError, match="no numeric root attribute 'batch_size'"):
        run.integer("batch_size")


@pytest.mark.timeout(60)
def test_summary_rows_have_expected_numbers(tmp_path: Path) -> None:
    write_run(tmp_path / "tr.h5", optimizer="tr_cg")
    write_run(tmp_path / "sgd.h5", optimizer="sgd", fail=True)
    rows = summary_rows([load_run(tmp_path / "tr.h5"), load_run(tmp_path / "sgd.h5")])
    assert [row["file"] for row in rows] == ["tr.h5", "sgd.h5"]
    first = rows[0]
    assert list(first) == list(SUMMARY_COLUMNS)
    assert first["optimizer"] == "tr_cg" and first["problem"] == "mnist_mlp"
    assert first["ranks"] == 4
    assert first["status"] == "completed" and rows[1]["status"] == "failed"
    assert first["steps"] == 4
    assert first["epochs"] == 2.0
    assert first["final_train_loss"] == 1.25
    assert first["final_val_loss"] == 1.375
    assert first["final_metric"] == "val_accuracy"
    assert first["final_metric_value"] == 0.9375
    assert first["accepted_fraction"] == 0.5
    assert first["median_iter_time"] == 1.0  # steps took 1, 1, 2, 1 s
    assert first["total_wall_time"] == 5.5  # the last evaluation ends after the last step
    assert first["comm_bytes_per_iter"] == 2500.0
    assert first["comm_calls_per_iter"] == 3.5


@pytest.mark.timeout(60)
def test_summary_of_run_without_evaluations(tmp_path: Path) -> None:
    path = tmp_path / "bare.h5"
    with RunLog(path) as log:
        log.open({"optimizer": "sgd"})
        log.log_iteration(IterationRecord(0, 0.1, 3.0, math.nan, 0.1, math.nan, True, 0.5, 1, 8, 0.0))
    (row,) = summary_rows([load_run(path)])
    assert row["final_train_loss"] == 3.0  # the last step's loss stands in
    assert math.isnan(float(row["final_val_loss"]))  # type: ignore[arg-type]
    assert row["final_metric"] == ""
    assert row["problem"] == ""
    assert "-" in format_table([row])


@pytest.mark.timeout(60)
def test_format_table_is_fixed_width(tmp_path: Path) -> None:
    rows = [
        {"file": "a.h5", "steps": 10, "loss": 0.123456789, "bytes": 1.5e9, "tiny": 2.5e-7, "gap": math.nan},
        {"file": "longer_name.h5", "steps": 200, "loss": 12.0, "bytes": 0.0, "tiny": 1.0, "gap": 1.0},
    ]
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["file", "steps", "loss", "bytes", "tiny", "gap"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["a.h5", "10", "0.1235", "1.500e+09", "2.500e-07", "-"]
    assert lines[3].split() == ["longer_name.h5", "200", "12", "0", "1", "1"]
    # Numbers are right-aligned: the columns end at the same place on every line.
    assert lines[2].index("0.1235") + len("0.1235") == lines[3].index(" 12 ") + len(" 12")
    assert format_table(rows, columns=["steps", "file"]).splitlines()[0].split() == ["steps", "file"]


@pytest.mark.timeout(60)
def test_analyze_prints_table_and_writes_csv(tmp_path: Path) -> None:
    write_run(tmp_path / "tr.h5", optimizer="tr_cg")
    csv_path = tmp_path / "summary.csv"
    table = analyze([str(tmp_path / "tr.h5")], csv=str(csv_path))
    header, _, row = table.splitlines()
    assert header.split() == list(SUMMARY_COLUMNS)
    assert row.split()[:7] == ["tr.h5", "tr_cg", "mnist_mlp", "4", "completed", "4", "2"]
    with open(csv_path, newline="") as stream:
        (record,) = list(csv.DictReader(stream))
    assert float(record["final_val_loss"]) == 1.375
    assert float(record["comm_bytes_per_iter"]) == 2500.0

    with pytest.raises(OutputError, match="cannot write CSV"):
        analyze([str(tmp_path / "tr.h5")], csv=str(tmp_path / "missing" / "s.csv"))
    with pytest.raises(OutputError, match="is a directory"):
        analyze([str(tmp_path / "tr.h5")], csv=str(tmp_path))
    with pytest.raises(DataError, match="no run logs"):
        analyze([])


@pytest.mark.timeout(60)
def test_load_run_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_run(tmp_path / "missing.h5")
    with pytest.raises(DataError, match="is a directory"):
        load_run(tmp_path)
    text_file = tmp_path / "notes.h5"
    text_file.write_text("not hdf5 at all\n")
    with pytest.raises(DataError, match="not an HDF5 file"):
        load_run(text_file)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as handle:
        handle["x"] = np.arange(3)
    with pytest.raises(DataError, match="no 'iterations' group") as caught:
        load_run(other)
    assert "\n" not in str(caught.value)


@pytest.mark.timeout(60)
def test_load_run_reads_plain_hdf5_log(tmp_path: Path) -> None:
    # A log written without libver="latest" (e.g. by another tool) is read by the plain-open fallback.
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w", libver="earliest") as handle:
        handle.attrs["status"] = "completed"
        iterations = handle.create_group("iterations")
        iterations["step"] = np.arange(3)
        iterations["accepted"] = np.array([1, 0, 1], dtype=np.int8)
        iterations["loss"] = np.array([3.0, 2.0])  # one row short, as a live reader may see
    run = load_run(path)
    assert run.status == "completed"
    np.testing.assert_array_equal(run.iterations["step"], [0, 1])
    np.testing.assert_array_equal(run.iterations["accepted"], [True, False])
    assert run.evaluations == {} and run.ranks == {}


@pytest.mark.timeout(60)
def test_iterations_frame(tmp_path: Path) -> None:
    write_run(tmp_path / "tr.h5", optimizer="tr_cg")
    run = load_run(tmp_path / "tr.h5")
    if importlib.util.find_spec("pandas") is None:
        with pytest.raises(ImportError, match="needs pandas"):
            run.iterations_frame()
    else:
        frame = run.iterations_frame()
        assert len(frame) == 4
        np.testing.assert_array_equal(frame["loss"].to_numpy(), run.iterations["loss"])
