"""``benchmarks/large_batch.py``: every method's options make a valid config; the Neumann variants as documented."""

from __future__ import annotations

from typing import Any

from hpcopt.optimizers import Neumann, make_config
from tests.conftest import benchmark_script


def study_grids(script: Any, methods: list[str], batches: list[int]) -> tuple[list[Any], dict[tuple[str, int], list]]:
    """The 10-epoch study's runs on 60 000 rows, and the sorted rates of each (method, batch)."""
    runs = script.configurations(
        methods, batches, script.LEARNING_RATES, epochs=10, train_size=60000, batch_lrs=script.BATCH_LEARNING_RATES
    )
    grid: dict[tuple[str, int], list] = {}
    for run in runs:
        grid.setdefault((run.method, run.batch), []).append(run.lr)
    return runs, {key: sorted(lrs) for key, lrs in grid.items()}


def test_every_method_builds_a_valid_config_and_neumann_ramp_warms_up_its_whole_burn_in() -> None:
    script = benchmark_script("large_batch")
    methods = list(script.METHODS)
    runs = script.configurations(methods, [15000], script.LEARNING_RATES, epochs=10, train_size=60000)
    by_method = {run.method: run for run in runs}
    assert set(by_method) == set(methods)
    for run in runs:
        make_config(run.optimizer, run.options)  # validates: a bad option fails here, not in a 2-minute run
    start, ramp = by_method["neumann-start"].options, by_method["neumann-ramp"].options
    assert set(start) == {"lr"}  # hpcopt train's defaults, which fill in the schedules
    # ... as the ramp's explicit ones, a 4-step burn-in of 10 % of the 10 epochs, and a ramp over all of it
    resolved = Neumann.resolve_config(make_config("neumann", start), 4, 10)
    shared = ("epoch_steps", "warmup_epochs", "reset_epochs", "beta_rule", "schedule_origin")
    assert {key: getattr(resolved, key) for key in shared} == {key: ramp[key] for key in shared}
    assert (ramp["epoch_steps"], ramp["warmup_epochs"], ramp["ramp_epochs"], ramp["reset_epochs"]) == (4, 1.0, 1.0, 2)
    assert make_config("neumann", ramp).ramp_steps == 4
    assert by_method["neumann"].options["schedule_origin"] == "burn-in"  # the study's figures rerun as measured


def test_the_default_study_runs_neumann_as_hpcopt_does_with_its_own_grid_at_batch_1000() -> None:
    script = benchmark_script("large_batch")
    assert "neumann-start" in script.DEFAULT_METHODS and "neumann" not in script.DEFAULT_METHODS
    assert script.METHODS["neumann-start"] == ("neumann", {})  # the study's Neumann is `hpcopt train`'s
    runs, grid = study_grids(script, ["neumann-start", "adam"], [15000, 1000])
    assert grid[("neumann-start", 15000)] == [0.1, 0.2, 0.3]
    assert grid[("neumann-start", 1000)] == [0.3, 0.4, 0.5]  # that batch's own grid
    assert grid[("adam", 1000)] == grid[("adam", 15000)] == [0.003, 0.01, 0.03]
    # the middle rate of every method runs first within a batch
    assert [(run.method, run.lr) for run in runs if run.batch == 1000][:2] == [("neumann-start", 0.4), ("adam", 0.01)]


def test_the_batch_sweep_moves_neumanns_and_sgds_grids_with_their_best_rates() -> None:
    script = benchmark_script("large_batch")
    runs, grid = study_grids(script, ["neumann-start", "sgd", "adam"], [7500, 4000, 2000])
    # at 7 500 too: seed 0's best of 0.1 / 0.2 / 0.3 was 0.3, and 0.4 beats 0.5 and 0.6
    assert grid[("neumann-start", 2000)] == grid[("neumann-start", 4000)] == grid[("neumann-start", 7500)]
    assert grid[("neumann-start", 7500)] == [0.2, 0.3, 0.4]
    assert all(grid[("sgd", batch)] == [0.01, 0.03, 0.1] for batch in (2000, 4000, 7500))
    assert grid[("adam", 4000)] == [0.003, 0.01, 0.03]
    # 60 000 rows at batch 7 500: 8 steps an epoch, SGD's warm-up 10 % of the 80 steps
    assert {run.options["warmup_steps"] for run in runs if run.method == "sgd" and run.batch == 7500} == {8}
