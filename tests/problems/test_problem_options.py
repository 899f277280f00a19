"""Problem options: one dataclass per problem, read by the same machinery as the optimizers' options."""

from __future__ import annotations

import dataclasses

import pytest

from hpcopt.config import field_docs
from hpcopt.errors import ConfigError
from hpcopt.problems import PROBLEM_OPTIONS, PROBLEMS, make_problem
from hpcopt.problems.base import ProblemOptions, build_options
from hpcopt.problems.mnist.problem import MnistOptions
from hpcopt.problems.pinn.allen_cahn import AllenCahnTimeOptions
from hpcopt.problems.pinn.poisson import PoissonProblem, poisson_options
from hpcopt.problems.synthetic import QuadraticProblem


def test_every_problem_has_an_options_dataclass_naming_it() -> None:
    assert list(PROBLEM_OPTIONS) == list(PROBLEMS)
    for name, cls in PROBLEM_OPTIONS.items():
        assert dataclasses.is_dataclass(cls) and issubclass(cls, ProblemOptions)
        assert cls.problem == name
        assert set(field_docs(cls)) == {field.name for field in dataclasses.fields(cls)}, name


def test_defaults_depend_on_the_dimension_of_poisson() -> None:
    sizes = {f"poisson{d}d": (poisson_options(d)().interior, poisson_options(d)().boundary) for d in (1, 2, 3)}
    assert sizes["poisson1d"] == (200, 2) and sizes["poisson2d"] == (2000, 400) and sizes["poisson3d"] == (4000, 600)
    four = poisson_options(4)
    assert (four.problem, four().boundary, four().val_grid) == ("poisson4d", 800, 21)
    problem = PoissonProblem(dim=4, options={"interior": 3, "val_grid": 2})
    assert len(problem.train) == 3 + 800
    with pytest.raises(ConfigError, match=r"problem 'poisson4d' option depth=0: must be >= 1"):
        PoissonProblem(dim=4, options={"depth": 0})


def test_defaults_are_what_the_problems_build() -> None:
    problem = make_problem("poisson2d", options={"val_grid": 3})
    assert isinstance(problem, PoissonProblem)
    assert len(problem.train) == 2000 + 400 and problem.width == 32 and problem.depth == 3
    quadratic = make_problem("quadratic")
    assert isinstance(quadratic, QuadraticProblem)
    assert (len(quadratic.train), len(quadratic.val), quadratic.dim) == (1000, 500, 20)


def test_values_are_read_with_the_option_type() -> None:
    options = build_options(AllenCahnTimeOptions, {"interior": "12", "final-time": "0.5", "diffusion": 1})
    assert (options.interior, options.final_time, options.diffusion) == (12, 0.5, 1.0)
    assert isinstance(options.diffusion, float)
    assert build_options(MnistOptions, None).limit is None
    assert build_options(MnistOptions, {"limit": "none"}).limit is None
    assert build_options(MnistOptions, {"limit": "100"}).limit == 100


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("logistic", {"teacher": 1.0}, "unknown option 'teacher' for problem 'logistic' (choose from n, n_val, dim, "),
        ("mnist", {"limit": 2.5}, "problem 'mnist' option limit=2.5: expected int"),
        ("allen-cahn", {"diffusion": "slow"}, "problem 'allen-cahn' option diffusion='slow': expected float"),
        ("allen-cahn-time", {"final_time": 0.0}, "problem 'allen-cahn-time' option final_time=0.0: must be >= 1e-06"),
        ("tinyshakespeare", {"heads": 0}, "problem 'tinyshakespeare' option heads=0: must be >= 1"),
        ("tinyshakespeare", {"embed": 30}, "problem 'tinyshakespeare': embed=30 is not divisible by heads=4"),
    ],
)
def test_bad_options_are_config_errors_before_any_data_is_read(name: str, options: dict, message: str) -> None:
    # No data_dir: the options must be rejected before MNIST or TinyShakespeare look for files.
    with pytest.raises(ConfigError) as info:
        make_problem(name, options=options)
    assert str(info.value).startswith(message)


def test_synthetic_problems_keep_their_resolved_options_as_a_dict() -> None:
    # Checkpoints record this dict to refuse resuming on other data; its content must not change.
    problem = make_problem("quadratic", options={"n": "40"})
    assert isinstance(problem, QuadraticProblem)
    assert problem.options == {"n": 40, "n_val": 500, "dim": 20, "noise": 0.1}
