"""``--time-limit``: checked after every step on the slowest rank's clock, with an evaluation where it stops.

Run at 1, 2 and 4 ranks by ``make test``: every rank must stop at the same step, the
run must not wait for the next scheduled evaluation, and it must evaluate where it stops.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

import hpcopt
from hpcopt.comm import Communicator

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]


@pytest.mark.mpi(min_size=1)
def test_the_time_limit_stops_mid_epoch_with_an_evaluation(tmp_path: Path) -> None:
    comm = Communicator()
    out = comm.bcast_object(str(tmp_path / "limited.h5"))
    limit = 0.2
    # 500 epochs of 20 steps, evaluated only at the end: stopping at an evaluation would
    # mean training all 10 000 steps, far past the limit.
    result = hpcopt.train(
        "logistic",
        optimizer="sgd",
        epochs=500,
        batch_size=40,
        eval_every=500,
        time_limit=limit,
        quiet=True,
        out=out,
        options={"problem.n": 800, "lr": 0.1},
    )
    assert 0 < result.steps < 10_000
    assert all(steps == result.steps for steps in comm.allgather_object(result.steps))
    if comm.is_root:
        with h5py.File(out, "r") as log:
            walls = np.asarray(log["iterations/wall_time"])
            evaluations = np.asarray(log["evaluations/wall_time"])
        assert len(walls) == result.steps
        # The step before the last ended within the limit, the last one past it (clocks of
        # other ranks may be slower, so the last is at or past it on rank 0 only up to them).
        assert walls[-2] < limit
        assert len(evaluations) == 1 and evaluations[0] >= walls[-1]
    assert np.isfinite(result.metrics["val_loss"])
