"""The option system (:mod:`hpcopt.config`): types, non-finite floats, TOML files."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpcopt.config import build_config, load_toml, nonfinite_field
from hpcopt.errors import ConfigError


@dataclass
class Options:
    """Test options.

    Attributes:
        lr: a learning rate.
        target: an optional target.
        bound: may be infinite.
        iterations: a count.
    """

    lr: float = 0.1
    target: float | None = None
    bound: float = nonfinite_field(math.inf)
    iterations: int = 3


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400", float("inf"), float("nan")])
@pytest.mark.parametrize("key", ["lr", "target"])
def test_a_non_finite_float_is_refused(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^test option '{key}' must be a finite number, got "):
        build_config(Options, {key: value}, what="test")


def test_a_field_may_allow_non_finite_values() -> None:
    assert build_config(Options, {"bound": "inf"}, what="test").bound == math.inf
    assert math.isnan(build_config(Options, {"bound": "nan"}, what="test").bound)
    assert build_config(Options, {"lr": "1e-3", "target": "none"}, what="test").lr == 1e-3


@pytest.mark.parametrize("value", ["1e400", "1e999", "-1e400", "inf", "nan", "1.5e0", float("inf"), 2.5])
def test_an_int_that_is_not_a_finite_whole_number_is_a_type_error(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^option 'iterations': expected int, got "):
        build_config(Options, {"iterations": value}, what="test")


def test_ints_in_exponent_notation_are_exact() -> None:
    assert build_config(Options, {"iterations": "1e3"}, what="test").iterations == 1000
    assert build_config(Options, {"iterations": 4.0}, what="test").iterations == 4


def test_toml_files_that_are_not_text_or_not_files_are_one_line(tmp_path: Path) -> None:
    binary = tmp_path / "binary.toml"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(ConfigError, match=r"binary\.toml is not valid TOML: it is not UTF-8 text$"):
        load_toml(binary)
    with pytest.raises(ConfigError, match=r"is a directory$"):
        load_toml(tmp_path)
    with pytest.raises(ConfigError, match=r"does not exist$"):
        load_toml(tmp_path / "missing.toml")
    text = tmp_path / "epochs.toml"
    text.write_text('epochs = "1e999"\n')
    assert load_toml(text) == {"epochs": "1e999"}  # read as text; TrainConfig refuses it (tests/integration)
