"""``--heap``: the setting reaches glibc, a run records it, and bad values are refused.

What ``keep`` saves (time, system time, page faults) and costs (peak memory) is
measured, not asserted: ``benchmarks/heap_cost.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import hpcopt
from hpcopt.config import build_config
from hpcopt.errors import ConfigError
from hpcopt.training.config import TrainConfig
from hpcopt.training.heap import _glibc, set_heap


@pytest.mark.skipif(_glibc() is None, reason="the C library is not glibc: --heap changes nothing")
def test_glibc_accepts_both_settings() -> None:
    try:
        assert set_heap("keep")  # mallopt returned 1 for M_MMAP_MAX and M_TRIM_THRESHOLD
        assert set_heap("release")
    finally:
        set_heap("release")


def test_a_run_records_its_heap_setting(tmp_path: Path) -> None:
    import h5py

    out = tmp_path / "run.h5"
    try:
        hpcopt.train("quadratic", optimizer="sgd", epochs=1, out=out, quiet=True, heap="keep")
    finally:
        set_heap("release")
    with h5py.File(out, "r") as log:
        assert json.loads(log.attrs["config_json"])["train"]["heap"] == "keep"


def test_bad_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="heap mode must be one of keep, release"):
        set_heap("never")
    with pytest.raises(ConfigError, match="--heap must be one of keep, release, got 'never'"):
        build_config(TrainConfig, {"heap": "never"}, what="train")
