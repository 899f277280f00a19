"""Tests of hpcopt.log.runlog: the file layout, status transitions, path checks and crash safety."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcopt.analysis.tables import load_run
from hpcopt.errors import OutputError
from hpcopt.log.runlog import ITERATION_FIELDS, EvaluationRecord, IterationRecord, RunLog

ROOT = Path(__file__).resolve().parents[2]

ATTRIBUTES: dict[str, object] = {
    "hpcopt_version": "0.1.0",
    "optimizer": "sgd",
    "problem": "mnist_mlp",
    "world_size": 2,
    "num_parameters": 12345,
    "seed": 7,
    "config_json": '{"lr": 0.1}',
    "mpi_library_version": "Open MPI v4.1",
    "torch_version": "2.3.0",
    "hostnames": ["node01", "node02"],
    "git_sha": None,
}


def make_iteration(step: int) -> IterationRecord:
    """A deterministic row whose every field differs from step to step."""
    return IterationRecord(
        step=step,
        epoch=0.25 * step,
        loss=1.0 / (step + 1),
        radius=math.nan,
        step_norm=0.5 + step,
        ratio=0.1 * step,
        accepted=step % 3 != 0,
        wall_time=0.01 * (step + 1),
        comm_calls=2 + step % 2,
        comm_bytes=4096 * (step + 1),
        comm_time=0.001 * step,
    )


def start_writer(script: str, path: Path, stdin: int | None = None) -> subprocess.Popen[str]:
    """``python -c script path`` (a run-log writer) in another process, its stdout piped."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-c", script, str(path)], stdin=stdin, stdout=subprocess.PIPE, text=True, env=env
    )


@pytest.mark.timeout(60)
def test_round_trip_every_array(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    rows = [make_iteration(step) for step in range(7)]
    evaluations = [
        EvaluationRecord(1.0, 0.5, 0.9, 1.1, {"val_accuracy": 0.8}),
        EvaluationRecord(2.0, 1.0, 0.4, 0.6, {"val_accuracy": 0.95}),
    ]
    with RunLog(path, flush_every=3) as log:
        log.open(ATTRIBUTES, metric_names=["val_accuracy"])
        for row in rows:
            log.log_iteration(row)
        for evaluation in evaluations:
            log.log_evaluation(evaluation)
        log.set_rank_times([1.5, 1.25], [0.5, 0.75])
        log.set_attribute("seed", 8)  # exists with the same type: in place
        log.set_attribute("total_time", 12.5)  # new: written at close

    run = load_run(path)
    assert run.status == "completed"
    for name in ITERATION_FIELDS:
        expected = np.array([getattr(row, name) for row in rows])
        np.testing.assert_array_equal(run.iterations[name], expected, err_msg=name)
    assert run.iterations["accepted"].dtype == bool
    assert np.isnan(run.iterations["radius"]).all()
    np.testing.assert_array_equal(run.evaluations["epoch"], [1.0, 2.0])
    np.testing.assert_array_equal(run.evaluations["wall_time"], [0.5, 1.0])
    np.testing.assert_array_equal(run.evaluations["train_loss"], [0.9, 0.4])
    np.testing.assert_array_equal(run.evaluations["val_loss"], [1.1, 0.6])
    np.testing.assert_array_equal(run.evaluations["val_accuracy"], [0.8, 0.95])
    np.testing.assert_array_equal(run.ranks["compute_time"], [1.5, 1.25])
    np.testing.assert_array_equal(run.ranks["comm_time"], [0.5, 0.75])

    for name, value in ATTRIBUTES.items():
        if name not in ("seed", "git_sha"):
            assert run.attributes[name] == value, name
    assert run.attributes["git_sha"] == ""
    assert run.attributes["seed"] == 8
    assert run.attributes["total_time"] == 12.5
    assert str(run.attributes["created_utc"]).endswith("+00:00")

    with h5py.File(path, "r") as handle:
        assert handle["iterations/step"].dtype == np.int64
        assert handle["iterations/comm_bytes"].dtype == np.int64
        assert handle["iterations/accepted"].dtype == np.int8
        assert handle["iterations/loss"].dtype == np.float64


@pytest.mark.timeout(60)
def test_status_running_then_completed(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    log = RunLog(path)
    log.open(ATTRIBUTES)
    log.log_iteration(make_iteration(0))
    assert load_run(path).status == "running"
    log.close()
    log.close("failed")  # idempotent: the first status stays
    run = load_run(path)
    assert run.status == "completed"
    assert len(run.iterations["step"]) == 1


@pytest.mark.timeout(60)
def test_string_attributes_read_back_as_str_with_plain_h5py(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with RunLog(path) as log:
        log.open(ATTRIBUTES)
        # The writer's own locking flags: HDF5 shares the open file within one process.
        with h5py.File(path, "r", swmr=True, locking="best-effort") as live:
            assert live.attrs["status"] == "running"
        log.set_attribute("optimizer", np.str_("adam"))  # numpy's str is stored as text too
        log.set_attribute("device", "cpu")  # new: written at close
    with h5py.File(path, "r") as handle:
        assert handle.attrs["status"] == "completed"
        for name in ("optimizer", "problem", "git_sha", "created_utc", "device"):
            assert isinstance(handle.attrs[name], str), name
        assert handle.attrs["optimizer"] == "adam" and handle.attrs["device"] == "cpu"
        assert list(handle.attrs["hostnames"]) == ["node01", "node02"]
        assert handle.attrs.get_id("status").get_type().get_cset() == h5py.h5t.CSET_UTF8


@pytest.mark.timeout(60)
def test_load_run_reads_old_log_with_bytes_attributes(tmp_path: Path) -> None:
    # Logs of earlier versions: a 16-byte fixed-length status (NUL-padded) and byte strings,
    # which h5py reads back as bytes.
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs.create("status", np.bytes_("completed"), dtype="S16")
        handle.attrs["optimizer"] = np.bytes_("sgd")
        handle.attrs["hostnames"] = np.array([b"node01", b"node02"], dtype="S6")
        handle.create_group("iterations")["step"] = np.arange(3)
    with h5py.File(path, "r") as handle:
        assert isinstance(handle.attrs["status"], bytes)
    run = load_run(path)
    assert run.status == "completed"
    assert run.attributes["optimizer"] == "sgd"
    assert run.attributes["hostnames"] == ["node01", "node02"]
    np.testing.assert_array_equal(run.iterations["step"], [0, 1, 2])


@pytest.mark.timeout(60)
def test_exception_inside_with_marks_failed_and_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with pytest.raises(RuntimeError, match="diverged"), RunLog(path, flush_every=10) as log:
        log.open(ATTRIBUTES)
        for step in range(4):
            log.log_iteration(make_iteration(step))
        raise RuntimeError("diverged")
    run = load_run(path)
    assert run.status == "failed"
    np.testing.assert_array_equal(run.iterations["step"], [0, 1, 2, 3])


@pytest.mark.timeout(60)
def test_undeclared_metric_is_backfilled_with_nan(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with RunLog(path) as log:
        log.open(ATTRIBUTES)
        log.log_evaluation(EvaluationRecord(1.0, 1.0, 0.5, 0.6, {}))
        log.log_evaluation(EvaluationRecord(2.0, 2.0, 0.4, 0.5, {"val_rel_l2_error": 1e-3}))
    values = load_run(path).evaluations["val_rel_l2_error"]
    assert np.isnan(values[0]) and values[1] == 1e-3


@pytest.mark.timeout(60)
def test_disabled_log_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with RunLog(path, enabled=False) as log:
        log.open(ATTRIBUTES)
        log.log_iteration(make_iteration(0))
        log.log_evaluation(EvaluationRecord(1.0, 1.0, 0.5, 0.6, {}))
        log.set_rank_times([1.0], [0.0])
        log.set_attribute("x", 1)
    assert not path.exists()
    with RunLog(None) as log:
        log.open(ATTRIBUTES)
        log.log_iteration(make_iteration(0))


@pytest.mark.timeout(60)
def test_overwrite_replaces_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    path.write_text("old")
    with pytest.raises(OutputError, match="already exists"):
        RunLog(path).open(ATTRIBUTES)
    with RunLog(path, overwrite=True) as log:
        log.open(ATTRIBUTES)
        log.log_iteration(make_iteration(0))
    assert load_run(path).status == "completed"


@pytest.mark.timeout(60)
def test_check_path_errors(tmp_path: Path) -> None:
    RunLog.check_path(tmp_path / "new.h5", overwrite=False)
    RunLog.check_path(None, overwrite=False)

    with pytest.raises(OutputError, match=r"directory .*missing.* does not exist"):
        RunLog.check_path(tmp_path / "missing" / "run.h5", overwrite=False)

    existing = tmp_path / "existing.h5"
    existing.write_bytes(b"")
    with pytest.raises(OutputError, match="already exists"):
        RunLog.check_path(existing, overwrite=False)
    RunLog.check_path(existing, overwrite=True)

    with pytest.raises(OutputError, match="is a directory"):
        RunLog.check_path(tmp_path, overwrite=True)

    # Tests run as root, which ignores permission bits: a regular file as the
    # parent "directory" is unwritable for everyone.
    plain_file = tmp_path / "x"
    plain_file.write_text("")
    with pytest.raises(OutputError, match="is not a directory"):
        RunLog.check_path(plain_file / "run.h5", overwrite=False)

    with pytest.raises(OutputError, match="empty"):
        RunLog.check_path("", overwrite=False)

    # Every message is one line, as the CLI prints it.
    with pytest.raises(OutputError) as caught:
        RunLog.check_path(tmp_path / "missing" / "run.h5", overwrite=False)
    assert "\n" not in str(caught.value)
    # A pure check: nothing was created.
    assert sorted(item.name for item in tmp_path.iterdir()) == ["existing.h5", "x"]


KILLED_WRITER = textwrap.dedent(
    """
    import math, sys, time
    from hpcopt.log.runlog import IterationRecord, RunLog

    log = RunLog(sys.argv[1], flush_every=1)
    log.open({"optimizer": "sgd", "problem": "quadratic"}, metric_names=["val_accuracy"])
    for step in range(50):
        log.log_iteration(IterationRecord(step, step / 10, 1.0 / (step + 1), math.nan, 0.1, math.nan,
                                          True, 0.01 * step, 1, 8, 0.0))
    print("ready", flush=True)
    time.sleep(60)
    """
)


@pytest.mark.timeout(60)
def test_sigkill_leaves_every_flushed_row(tmp_path: Path) -> None:
    path = tmp_path / "killed.h5"
    writer = start_writer(KILLED_WRITER, path)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL

    # A killed SWMR writer leaves its "open for writing" mark, which a SWMR reader accepts.
    with h5py.File(path, "r", swmr=True, locking=False) as handle:
        assert handle.attrs["status"] == "running"
        assert handle["iterations/step"].shape == (50,)
        np.testing.assert_array_equal(handle["iterations/step"][()], np.arange(50))
    run = load_run(path)
    assert run.status == "running"
    assert len(run.iterations["loss"]) == 50
    assert run.iterations["accepted"].all()


LIVE_WRITER = textwrap.dedent(
    """
    import math, sys
    from hpcopt.log.runlog import EvaluationRecord, IterationRecord, RunLog

    with RunLog(sys.argv[1]) as log:
        log.open({"optimizer": "tr_cg", "problem": "quadratic"}, metric_names=["val_accuracy"])
        step = 0
        for block in range(2):
            for _ in range(10):
                log.log_iteration(IterationRecord(step, 0.0, 1.0, 1.0, 0.1, 0.9, True, 0.01 * step,
                                                  1, 8, 0.0))
                step += 1
            log.log_evaluation(EvaluationRecord(float(block), 0.0, 1.0, 1.0, {"val_accuracy": 0.5}))
            print("ready", flush=True)
            sys.stdin.readline()  # wait until the test has read the file
    """
)


@pytest.mark.timeout(60)
def test_reader_sees_log_while_it_is_written(tmp_path: Path) -> None:
    path = tmp_path / "live.h5"
    writer = start_writer(LIVE_WRITER, path, stdin=subprocess.PIPE)
    assert writer.stdin is not None and writer.stdout is not None
    try:
        for block in range(2):
            assert writer.stdout.readline().strip() == "ready"
            run = load_run(path)
            assert run.status == "running"
            assert len(run.iterations["step"]) == 10 * (block + 1)
            assert len(run.evaluations["val_accuracy"]) == block + 1
            writer.stdin.write("\n")
            writer.stdin.flush()
        assert writer.wait(timeout=30) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert load_run(path).status == "completed"


@pytest.mark.timeout(60)
def test_misuse_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="flush_every"):
        RunLog(tmp_path / "a.h5", flush_every=0)
    log = RunLog(tmp_path / "b.h5")
    with pytest.raises(RuntimeError, match="not opened"):
        log.log_iteration(make_iteration(0))
    log.open(ATTRIBUTES)
    with pytest.raises(ValueError, match="status"):
        log.close("done")
    with pytest.raises(ValueError, match="entries"):
        log.set_rank_times([1.0, 2.0], [1.0])
    log.close()
    with pytest.raises(RuntimeError, match="closed"):
        log.log_iteration(make_iteration(0))


KILLED_WHILE_CREATING = textwrap.dedent(
    """
    import os, signal, sys
    from hpcopt.log.runlog import RunLog

    # Killed after the header is complete but before it gets its name: the worst moment.
    RunLog._move_into_place = lambda self, temporary: os.kill(os.getpid(), signal.SIGKILL)
    RunLog(sys.argv[1], overwrite=True).open({"optimizer": "sgd"})
    """
)


@pytest.mark.timeout(60)
def test_a_writer_killed_while_creating_the_log_leaves_no_file_at_its_path(tmp_path: Path) -> None:
    path = tmp_path / "r.h5"
    writer = start_writer(KILLED_WHILE_CREATING, path)
    assert writer.wait(timeout=50) == -signal.SIGKILL
    (leftover,) = tmp_path.iterdir()
    assert leftover.name == f"r.h5.tmp-{writer.pid}"  # never at r.h5, which a rerun may use at once
    # The next writer of r.h5 takes its lock, which clears the dead job's temporary file.
    from hpcopt.log.lock import WriterLocks

    with WriterLocks() as locks, RunLog(path) as log:
        locks.acquire(str(path), "run log")
        log.open(ATTRIBUTES)
    assert sorted(item.name for item in tmp_path.iterdir()) == ["r.h5"]
    assert load_run(path).status == "completed"


@pytest.mark.timeout(60)
def test_a_failure_while_creating_keeps_the_previous_log_whole(tmp_path: Path) -> None:
    path = tmp_path / "r.h5"
    with RunLog(path) as log:
        log.open(ATTRIBUTES)
        log.log_iteration(make_iteration(1))
    with pytest.raises(ValueError, match="invalid metric name"):
        RunLog(path, overwrite=True).open(ATTRIBUTES, metric_names=["a/b"])  # fails mid-header
    assert sorted(item.name for item in tmp_path.iterdir()) == ["r.h5"]
    run = load_run(path)
    assert run.status == "completed" and run.iterations["step"].tolist() == [1]
