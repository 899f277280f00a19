"""``hpcopt options``, the docs tables it generates, and the flags of ``hpcopt train`` made from ``TrainConfig``.

The docs check fails when a ``<!-- options: NAME -->`` block in docs/ or README.md
differs from what the dataclasses give: rerun ``make docs`` (or ``hpcopt options
--write-docs docs --write-docs README.md``) after changing an option.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from hpcopt import cli
from hpcopt.cli import option_tables
from hpcopt.cli.main import _train_options, build_parser
from hpcopt.config import build_config, field_docs
from hpcopt.errors import ConfigError
from hpcopt.training.config import TrainConfig
from tests.conftest import REPO

# The train flags as they were written by hand before TrainConfig generated them:
# flag -> (type, choices, switch).  A change here changes the command line users type.
TRAIN_FLAGS: dict[str, tuple[type | None, tuple[str, ...] | None, bool]] = {
    "--problem": (None, None, False),
    "--model": (None, None, False),
    "--optimizer": (None, None, False),
    "--data-dir": (None, None, False),
    "--epochs": (int, None, False),
    "--batch-size": (int, None, False),
    "--seed": (int, None, False),
    "--out": (None, None, False),
    "--overwrite": (None, None, True),
    "--threads": (int, None, False),
    "--heap": (None, ("keep", "release"), False),
    "--eval-every": (int, None, False),
    "--max-steps": (int, None, False),
    "--time-limit": (float, None, False),
    "--target": (float, None, False),
    "--quiet": (None, None, True),
    "--checkpoint-every": (int, None, False),
    "--checkpoint": (None, None, False),
    "--resume": (None, None, False),
    "--collective-timeout": (float, None, False),
    "--device": (None, ("auto", "cpu", "cuda"), False),
    "--progress-every": (int, None, False),
    "--progress-seconds": (float, None, False),
    "--num-workers": (int, None, False),
    "--stop-signal": (None, ("USR1", "USR2", "HUP", "XCPU", "none"), False),
    "--read-ahead": (int, None, False),
}


def _train_subparser() -> argparse.ArgumentParser:
    parser = build_parser()
    (sub,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return sub.choices["train"]


def test_every_option_of_every_optimizer_problem_and_train_has_a_meaning() -> None:
    sets = option_tables.option_sets()
    assert {s.kind for s in sets.values()} == {"optimizer", "problem", "train"}
    undocumented = [
        f"{name}.{row.name}" for name, s in sets.items() for row in option_tables.rows(s.cls) if not row.doc.strip()
    ]
    assert undocumented == []


def test_docs_option_blocks_match_the_dataclasses() -> None:
    paths = [path for path in (REPO / "docs", REPO / "README.md") if path.exists()]
    stale = option_tables.stale_files(paths)
    assert stale == [], f"stale options tables in {stale}: run make docs"


def test_blocks_are_regenerated_and_the_text_around_them_kept(tmp_path: Path) -> None:
    page = tmp_path / "sub" / "page.md"
    page.parent.mkdir()
    page.write_text(
        "# Title\n\nBefore.\n<!-- options: sgd -->\nhand-written, out of date\n<!-- /options -->\nAfter.\n"
        "<!-- options: logistic -->\n<!-- /options -->\n"
    )
    (tmp_path / "notes.txt").write_text("<!-- options: nothing -->\n")  # not markdown: ignored
    assert option_tables.stale_files([tmp_path]) == [page]
    assert option_tables.write_docs([tmp_path]) == [page]
    text = page.read_text()
    assert text.startswith("# Title\n\nBefore.\n<!-- options: sgd -->\n\n| Option | Type | Default | Meaning |\n")
    assert "hand-written" not in text
    assert "| `momentum` | float | `0.0` | heavy-ball momentum coefficient (default 0.0). |" in text
    assert "| `teacher_scale` | float | `2.0` |" in text
    assert text.endswith("\n\n<!-- /options -->\n")
    assert "\n\n<!-- /options -->\nAfter.\n" in text
    assert option_tables.stale_files([page]) == []
    assert option_tables.write_docs([tmp_path]) == []  # idempotent


def test_markers_in_code_fences_are_text() -> None:
    shown = "```text\n<!-- options: apts-d -->\n(generated)\n<!-- /options -->\n```\n"
    nested = "````md\n```\n<!-- options: NAME -->\n````\n"
    assert option_tables.rewrite_blocks(shown + nested) == shown + nested
    after = option_tables.rewrite_blocks(shown + "<!-- options: sgd -->\n<!-- /options -->\n")
    assert after.startswith(shown + "<!-- options: sgd -->\n\n| Option |")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<!-- options: lbfgs -->\n<!-- /options -->\n", "page.md:1: unknown option set 'lbfgs'"),
        ("x\n<!-- options: sgd -->\n", "page.md:2: options block not closed"),
        (
            "<!-- options: sgd -->\n<!-- options: adam -->\n",
            "page.md:2: options block inside the block opened at line 1",
        ),
        ("<!-- /options -->\n", "page.md:1: <!-- /options --> without an opening marker"),
    ],
)
def test_malformed_blocks_are_errors(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "page.md").write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        option_tables.write_docs([tmp_path])


def test_markdown_cells_escape_pipes() -> None:
    table = option_tables.render_markdown(option_tables.lookup("hf"))
    assert r"scale·\|κ\|" in table
    train = option_tables.render_markdown(option_tables.lookup("train"))
    assert r"| `batch_size` | `--batch-size` | int \| None | `None` |" in train


def test_field_docs_follow_the_mro_and_the_google_style() -> None:
    apts_ip = field_docs(option_tables.lookup("apts-ip").cls)
    assert apts_ip["radius"].startswith("initial global trust-region radius")  # from APTSOptions
    assert apts_ip["local_eta1"].startswith("local phase: accept")  # from APTSOptions
    assert "curvature=ggn" not in apts_ip["replicas"]  # the paragraph after the section is not an entry
    assert apts_ip["replicas"].endswith("at least P/R layers with parameters.")

    @dataclasses.dataclass
    class Base:
        """Base.

        Attributes:
            a: the first
                (continued).
            b, c: shared: with a colon.
            e: 1.5.  f: 2/3.
        """

        a: int = 1
        b: int = 2
        c: int = 3
        e: float = 1.5
        f: float = 2 / 3

    @dataclasses.dataclass
    class Child(Base):
        """Child, which redefines ``b``

        Attributes:
            b: the child's own.

        Closing prose: with a colon.
        """

        d: int = 4

    assert field_docs(Child) == {
        "a": "the first (continued).",
        "b": "the child's own.",
        "c": "shared: with a colon.",
        "e": "1.5.",  # two entries on one line
        "f": "2/3.",
    }


def test_options_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["options"]) == 0
    listing = capsys.readouterr().out
    assert "optimizers: apts-d, apts-p, apts-ip" in listing and "poisson2d" in listing and "train" in listing

    assert cli.main(["options", "apts-d"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "apts-d (--optimizer apts-d: --set KEY=VALUE, or the [apts-d] table of a --config file):"
    radius = next(line for line in out if line.split()[0] == "radius")
    assert radius.split()[1:4] == ["float", "0.1", "initial"]
    assert len(out) == 1 + len(dataclasses.fields(option_tables.lookup("apts-d").cls))

    assert cli.main(["options", "train"]) == 0
    assert any(
        line.split()[:4] == ["epochs", "(--epochs)", "int", "10"] for line in capsys.readouterr().out.splitlines()
    )

    assert cli.main(["options", "poisson1d", "--markdown"]) == 0
    markdown = capsys.readouterr().out
    assert markdown.startswith("| Option | Type | Default | Meaning |\n|---|---|---|---|\n| `interior` | int | `200` |")


def test_options_command_errors(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["options", "apts_d"]) == 2
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("hpcopt: error: unknown option set 'apts_d' (choose from apts-d,")
    assert cli.main(["options", "sgd", "--write-docs", str(tmp_path)]) == 2
    assert "give NAME or --write-docs, not both" in capfd.readouterr().err
    assert cli.main(["options", "--write-docs", str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capfd.readouterr().err


def test_write_docs_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "cli.md"
    page.write_text("<!-- options: train -->\n<!-- /options -->\n")
    assert cli.main(["options", "--write-docs", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"rewrote {page}\n"
    assert "| `device` | `--device` | str | `auto` |" in page.read_text()
    assert cli.main(["options", "--write-docs", str(page)]) == 0
    assert capsys.readouterr().out == "options blocks up to date\n"


def test_train_flags_are_generated_from_train_config_unchanged() -> None:
    actions = {action.option_strings[0]: action for action in _train_subparser()._actions if action.option_strings}
    generated = {flag: action for flag, action in actions.items() if flag not in ("-h", "--config", "--set")}
    assert set(generated) == set(TRAIN_FLAGS)
    for flag, (kind, choices, switch) in TRAIN_FLAGS.items():
        action = generated[flag]
        assert action.dest == flag.removeprefix("--").replace("-", "_"), flag
        assert action.default is None, flag  # so that an absent flag leaves the --config value alone
        assert (action.type, action.choices, action.nargs == 0) == (kind, choices, switch), flag
    assert {field.name for field in dataclasses.fields(TrainConfig)} == {a.dest for a in generated.values()}
    assert str(actions["--collective-timeout"].help).startswith("abort the job when a collective waits longer")


def test_flags_beat_the_config_file_and_toml_keys_are_the_field_names(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        'epochs = 3\nquiet = true\nbatch_size = 64\ndevice = "cpu"\n[sgd]\nlr = 0.5\n[logistic]\nn = 40\n'
    )
    args = build_parser().parse_args(
        ["train", "--config", str(config), "--epochs", "5", "--optimizer", "sgd", "--problem", "logistic"]
    )
    cfg, optimizer_options, problem_options = _train_options(args)
    assert (cfg.epochs, cfg.quiet, cfg.batch_size, cfg.device) == (5, True, 64, "cpu")
    assert (optimizer_options, problem_options) == ({"lr": 0.5}, {"n": 40})
    assert build_config(TrainConfig, {"eval-every": "2"}, what="train").eval_every == 2
    with pytest.raises(ConfigError, match=r"unknown train option 'epoch' \(valid: problem, model, optimizer, "):
        build_config(TrainConfig, {"epoch": 3}, what="train")


def test_train_config_is_importable_from_the_trainer() -> None:
    from hpcopt.training import trainer

    assert trainer.TrainConfig is TrainConfig
