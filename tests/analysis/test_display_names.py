"""Tests of the run names in ``hpcopt analyze``'s tables: the shortest distinguishing path of each run."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from hpcopt.analysis.report import analyze
from hpcopt.analysis.scaling import find_sweeps, scaling_rows
from hpcopt.analysis.tables import display_names, load_run, summary_rows
from hpcopt.log.runlog import IterationRecord, RunLog


def write_log(path: Path, *, ranks: int = 1, batch: int = 64) -> None:
    """Two steps of an SGD run at ``ranks`` ranks with global batch ``batch``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with RunLog(path) as log:
        log.open({"optimizer": "sgd", "problem": "logistic", "world_size": ranks, "batch_size": batch})
        for step in (1, 2):
            log.log_iteration(IterationRecord(step, step / 2, 1.0 / step, math.nan, 0.1, math.nan, True, step, 2, 8, 0))


def test_display_names_unit() -> None:
    join = os.path.join
    assert display_names([join("runs", "a", "r.h5")]) == ["r.h5"]  # one run: its basename
    assert display_names([join("runs", "a", "r.h5"), join("runs", "b", "s.h5")]) == ["r.h5", "s.h5"]
    assert display_names([join("runs", "a", "r.h5"), join("runs", "b", "r.h5"), join("runs", "c", "s.h5")]) == [
        join("a", "r.h5"),
        join("b", "r.h5"),
        "s.h5",
    ]
    # A path that ends another one is shown whole; the other needs one more component.
    assert display_names(["r.h5", join("x", "r.h5")]) == ["r.h5", join("x", "r.h5")]
    # Same folder name at the deepest level: the differing component further up is kept.
    assert display_names([join("/data", "p", "a", "r.h5"), join("/data", "q", "a", "r.h5")]) == [
        join("p", "a", "r.h5"),
        join("q", "a", "r.h5"),
    ]
    # ./ and doubled separators do not count as components.
    assert display_names([join(".", "a", "r.h5"), "b" + os.sep + os.sep + "r.h5"]) == [
        join("a", "r.h5"),
        join("b", "r.h5"),
    ]
    # The same file twice cannot be told apart: shown in full.
    assert display_names([join("a", "r.h5"), join("a", "r.h5")]) == [join("a", "r.h5")] * 2
    assert display_names([]) == []


@pytest.mark.timeout(60)
def test_analyze_tells_apart_three_logs_of_the_same_name(tmp_path: Path) -> None:
    paths = [tmp_path / "runs" / "a" / "r.h5", tmp_path / "runs" / "b" / "r.h5", tmp_path / "old" / "a" / "r.h5"]
    for path in paths:
        write_log(path)
    expected = [os.path.join("runs", "a", "r.h5"), os.path.join("b", "r.h5"), os.path.join("old", "a", "r.h5")]
    assert [row["file"] for row in summary_rows([load_run(path) for path in paths])] == expected
    table = analyze([str(path) for path in paths])
    assert [line.split()[0] for line in table.splitlines()[2:5]] == expected


@pytest.mark.timeout(60)
def test_scaling_table_tells_apart_logs_of_the_same_name(tmp_path: Path) -> None:
    # A strong sweep whose points all wrote "r.h5", each in the folder of its rank count.
    paths = [tmp_path / f"P{ranks}" / "r.h5" for ranks in (1, 2, 4)]
    for ranks, path in zip((1, 2, 4), paths):
        write_log(path, ranks=ranks)
    rows = scaling_rows(find_sweeps([load_run(path) for path in paths]))
    assert [(row["ranks"], row["file"]) for row in rows] == [
        (1, os.path.join("P1", "r.h5")),
        (2, os.path.join("P2", "r.h5")),
        (4, os.path.join("P4", "r.h5")),
    ]
