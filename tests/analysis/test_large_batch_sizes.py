"""``benchmarks/large_batch.py`` over three or more batches: each method's best against the batch size."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import benchmark_script


def result(script: Any, method: str, batch: int, lr: float, final: float, seed: int = 0) -> Any:
    config = script.Config(f"{method}.b{batch}.lr{lr:g}", method, batch, lr, method, {"lr": lr}, seed)
    accuracy = np.array([50.0, final])
    steps = 600_000 // batch
    # the run log is not read by the batch-size report; the steps and the accuracies are
    return script.Result(config, None, accuracy, np.array([steps // 2, steps]), np.array([1.0, 2.0]), steps, 0.1)


def test_each_method_at_each_batch_against_adams_best(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = benchmark_script("large_batch")
    finals = {
        ("adam", 1000): 99.08,
        ("adam", 4000): 98.50,
        ("adam", 15000): 97.35,
        ("neumann-start", 1000): 98.80,
        ("neumann-start", 4000): 97.00,
        ("neumann-start", 15000): 92.10,
        ("sgd", 4000): 96.00,  # a method without every batch ...
        ("sgd", 15000): 76.77,  # ... and with a gap below the figure's floor, named at its foot
    }
    best = {key: result(script, key[0], key[1], 0.1, final) for key, final in finals.items()}
    table = script.by_batch_size(best)
    assert table["neumann-start"][15000] == pytest.approx((92.10, 92.10 - 97.35))
    assert table["adam"][4000] == (98.50, 0.0)
    assert set(table["sgd"]) == {4000, 15000}

    script.report_batch_sizes(best, tmp_path)
    printed = capsys.readouterr().out
    assert "92.10 (-5.25)" in printed and "76.77 (-20.58)" in printed  # the table names the gap to Adam
    with (tmp_path / "large_batch_sizes.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(finals)
    neumann = {int(row["batch"]): row for row in rows if row["method"] == "neumann-start"}
    assert neumann[15000]["steps"] == "40" and neumann[1000]["steps"] == "600"
    assert float(neumann[4000]["minus_adam_best"]) == pytest.approx(-1.50)
    assert (tmp_path / "large_batch_sizes.png").stat().st_size > 0


def test_a_batch_without_adam_has_no_gap() -> None:
    script = benchmark_script("large_batch")
    best = {("neumann-start", 2000): result(script, "neumann-start", 2000, 0.3, 98.0)}
    final, gap = script.by_batch_size(best)["neumann-start"][2000]
    assert final == 98.0 and math.isnan(gap)


def test_the_sweep_over_seeds_takes_each_seeds_best_against_adam_on_that_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = benchmark_script("large_batch")
    finals = {  # (method, batch, lr, seed): final %
        ("adam", 1000, 0.01, 0): 99.0,
        ("adam", 1000, 0.01, 1): 98.0,
        ("adam", 15000, 0.01, 0): 97.0,
        ("adam", 15000, 0.03, 0): 97.5,  # Adam's best on seed 0 is its other rate
        ("adam", 15000, 0.01, 1): 96.0,
        ("neumann-start", 1000, 0.3, 0): 98.5,
        ("neumann-start", 1000, 0.3, 1): 97.0,
        ("neumann-start", 1000, 0.4, 1): 97.9,  # seed 1's best rate is not seed 0's
        ("neumann-start", 15000, 0.2, 0): 90.0,
        ("neumann-start", 15000, 0.2, 1): 84.0,  # 12 points behind: below the figure's floor
        ("neumann-start", 4000, 0.2, 1): 95.0,  # a batch with one seed and no Adam
    }
    results = [result(script, m, b, lr, final, seed) for (m, b, lr, seed), final in finals.items()]
    tables = script.seed_batch_tables({seed: script.best_per_method(results, seed) for seed in (0, 1)})
    assert tables[0]["neumann-start"][15000] == pytest.approx((90.0, -7.5))
    assert tables[1]["neumann-start"][1000] == pytest.approx((97.9, -0.1))
    mean, ran = script.mean_batch_table(tables)
    assert mean["neumann-start"][1000] == pytest.approx(((98.5 + 97.9) / 2, (-0.5 - 0.1) / 2))
    assert mean["neumann-start"][15000] == pytest.approx((87.0, (-7.5 - 12.0) / 2))
    assert ran[("neumann-start", 4000)] == [1]
    assert mean["neumann-start"][4000][0] == 95.0 and math.isnan(mean["neumann-start"][4000][1])

    script.report_batch_sizes_over_seeds(results, (0, 1), tmp_path)
    printed = capsys.readouterr().out
    assert "-9.75 (-12.00, -7.50) [2]" in printed  # the mean gap, its lowest and highest, and the seeds
    with (tmp_path / "large_batch_sizes_seeds.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9  # one per method, batch and seed with a result
    seed1 = {(row["method"], row["batch"]): row for row in rows if row["seed"] == "1"}
    assert seed1[("neumann-start", "1000")]["lr"] == "0.4"
    assert float(seed1[("neumann-start", "15000")]["minus_adam_best"]) == pytest.approx(-12.0)
    assert (tmp_path / "large_batch_sizes_seeds.png").stat().st_size > 0
