"""``benchmarks/neumann_sharpness.py --every K --max-steps N``: λ at every K-th step, the same path, N steps."""

from __future__ import annotations

import argparse
import math
import sys

import pytest

from tests.conftest import benchmark_script, mnist_dir


def _args(**changed: object) -> argparse.Namespace:
    options = dict(batch=2000, epochs=2, model="mlp", rows=64, iterations=3, seed=0, cap=0.0, max_steps=0, every=1)
    return argparse.Namespace(**(options | changed))


@pytest.mark.timeout(300)
def test_every_skips_the_estimate_between_its_steps_and_leaves_the_path_alone() -> None:
    from hpcopt.problems.mnist.problem import MnistProblem

    script = benchmark_script("neumann_sharpness")
    problem = MnistProblem(data_dir=str(mnist_dir()))
    full, _ = script.run(0.1, problem, _args(max_steps=6))
    sparse, _ = script.run(0.1, problem, _args(max_steps=6, every=4))
    assert [r.step for r in sparse] == list(range(6))  # stopped after --max-steps
    assert [math.isfinite(r.sharpness) for r in sparse] == [True, False, False, False, True, False]
    assert sparse[0].sharpness == full[0].sharpness and sparse[4].sharpness == full[4].sharpness
    # the estimate only reads the model: the losses and steps are those of the run that estimates every step
    assert [(r.loss, r.step_norm) for r in sparse] == [(r.loss, r.step_norm) for r in full]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--every", "0"], "--every must be >= 1"),
        (["--cap", "0.9", "--every", "2"], "--cap needs λ before every step"),
        (["--max-steps", "-1"], "--max-steps must be >= 0, got -1"),
    ],
)
def test_bad_every_is_a_usage_error(
    arguments: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = benchmark_script("neumann_sharpness")
    monkeypatch.setattr(sys, "argv", ["neumann_sharpness.py", *arguments])
    with pytest.raises(SystemExit) as stopped:
        script.main()
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
