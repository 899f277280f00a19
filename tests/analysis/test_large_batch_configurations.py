"""``benchmarks/large_batch.py``: every method's options make a valid config; the Neumann variants as documented."""

from __future__ import annotations

from hpcopt.optimizers import make_config
from tests.conftest import benchmark_script


def test_every_method_builds_a_valid_config_and_neumann_ramp_warms_up_its_whole_burn_in() -> None:
    script = benchmark_script("large_batch")
    methods = list(script.METHODS)
    runs = script.configurations(methods, [15000], script.LEARNING_RATES, epochs=10, train_size=60000)
    by_method = {run.method: run for run in runs}
    assert set(by_method) == set(methods)
    for run in runs:
        make_config(run.optimizer, run.options)  # validates: a bad option fails here, not in a 2-minute run
    start, ramp = by_method["neumann-start"].options, by_method["neumann-ramp"].options
    assert start["epoch_steps"] == 4 and start["warmup_epochs"] == 1.0 and "ramp_epochs" not in start
    assert ramp == start | {"ramp_epochs": 1.0, "lr": ramp["lr"]}  # the ramp spans the 4-step burn-in
    assert make_config("neumann", ramp).ramp_steps == 4
    assert by_method["neumann"].options["schedule_origin"] == "burn-in"  # the study's figures rerun as measured
