"""``hpcopt analyze`` never hangs: each run log is read in a child process with a time bound."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from hpcopt.analysis import tables
from hpcopt.analysis.report import analyze
from hpcopt.analysis.tables import load_run, load_run_bounded
from hpcopt.errors import ConfigError, DataError
from hpcopt.log.runlog import EvaluationRecord, IterationRecord, RunLog

pytestmark = pytest.mark.timeout(60)


def _write(path: Path) -> None:
    with RunLog(path) as log:
        log.open({"optimizer": "sgd", "problem": "logistic", "world_size": 2}, metric_names=["val_accuracy"])
        for step in (1, 2, 3):
            log.log_iteration(IterationRecord(step, step / 3, 1.0 / step, math.nan, 0.1, math.nan, True, step, 2, 8, 0))
        log.log_evaluation(EvaluationRecord(1.0, 3.5, 0.4, 0.5, {"val_accuracy": 0.75}))


def test_the_bounded_read_returns_what_load_run_returns(tmp_path: Path) -> None:
    path = tmp_path / "r.h5"
    _write(path)
    direct, bounded = load_run(path), load_run_bounded(path, 30)
    assert bounded.path == direct.path and bounded.attributes == direct.attributes
    for group in ("iterations", "evaluations", "ranks"):
        mine, theirs = getattr(bounded, group), getattr(direct, group)
        assert mine.keys() == theirs.keys()
        for name in mine:
            np.testing.assert_array_equal(mine[name], theirs[name])
            assert mine[name].dtype == theirs[name].dtype


def test_a_read_that_hangs_is_cut_off_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "r.h5"
    _write(path)
    # As HDF5 looping inside a damaged file: the child never answers.
    monkeypatch.setattr(tables, "load_run", lambda _path: time.sleep(600))
    started = time.monotonic()
    with pytest.raises(DataError) as error:
        analyze([str(path)], read_timeout=1.0)
    assert str(error.value) == (
        f"reading run log {path} took more than 1 s: the file is damaged or its file system stalls "
        "(--read-timeout to wait longer)"
    )
    assert time.monotonic() - started < 30  # far below the 600 s the read would take


def test_a_reader_that_dies_is_an_error_not_a_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "r.h5"
    _write(path)
    # As a crash inside HDF5: the child vanishes without an answer.
    monkeypatch.setattr(tables, "load_run", lambda _path: os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(DataError, match=r"the reading process died \(the file is probably damaged\)"):
        load_run_bounded(path, 30)


def test_errors_of_the_child_come_back_as_they_are(tmp_path: Path) -> None:
    path = tmp_path / "bad.h5"
    path.write_bytes(b"not hdf5")
    with pytest.raises(DataError, match=r"bad\.h5 is not an HDF5 file, so not an hpcopt run log"):
        load_run_bounded(path, 30)


def test_a_non_positive_read_timeout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--read-timeout must be > 0 seconds, got 0"):
        analyze([str(tmp_path / "r.h5")], read_timeout=0)


def test_three_logs_of_one_name_are_told_apart(tmp_path: Path) -> None:
    paths = [tmp_path / name / "r.h5" for name in ("a", "b", "c")]
    for path in paths:
        path.parent.mkdir()
        _write(path)
    table = analyze([str(path) for path in paths]).splitlines()
    assert [line.split()[0] for line in table[2:5]] == ["a/r.h5", "b/r.h5", "c/r.h5"]
