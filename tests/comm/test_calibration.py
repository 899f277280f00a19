"""Allreduce timings for the α–β model: ``measure_allreduce`` and ``hpcopt calibrate``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcopt.comm import Communicator, measure_allreduce, parse_sizes
from hpcopt.errors import ConfigError
from tests.conftest import run_hpcopt

pytestmark = pytest.mark.timeout(60)


def test_parse_sizes_accepts_scientific_notation_and_rejects_the_rest() -> None:
    assert parse_sizes("16,1024,1e6") == [16, 1024, 1_000_000]
    with pytest.raises(ConfigError, match="comma-separated"):
        parse_sizes("16,lots")
    with pytest.raises(ConfigError, match=">= 1"):
        parse_sizes("0,16")


@pytest.mark.mpi(min_size=1)
def test_samples_name_the_ranks_and_bytes_and_leave_the_counters_alone() -> None:
    comm = Communicator()
    before = comm.stats.totals()
    samples = measure_allreduce([4, 1000], repeats=2, comm=comm)
    assert [(ranks, nbytes) for ranks, nbytes, _ in samples] == [(comm.size, 16.0), (comm.size, 4000.0)]
    assert all(seconds >= 0 for _, _, seconds in samples)
    # Every rank reports the slowest rank's median, so the fit sees one number per size.
    assert comm.allgather_object([seconds for _, _, seconds in samples]) == [[s for _, _, s in samples]] * comm.size
    assert comm.stats.totals() == before
    with pytest.raises(ValueError, match="repeats"):
        measure_allreduce([4], repeats=0, comm=comm)


def test_calibrate_command_writes_the_samples(tmp_path: Path) -> None:
    out = tmp_path / "samples.json"
    done = run_hpcopt(["calibrate", "--sizes", "4,256", "--repeats", "2", "--json", str(out)], ranks=2)
    assert done.returncode == 0, done.stderr
    samples = json.loads(out.read_text())
    assert [sample[:2] for sample in samples] == [[2, 16.0], [2, 1024.0]]
    assert done.stdout.count("ranks") == 2  # rank 0's table only


def test_calibrate_command_reports_bad_sizes_in_one_line() -> None:
    done = run_hpcopt(["calibrate", "--sizes", "16,x"])
    assert done.returncode == 2
    assert done.stderr.strip().startswith("hpcopt: error: --sizes must be comma-separated")
    assert "Traceback" not in done.stderr
