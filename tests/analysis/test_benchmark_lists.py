"""The study scripts' comma-separated options: parsed by argparse types, a bad item a one-line usage error."""

from __future__ import annotations

import argparse
import sys

import pytest

from tests.conftest import benchmark_script


def test_list_types_parse_and_reject() -> None:
    common = benchmark_script("_common")
    assert common.floats("0.1,2e-3,") == [0.1, 2e-3]
    assert common.ints("0,1,2") == [0, 1, 2]
    assert common.sizes("1e3,256") == [1000, 256]
    for parse, text in ((common.floats, "0.1,x"), (common.ints, "1e3")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"expected comma-separated .*, got '{text}'"):
            parse(text)
    # sizes follow hpcopt calibrate's rule, counts >= 1 included
    for text, message in (("big", "comma-separated float32 counts"), ("1e3,0", "must all be >= 1")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            common.sizes(text)


def test_large_batch_learning_rates() -> None:
    study = benchmark_script("large_batch")
    assert study.parse_lrs("adam=1e-3:3e-3,neumann-start=0.3") == {"adam": (1e-3, 3e-3), "neumann-start": (0.3,)}
    assert study.parse_lrs("") == {}


@pytest.mark.parametrize(
    ("script", "arguments", "message"),
    [
        ("large_batch", ["--lrs", "adam=x"], "argument --lrs: expected METHOD=LR[:LR...], got 'adam=x'"),
        ("large_batch", ["--lrs", "adm=0.1"], "argument --lrs: unknown method 'adm' in 'adm=0.1'"),
        ("large_batch", ["--seeds", "0,a"], "argument --seeds: expected comma-separated integers, got '0,a'"),
        ("large_batch", ["--batches", "1e3"], "argument --batches: expected comma-separated integers, got '1e3'"),
        ("apts_scaling_accuracy", ["--adam-lrs", "1e-3:3e-3"], "argument --adam-lrs: expected comma-separated numbers"),
        ("apts_scaling_accuracy", ["--ranks", "2,four"], "argument --ranks: expected comma-separated integers"),
        ("neumann_sharpness", ["--lrs", "0.1,q"], "argument --lrs: expected comma-separated numbers, got '0.1,q'"),
        ("neumann_rms", ["--rms-lrs", "q"], "argument --rms-lrs: expected comma-separated numbers, got 'q'"),
    ],
)
def test_a_bad_list_is_a_usage_error(
    script: str,
    arguments: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    module = benchmark_script(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *arguments])
    with pytest.raises(SystemExit) as stopped:
        module.main()
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
