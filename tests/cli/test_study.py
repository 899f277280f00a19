"""``hpcopt study robustness``: the runs it plans, the errors it gives, and a whole study end to end."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from hpcopt.errors import ConfigError
from hpcopt.jobs import robustness
from hpcopt.jobs.robustness import KNOBS, RobustnessSpec, parse_grid
from hpcopt.optimizers.apts.options import APTSOptions
from tests.conftest import run_hpcopt

pytestmark = pytest.mark.timeout(300)


def test_the_apts_bounds_the_study_widens_are_the_optimizers_defaults() -> None:
    # hpcopt.jobs may not import the optimizers (no torch on a login node), so it repeats them.
    assert (robustness._APTS_RADIUS_MIN, robustness._APTS_RADIUS_MAX) == (
        APTSOptions.radius_min,
        APTSOptions.radius_max,
    )


def test_parse_grid() -> None:
    assert parse_grid("adam=1e-3,0.01") == ("adam", (1e-3, 0.01))
    for bad, message in (
        ("adamw=1", "OPTIMIZER one of"),
        ("adam", "OPTIMIZER one of"),
        ("adam=x", "must be numbers"),
        ("adam=", "one or more finite values > 0"),
        ("adam=0,1", "one or more finite values > 0"),
        ("adam=nan", "one or more finite values > 0"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_grid(bad)


def test_points_name_each_run_and_widen_the_apts_radius_bounds() -> None:
    spec = RobustnessSpec(
        problem="logistic", optimizers=["adam", "apts-d", "hf"], outdir="x", grids={"apts-d": (1e-4, 0.1, 10.0)}
    )
    points = spec.points()
    assert [p.name for p in points[:5]] == [f"adam.lr={v:g}" for v in KNOBS["adam"][1]]
    apts = [p for p in points if p.optimizer == "apts-d"]
    assert [p.set_args() for p in apts] == [
        ["--set", "radius=0.0001", "--set", "radius_min=0.0001"],
        ["--set", "radius=0.1"],
        ["--set", "radius=10", "--set", "radius_max=10"],
    ]
    assert {p.knob for p in points if p.optimizer == "hf"} == {"damping"}
    command = spec.command(apts[0], "mpiexec", Path("x/apts-d.radius=0.0001.h5"))
    assert command[:3] == ["mpiexec", "-n", "1"] and command[-2:] == ["x/apts-d.radius=0.0001.h5", "--overwrite"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"optimizers": ["adamw"]}, "unknown optimizer"),
        ({"optimizers": []}, "unknown optimizer"),
        ({"grids": {"hf": (1.0,)}}, "--grid for hf, which --optimizers does not name"),
        ({"train_args": ["--out", "x.h5"]}, "--out is set by the study"),
        ({"ranks": 0}, "must be >= 1"),
    ],
)
def test_bad_specs_are_refused(changes: dict, message: str) -> None:
    spec = RobustnessSpec(**{"problem": "logistic", "optimizers": ["adam"], "outdir": "x", **changes})
    with pytest.raises(ConfigError, match=message):
        spec.validate()


def test_a_study_runs_each_value_and_draws_the_curve(tmp_path: Path) -> None:
    outdir = tmp_path / "study"
    args = ["study", "robustness", "--problem", "quadratic", "--optimizers", "sgd,apts-d", "--outdir", str(outdir)]
    # sgd at lr 1e30 overflows: a result of the study (a gap in the curve), not an error of the command.
    grids = ["--grid", "sgd=0.1,1e30", "--grid", "apts-d=0.01,1"]
    done = run_hpcopt([*args, *grids, "--", "--epochs", "3"], timeout=280)
    assert done.returncode == 0, done.stderr
    assert "sgd.lr=1e+30: failed (exit 2)" in done.stdout and "apts-d.radius=1: done" in done.stdout
    with open(outdir / "robustness.csv") as handle:
        rows = {(row["optimizer"], float(row["value"])): row for row in csv.DictReader(handle)}
    assert set(rows) == {("sgd", 0.1), ("sgd", 1e30), ("apts-d", 0.01), ("apts-d", 1.0)}
    assert rows[("sgd", 1e30)]["status"] == "failed" and math.isnan(float(rows[("sgd", 1e30)]["final_metric_value"]))
    for key in (("sgd", 0.1), ("apts-d", 0.01), ("apts-d", 1.0)):
        assert rows[key]["status"] == "completed" and rows[key]["metric"] == "val_rel_error"
        assert 0.0 <= float(rows[key]["final_metric_value"]) < 1.0
    # Δ0 = 1 gets further in three epochs than Δ0 = 0.01, whose radius must grow first.
    assert float(rows[("apts-d", 1.0)]["final_metric_value"]) < float(rows[("apts-d", 0.01)]["final_metric_value"])
    assert (outdir / "robustness.png").stat().st_size > 10_000
    assert (outdir / "apts-d.radius=0.01.out").read_text().startswith("$ ")
    # --report-only reads the same logs back and runs nothing.
    again = run_hpcopt([*args, *grids, "--report-only"], timeout=120)
    assert again.returncode == 0, again.stderr
    assert "done" not in again.stdout and "robustness.png" in again.stdout
    with open(outdir / "robustness.csv") as handle:
        assert {(row["optimizer"], float(row["value"])) for row in csv.DictReader(handle)} == set(rows)


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    done = run_hpcopt(
        ["study", "robustness", "--problem", "quadratic", "--optimizers", "adam", "--grid", "hf=1", "--outdir", "x"]
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "hpcopt: error: study robustness: --grid for hf, which --optimizers does not name"
