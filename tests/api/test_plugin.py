"""Plug-in problems: ``--problem MODULE:ATTR``, ``--problem FILE.py:ATTR``, entry points, TOML tables.

Resolution is tested in one process (every way it can fail is one ``ConfigError``
naming the spec); ``hpcopt.train(SPEC)`` shows the same errors on every rank of a
launch; two runs of ``mpiexec -n 2 … hpcopt train`` show the command line end to end:
one trains, writes the spec and the options into the run log and ``hpcopt analyze``
shows them, the other fails with one line per rank and exit status 2.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import h5py
import pytest

import hpcopt
from hpcopt.cli.main import _train_options, build_parser
from hpcopt.comm import Communicator
from hpcopt.errors import ConfigError
from hpcopt.problems import make_problem
from hpcopt.problems.custom import CustomProblem
from hpcopt.problems.plugin import parse_literal
from tests.conftest import run_hpcopt

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_thread")]

PLUGIN = textwrap.dedent(
    '''
    """A plug-in problem for the tests: a linear classifier on seeded blobs."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import hpcopt

    CALLS = []


    def make(seed=0, rows=64, width=3, label="x"):
        CALLS.append({"seed": seed, "rows": rows, "width": width, "label": label})
        generator = torch.Generator().manual_seed(seed)
        inputs = torch.randn(rows, width, generator=generator)
        return hpcopt.problem(lambda: nn.Linear(width, 2), F.cross_entropy, (inputs, (inputs[:, 0] > 0).long()),
                              metric="accuracy", name=f"blobs-{label}")


    def make_anything(**options):
        return make(**{key: value for key, value in options.items() if key != "data_dir"})


    def no_arguments():
        return make()


    class Holder:
        problem = make()


    PROBLEM = make()
    NOT_A_PROBLEM = 3


    def returns_text(seed):
        return "problem"


    def raises(seed):
        raise ValueError("no data for this seed")
    '''
)


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``blobs_plugin.py`` in a temporary folder that is the current directory."""
    path = tmp_path / "blobs_plugin.py"
    path.write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("blobs_plugin", None)
    return path


def test_file_and_module_specs_call_the_factory_with_what_it_takes(plugin: Path) -> None:
    made = make_problem(f"{plugin}:make", seed=7, data_dir="/data", options={"rows": 40, "label": "a"})
    assert isinstance(made, CustomProblem) and len(made.train) == 40 and made.name == "blobs-a"
    module = make_problem("blobs_plugin:make", seed=2)
    assert module.name == "blobs-x"
    import blobs_plugin  # type: ignore[import-not-found]

    assert blobs_plugin.CALLS[-1] == {"seed": 2, "rows": 64, "width": 3, "label": "x"}
    make_problem("blobs_plugin:make_anything", seed=5, data_dir="/d", options={"width": 4})
    assert blobs_plugin.CALLS[-1] == {"seed": 5, "rows": 64, "width": 4, "label": "x"}  # data_dir given, dropped
    make_problem("blobs_plugin:no_arguments", seed=9)  # takes neither seed nor data_dir: called without them
    assert blobs_plugin.CALLS[-1]["seed"] == 0
    assert make_problem("blobs_plugin:Holder.problem").name == "blobs-x"
    assert make_problem("blobs_plugin.py:PROBLEM") is make_problem("blobs_plugin.py:PROBLEM")  # a file loads once


@pytest.mark.parametrize(
    ("spec", "options", "message"),
    [
        ("no_such_module:make", {}, "--problem no_such_module:make: cannot import no_such_module: ModuleNotFoundError"),
        ("missing.py:make", {}, "--problem missing.py:make: no file missing.py"),
        ("blobs_plugin:nothing", {}, "--problem blobs_plugin:nothing: blobs_plugin has no attribute 'nothing'"),
        ("blobs_plugin:Holder.other", {}, "blobs_plugin:Holder.other has no attribute 'other'"),
        ("blobs_plugin:make", {"colour": "red"}, "unknown option 'colour' (its options: label, rows, width)"),
        ("blobs_plugin:PROBLEM", {"rows": 3}, "is a problem, not a factory, so it takes no options (got rows)"),
        ("blobs_plugin:NOT_A_PROBLEM", {}, "is a int, neither a problem nor a callable returning one"),
        ("blobs_plugin:returns_text", {}, "returned a str, not a problem (build one with hpcopt.problem(...))"),
        ("blobs_plugin:raises", {}, "the factory raised ValueError: no data for this seed"),
        ("blobs_plugin:make", {"rows": "many"}, "the factory raised TypeError"),
        ("blobs_plugin:", {}, "expected MODULE:ATTR or path/to/file.py:ATTR"),
        ("nonesuch", {}, "unknown problem 'nonesuch' (choose from mnist, poisson1d"),
    ],
)
def test_every_failure_is_one_error_naming_the_spec(plugin: Path, spec: str, options: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_problem(spec, options=options)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_broken_plug_in_file_is_an_import_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nraise RuntimeError('the data server is down')\n")
    with pytest.raises(ConfigError, match=r"cannot import .*broken.py: RuntimeError: the data server is down"):
        make_problem(f"{broken}:make")
    broken.write_text("def make(:\n")
    with pytest.raises(ConfigError, match="SyntaxError"):
        make_problem(f"{broken}:make")


def test_entry_points_register_names(plugin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "blobs_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: blobs-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[hpcopt.problems]\nblobs = blobs_plugin:make\n")
    assert make_problem("blobs", options={"label": "ep"}).name == "blobs-ep"
    with pytest.raises(ConfigError, match="installed: blobs;"):
        make_problem("nonesuch")


def test_set_values_are_toml_literals() -> None:
    assert parse_literal("3") == 3 and parse_literal("0.5") == 0.5 and parse_literal("true") is True
    assert parse_literal('"3"') == "3" and parse_literal("fast") == "fast" and parse_literal("[1, 2]") == [1, 2]


def test_config_file_names_a_plug_in_and_its_table(plugin: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        'problem = "blobs_plugin.py:make"\nepochs = 2\n["blobs_plugin.py:make"]\nlabel = "toml"\nrows = 32\n'
    )
    args = build_parser().parse_args(
        ["train", "--config", str(config), "--set", "problem.width=4", "--set", "problem.label=7"]
    )
    cfg, _, problem_options = _train_options(args)
    assert cfg.problem == "blobs_plugin.py:make"
    assert problem_options == {"label": 7, "rows": 32, "width": 4}  # --set after the file; literals typed
    builtin = build_parser().parse_args(["train", "--problem", "logistic", "--set", "problem.n=40"])
    assert _train_options(builtin)[2] == {"n": "40"}  # a built-in problem types its own fields


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests/api/no_such_file.py:make", "no file tests/api/no_such_file.py"),
        ("hpcopt.problems:PROBLEMS", "is a dict, neither a problem nor a callable returning one"),
        ("hpcopt.problems.custom:DEFAULT_BATCH_ROWS", "is a int, neither a problem nor a callable"),
    ],
)
def test_a_bad_spec_fails_on_every_rank_before_training(spec: str, message: str) -> None:
    Communicator()  # every rank of the launch
    with pytest.raises(ConfigError, match=message):
        hpcopt.train(spec, quiet=True)


@pytest.mark.timeout(240)
def test_command_line_trains_a_plug_in_and_records_it(plugin: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    spec = f"{plugin}:make"
    args = ["train", "--problem", spec, "--set", "problem.rows=96", "--set", 'problem.label="cli"']
    result = run_hpcopt([*args, "--epochs", "2", "--batch-size", "32", "--out", str(out)], ranks=2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"apts-d on {spec} (model, 8 parameters), 2 rank(s)" in result.stdout
    assert "done: 6 steps, 2 epochs" in result.stdout
    with h5py.File(out, "r") as log:
        assert log.attrs["problem"] == spec
        assert json.loads(log.attrs["problem_options"]) == {"rows": 96, "label": "cli"}
        assert log.attrs["status"] == "completed"
    table = run_hpcopt(["analyze", str(out)], cwd=tmp_path)
    assert table.returncode == 0 and spec in table.stdout


@pytest.mark.timeout(240)
def test_command_line_refuses_a_factory_that_returns_no_problem_on_every_rank(plugin: Path, tmp_path: Path) -> None:
    result = run_hpcopt(["train", "--problem", f"{plugin}:returns_text"], ranks=2, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("hpcopt: error:")]
    assert len(lines) == 2 and all("returned a str, not a problem" in line for line in lines), result.stderr
