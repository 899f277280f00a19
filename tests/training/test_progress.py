"""Progress within an epoch (``hpcopt.training.progress``): the batch-log lines, the terminal bar, ``--quiet``.

The reporter runs with a fake clock and writes into a ``StringIO``; one 2-rank run of
``hpcopt train`` checks that only rank 0 prints, once per step interval.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

import pytest
from mpi4py import MPI

from hpcopt.comm import Communicator
from hpcopt.errors import ConfigError
from hpcopt.training.config import TrainConfig
from hpcopt.training.progress import Progress, _duration
from hpcopt.training.trainer import train
from tests.conftest import run_hpcopt

pytestmark = pytest.mark.timeout(120)

LINE = re.compile(
    r"^epoch +(\d+)/(\d+)  step (\d+)/(\d+)  (\S+) steps/s  elapsed (\S+)  eta (\S+)  loss (\S+)(?:  radius (\S+))?$"
)


class FakeClock:
    """Seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(progress: Progress, clock: FakeClock, steps: int, seconds_per_step: float, *, epoch: int = 1) -> None:
    progress.start_epoch(epoch, steps)
    for step in range(1, steps + 1):
        clock.now += seconds_per_step
        progress.update(loss=1.0 / step, radius=0.5)
    progress.close()


def _steps_printed(text: str) -> list[int]:
    matches = [LINE.match(line) for line in text.splitlines()]
    assert all(matches), text  # nothing but progress lines
    return [int(m.group(3)) for m in matches if m]


def _number(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in {text!r}"
    return int(found.group(1))


def test_a_line_every_n_steps() -> None:
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(epochs=3, every=4, seconds=0, stream=out, interactive=False, clock=clock)
    _run(progress, clock, steps=10, seconds_per_step=100.0)
    assert _steps_printed(out.getvalue()) == [4, 8]


def test_a_line_every_t_seconds_when_steps_are_not_counted() -> None:
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(epochs=3, every=0, seconds=30, stream=out, interactive=False, clock=clock)
    _run(progress, clock, steps=10, seconds_per_step=7.0)
    # Checked at step boundaries: 28 s is not yet 30, 35 s is; the clock restarts at each line.
    assert _steps_printed(out.getvalue()) == [5, 10]


def test_whichever_comes_first_and_the_clock_counts_from_the_last_line() -> None:
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(epochs=3, every=4, seconds=2.5, stream=out, interactive=False, clock=clock)
    _run(progress, clock, steps=12, seconds_per_step=1.0)
    assert _steps_printed(out.getvalue()) == [3, 4, 7, 8, 11, 12]


def test_a_step_longer_than_t_gives_one_line_per_step_never_more() -> None:
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(epochs=1, every=0, seconds=1, stream=out, interactive=False, clock=clock)
    _run(progress, clock, steps=3, seconds_per_step=50.0)
    assert _steps_printed(out.getvalue()) == [1, 2, 3]


def test_the_line_has_epoch_step_rate_elapsed_eta_loss_and_radius() -> None:
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(epochs=7, every=5, seconds=0, stream=out, interactive=False, clock=clock)
    clock.now = 1000.0  # the epoch's clock starts at start_epoch, not at zero
    progress.start_epoch(3, 20)
    for _ in range(5):
        clock.now += 2.0
        progress.update(loss=0.125, radius=0.75)
    (line,) = out.getvalue().splitlines()
    assert line == "epoch    3/7  step 5/20  0.5 steps/s  elapsed 10.0s  eta 30.0s  loss 1.2500e-01  radius 0.75"
    assert LINE.match(line)


def test_no_radius_for_an_optimizer_without_one() -> None:
    out = io.StringIO()
    progress = Progress(epochs=1, every=1, seconds=0, stream=out, interactive=False, clock=FakeClock())
    progress.start_epoch(1, 2)
    progress.update(loss=0.5)
    progress.update(loss=0.25, radius=math.nan)
    assert [line.endswith("loss 2.5000e-01") for line in out.getvalue().splitlines()] == [False, True]
    assert "radius" not in out.getvalue()


def test_a_resumed_epoch_counts_on_from_the_checkpoint_and_rates_only_this_runs_steps() -> None:
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(epochs=2, every=2, seconds=0, stream=out, interactive=False, clock=clock)
    progress.start_epoch(2, 10, done=6)
    for _ in range(2):
        clock.now += 1.0
        progress.update(loss=1.0, radius=1.0)
    (line,) = out.getvalue().splitlines()
    assert " step 8/10  1 steps/s  elapsed 2.0s  eta 2.0s " in line


@pytest.mark.parametrize("interactive", [False, True])
def test_disabled_prints_nothing(interactive: bool) -> None:
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(enabled=False, epochs=1, every=1, seconds=1, stream=out, interactive=interactive, clock=clock)
    with progress:
        _run(progress, clock, steps=5, seconds_per_step=10.0)
    assert out.getvalue() == ""


def test_on_a_terminal_a_bar_with_loss_and_radius_and_no_lines() -> None:
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(epochs=2, every=1, seconds=1, stream=out, interactive=True, clock=clock, bar_refresh=0)
    progress.start_epoch(1, 10)
    for step in range(1, 4):
        progress.update(loss=0.5 / step, radius=0.25)
    drawn = out.getvalue()
    assert "epoch 1/2" in drawn and "3/10" in drawn and "step/s" in drawn
    assert "loss=1.6667e-01, radius=0.25" in drawn
    assert not any(LINE.match(line) for line in drawn.replace("\r", "\n").splitlines())
    progress.close()
    # leave=False: the bar is wiped at the end of the epoch, so the evaluation line prints on a clean line.
    assert out.getvalue().endswith("\r")


def test_interactive_by_default_when_the_stream_is_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert Progress(epochs=1, stream=Terminal()).interactive
    assert not Progress(epochs=1, stream=io.StringIO()).interactive


def test_a_new_epoch_closes_the_last_ones_bar() -> None:
    out = io.StringIO()
    progress = Progress(epochs=2, stream=out, interactive=True, clock=FakeClock(), bar_refresh=0)
    progress.start_epoch(1, 4)
    first = progress._bar
    progress.start_epoch(2, 4)
    assert first is not None and first.disable  # tqdm marks a closed bar disabled
    progress.close()
    progress.close()  # idempotent


def test_durations() -> None:
    assert [_duration(s) for s in (9.84, 723.0, 3725.0, math.nan)] == ["9.8s", "12m03s", "1h02m", "?"]


@pytest.mark.parametrize(("field", "value"), [("progress_every", -1), ("progress_seconds", -1.0)])
def test_negative_progress_options_are_errors(field: str, value: float) -> None:
    options: dict[str, Any] = {field: value}  # a field of TrainConfig named at run time
    with pytest.raises(ConfigError, match=field.replace("_", "-")):
        TrainConfig(**options).validate()


def test_two_ranks_print_one_line_per_interval_and_quiet_prints_none() -> None:
    # Several steps per epoch; by step count only, so that a slow machine prints the same lines.
    args = ["train", "--problem", "logistic", "--epochs", "2", "--batch-size", "100", "--progress-seconds", "0"]
    run = run_hpcopt([*args, "--progress-every", "3"], ranks=2)
    assert run.returncode == 0, run.stderr
    # Read back rather than assumed: a problem's default --target may end the run after epoch 1.
    per_epoch, epochs = _number(r"(\d+) steps/epoch", run.stdout), _number(r"done: \d+ steps, (\d+) epochs", run.stdout)
    assert per_epoch >= 6 and epochs >= 1
    lines = [LINE.match(line) for line in (run.stdout + run.stderr).splitlines()]
    printed = [(int(m.group(1)), int(m.group(3)), int(m.group(4))) for m in lines if m]
    # Rank 1 prints nothing, so each interval appears exactly once.
    assert printed == [(e, s, per_epoch) for e in range(1, epochs + 1) for s in range(3, per_epoch + 1, 3)]
    assert all(m.group(9) is not None for m in lines if m)  # apts-d has a radius

    quiet = run_hpcopt([*args, "--progress-every", "1", "--quiet"], ranks=2)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and not any(LINE.match(line) for line in quiet.stderr.splitlines())


@pytest.mark.parametrize(("optimizer", "has_radius"), [("apts-d", True), ("sgd", False)])
def test_the_epoch_line_shows_a_radius_only_for_a_trust_region_method(
    optimizer: str, has_radius: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = TrainConfig(problem="logistic", optimizer=optimizer, epochs=1, batch_size=50, progress_every=0)
    train(cfg, {}, {"n": 100, "dim": 4}, comm=Communicator(MPI.COMM_SELF))
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch    1/1")]
    assert ("radius " in line) is has_radius and "nan" not in line
