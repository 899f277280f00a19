"""Every problem's defaults for ``hpcopt train`` (``train_defaults``): declared, applied, overridden, and training.

The full-length runs behind the defaults take up to two minutes each and are
measured by hand (docs/problems.md, "Defaults for train"); here each problem's
defaults run in a shortened form (``--max-steps``), through the command line as a
user types it, and the run log must record the effective values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hpcopt import cli
from hpcopt.analysis.tables import load_run
from hpcopt.cli.main import _train_options, build_parser
from hpcopt.config import build_config
from hpcopt.optimizers import make_config
from hpcopt.problems import PROBLEM_OPTIONS, PROBLEMS, make_problem
from hpcopt.problems.base import ProblemOptions
from hpcopt.problems.defaults import TrainingDefaults
from hpcopt.problems.pinn import APTS_D_GAUSS_NEWTON, APTS_IP_GAUSS_NEWTON
from hpcopt.training.config import TrainConfig
from tests.conftest import datasets_dir

PINNS = ("poisson1d", "poisson2d", "poisson3d", "allen-cahn", "allen-cahn-time")
SYNTHETIC = ("quadratic", "logistic")
#: Problems that read files: the folder under the datasets directory that --data-dir names.
DATA = {"mnist": "mnist", "tinyshakespeare": "tinyshakespeare"}
#: Steps of the shortened runs: enough for every small problem's metric to move from the initial one.
SHORT_STEPS = {"allen-cahn-time": 3, "mnist": 3, "tinyshakespeare": 2}


def _data_args(name: str) -> list[str]:
    if name not in DATA:
        return []
    path = datasets_dir() / DATA[name]
    if not path.exists():
        pytest.skip(f"{name}: no data at {path}; set HPCOPT_DATA_DIR to the directory holding {DATA[name]}/")
    return ["--data-dir", str(path)]


def _resolve(*argv: str) -> tuple[TrainConfig, dict[str, Any], dict[str, Any]]:
    """What ``hpcopt train ARGV`` runs with: the train config, optimizer and problem options."""
    return _train_options(build_parser().parse_args(["train", *argv]))


def _defaults(name: str) -> TrainingDefaults:
    return PROBLEM_OPTIONS[name].train_defaults


def _train_part(defaults: TrainingDefaults) -> tuple[int, int, float | None, float | None]:
    return defaults.epochs, defaults.eval_every, defaults.target, defaults.time_limit


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_every_problem_declares_its_own_defaults(name: str) -> None:
    defaults = _defaults(name)
    assert isinstance(defaults, TrainingDefaults)
    assert defaults is not ProblemOptions.train_defaults, f"{name} declares no defaults of its own"
    # Every optimizer a default names exists and accepts the options given for it.
    for optimizer, options in defaults.optimizer_options.items():
        make_config(optimizer, options)
    if name in PINNS:
        # The run stops when the answer is good (and says so), within two minutes in any case.
        assert defaults.target is not None and defaults.target <= 1e-2
        assert defaults.time_limit is not None and defaults.time_limit <= 120
        assert defaults.epochs * defaults.eval_every > 100  # a generous cap, not the stopping rule


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_train_resolves_the_problems_defaults(name: str) -> None:
    defaults = _defaults(name)
    cfg, optimizer_options, problem_options = _resolve("--problem", name)
    assert (cfg.epochs, cfg.eval_every, cfg.target, cfg.time_limit) == _train_part(defaults)
    assert cfg.batch_size is None  # the problem resolves it against its training set
    assert optimizer_options == dict(defaults.optimizer_options.get(cfg.optimizer, {}))
    assert problem_options == {}


def test_a_flag_beats_the_problems_default() -> None:
    defaults = _defaults("poisson1d")
    cfg, optimizer_options, _ = _resolve(
        "--problem", "poisson1d", "--epochs", "7", "--target", "0.5", "--eval-every", "2", "--time-limit", "9"
    )
    assert (cfg.epochs, cfg.target, cfg.eval_every, cfg.time_limit) == (7, 0.5, 2, 9.0)
    assert (defaults.epochs, defaults.target, defaults.eval_every, defaults.time_limit) != (7, 0.5, 2, 9.0)
    assert optimizer_options == dict(defaults.optimizer_options["apts-d"])


def test_the_default_time_limit_comes_only_with_the_default_epochs() -> None:
    # It bounds the default epochs; whoever asks for epochs gets them (and the default target).
    defaults = _defaults("poisson2d")
    cfg, _, _ = _resolve("--problem", "poisson2d", "--epochs", "3")
    assert (cfg.epochs, cfg.time_limit, cfg.target) == (3, None, defaults.target)
    cfg, _, _ = _resolve("--problem", "poisson2d", "--epochs", "3", "--time-limit", "5")
    assert cfg.time_limit == 5.0
    cfg, _, _ = _resolve("--problem", "poisson2d", "--max-steps", "3")
    assert (cfg.epochs, cfg.time_limit) == (defaults.epochs, defaults.time_limit)


def test_the_config_file_beats_the_problems_default_and_a_flag_beats_the_file(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        'problem = "poisson1d"\nepochs = 7\ntime-limit = 30\n[apts-d]\ncurvature = "hessian"\nmax-cg-iterations = 9\n'
    )
    defaults = _defaults("poisson1d")
    cfg, optimizer_options, _ = _resolve("--config", str(config), "--time-limit", "40")
    assert (cfg.epochs, cfg.time_limit, cfg.target) == (7, 40.0, defaults.target)
    built = make_config("apts-d", optimizer_options)
    assert (built.curvature, built.max_cg_iterations) == ("hessian", 9)  # the file's, spelled with dashes
    assert built.global_solver == defaults.optimizer_options["apts-d"]["global_solver"]  # a default the file left


def test_set_beats_the_problems_optimizer_defaults() -> None:
    cfg, optimizer_options, _ = _resolve("--problem", "poisson2d", "--set", "global_passes=1", "--set", "radius=0.5")
    built = make_config(cfg.optimizer, optimizer_options)
    defaults = _defaults("poisson2d").optimizer_options["apts-d"]
    assert (built.global_passes, built.radius) == (1, 0.5)
    assert (built.curvature, built.global_solver) == (defaults["curvature"], defaults["global_solver"])


def test_optimizer_defaults_reach_only_the_optimizer_they_name() -> None:
    assert set(_defaults("poisson2d").optimizer_options) == {"apts-d", "apts-p", "apts-ip"}
    for optimizer in ("sgd", "hf"):
        cfg, optimizer_options, _ = _resolve("--problem", "poisson2d", "--optimizer", optimizer)
        assert optimizer_options == {}, optimizer
        make_config(cfg.optimizer, optimizer_options)
    # APTS-P gets the Gauss–Newton passes of APTS-D, which its config accepts.
    cfg, optimizer_options, _ = _resolve("--problem", "poisson2d", "--optimizer", "apts-p")
    assert optimizer_options == dict(APTS_D_GAUSS_NEWTON)
    assert make_config("apts-p", optimizer_options).global_solver == "steihaug"
    # APTS-IP gets its own pipelined Gauss–Newton passes, which its config accepts.
    cfg, optimizer_options, _ = _resolve("--problem", "poisson2d", "--optimizer", "apts-ip")
    assert optimizer_options == dict(APTS_IP_GAUSS_NEWTON)
    assert make_config(cfg.optimizer, optimizer_options).global_passes == 2
    # The train defaults (epochs, target, ...) are the problem's whatever the optimizer.
    cfg, _, _ = _resolve("--problem", "poisson2d", "--optimizer", "sgd")
    assert (cfg.epochs, cfg.eval_every, cfg.target, cfg.time_limit) == _train_part(_defaults("poisson2d"))


def test_train_config_alone_keeps_its_own_defaults() -> None:
    # A TrainConfig built in code is what it says: the problems' defaults are the command line's.
    cfg = build_config(TrainConfig, {"problem": "poisson1d"}, what="train")
    assert (cfg.epochs, cfg.target, cfg.time_limit) == (10, None, None)


def _initial_metric(name: str, data_dir: str | None) -> float:
    """The validation metric of the untrained model that ``hpcopt train`` starts from (seed 0)."""
    problem = make_problem(name, data_dir=data_dir, seed=0)
    torch.manual_seed(0)
    model = problem.build_model()
    return problem.eval_metrics(problem.eval_sums(model, problem.val))[problem.metric_name]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_shortened_default_run_records_the_defaults_and_improves(name: str, tmp_path: Path) -> None:
    data = _data_args(name)
    defaults = _defaults(name)
    out = tmp_path / "run.h5"
    steps = SHORT_STEPS.get(name, 5)
    argv = ["train", "--problem", name, *data, "--threads", "1", "--max-steps", str(steps), "--out", str(out)]
    assert cli.main([*argv, "--quiet"]) == 0
    run = load_run(out)
    config = json.loads(str(run.attributes["config_json"]))
    assert (config["train"]["epochs"], config["train"]["eval_every"]) == (defaults.epochs, defaults.eval_every)
    assert (config["train"]["target"], config["train"]["time_limit"]) == (defaults.target, defaults.time_limit)
    problem = make_problem(name, data_dir=data[1] if data else None)
    # The effective batch size, not None: the declared default, capped at the training set.
    assert config["train"]["batch_size"] == run.attributes["batch_size"] == defaults.batch_for(len(problem.train))
    for key, value in defaults.optimizer_options.get("apts-d", {}).items():
        assert config["optimizer"][key] == value, key
    assert len(run.iterations["loss"]) == steps
    losses = run.iterations["loss"]
    if name in PINNS:
        # A few Gauss-Newton steps lower the residual loss; the relative L2 error of a PINN
        # often rises before it falls, so the error is judged by the full default runs
        # (docs/problems.md), not by five steps.
        assert losses[-1] < losses[0], (losses[0], losses[-1])
    elif name in SYNTHETIC:
        final = float(run.evaluations[problem.metric_name][-1])
        initial = _initial_metric(name, None)
        assert (final > initial) if problem.metric_higher_is_better else (final < initial), (initial, final)


def test_a_users_values_reach_the_run_log(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    argv = ["train", "--problem", "poisson1d", "--threads", "1", "--epochs", "2", "--set", "global_passes=1"]
    assert cli.main([*argv, "--out", str(out), "--quiet"]) == 0
    config = json.loads(str(load_run(out).attributes["config_json"]))
    defaults = _defaults("poisson1d")
    assert (config["train"]["epochs"], config["train"]["target"]) == (2, defaults.target)
    assert config["optimizer"]["global_passes"] == 1
    assert config["optimizer"]["curvature"] == defaults.optimizer_options["apts-d"]["curvature"]


def test_reaching_the_target_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # One full-batch step takes quadratic's relative error (about 1 untrained) below 0.99.
    argv = ["train", "--problem", "quadratic", "--threads", "1", "--target", "0.99", "--eval-every", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "stopping after epoch 1 (step 1): target reached: val_rel_error " in out
    assert "<= 0.99" in out and "(target 0.99 reached)" in out
    assert cli.main([*argv[:-4], "--target", "1e-9", "--epochs", "2"]) == 0
    assert "(target 1e-09 NOT reached)" in capsys.readouterr().out
