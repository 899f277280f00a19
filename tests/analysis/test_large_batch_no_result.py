"""``benchmarks/large_batch.py``: a run that left no result (diverged, failed) is shown, not silently dropped."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from hpcopt.analysis.tables import Run
from tests.conftest import benchmark_script


def test_a_seed_without_result_is_named_and_left_out_of_the_mean(tmp_path: Path) -> None:
    study = benchmark_script("large_batch")
    runs = study.configurations(["neumann"], [1000], {"neumann": (0.7,)}, 10, 60000, seeds=(0, 1, 2))
    finished = [
        study.Result(config, Run(path=f"{config.name}.h5"), np.array([90.0, accuracy]), np.array([60, 600]),
                     np.array([6.0, 60.0]), 600, 0.1)
        for config, accuracy in zip(runs[1:], (98.68, 97.98), strict=True)
    ]  # fmt: skip
    (summary,) = study.seed_summaries(finished, runs[:1])  # seed 0's run left no result
    assert summary.seeds == [1, 2] and summary.without_result == [0]
    assert summary.accuracies.mean() == pytest.approx(98.33)
    # a seed study's table, CSV and figure come from the same summaries
    study.report_seeds(finished, runs[:1], tmp_path)
    with (tmp_path / "large_batch_seeds.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["seeds"] == "1 2" and row["seeds_without_result"] == "0" and row["mean"] == "98.33"


def test_every_seed_with_a_result_leaves_the_list_empty() -> None:
    study = benchmark_script("large_batch")
    runs = study.configurations(["adam"], [1000], {"adam": (0.01,)}, 10, 60000, seeds=(0, 1))
    finished = [
        study.Result(
            config, Run(path=f"{config.name}.h5"), np.array([99.0]), np.array([600]), np.array([60.0]), 600, 0.1
        )
        for config in runs
    ]
    (summary,) = study.seed_summaries(finished)
    assert summary.without_result == [] and summary.seeds == [0, 1]
