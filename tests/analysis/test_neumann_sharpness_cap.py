"""``benchmarks/neumann_sharpness.py --cap``: every step's rate lowered to the asked ratio, and no further."""

from __future__ import annotations

import argparse
import math

import pytest

from tests.conftest import benchmark_script, mnist_dir


@pytest.mark.timeout(300)
def test_the_cap_holds_every_moving_step_at_the_ratio_and_leaves_low_ones_alone() -> None:
    from hpcopt.problems.mnist.problem import MnistProblem

    script = benchmark_script("neumann_sharpness")
    problem = MnistProblem(data_dir=str(mnist_dir()))
    lr, cap = 0.3, 0.5
    args = argparse.Namespace(
        batch=2000, epochs=2, model="cnn-small", rows=64, iterations=3, seed=0, cap=cap, max_steps=0, every=1
    )
    records, accuracy = script.run(lr, problem, args)
    # the burn-in, the reset that ends it and momentum steps: the phase predicted before each
    # step is the one it took (run() asserts it), so the cap was computed for the right bound
    assert {"sgd", "reset", "neumann"} <= {record.phase for record in records}
    moving = [record for record in records if record.phase != "reset"]
    for record in moving:
        assert record.step_lr <= lr
        assert record.ratio <= cap * (1 + 1e-9)
        ratio_at_lr = record.ratio * lr / record.step_lr  # the ratio is linear in the rate
        if ratio_at_lr <= cap:
            assert record.step_lr == lr  # nothing to lower
        else:
            assert record.ratio == pytest.approx(cap, rel=1e-9)  # lowered exactly to the cap
    assert any(record.step_lr < lr for record in moving) and any(record.step_lr == lr for record in moving)
    assert math.isfinite(accuracy) and 0 <= accuracy <= 100
