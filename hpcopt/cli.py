"""``hpcopt`` command line: ``train`` and ``analyze``.

Errors a user can cause end with one line, ``hpcopt: error: …``, on every rank and
exit status 2; the traceback of anything else is kept, because that is a bug.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from hpcopt.errors import HpcoptError

EXIT_USAGE = 2


def _train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a model with a distributed optimizer",
        description="Train under MPI: mpiexec -n P python -m mpi4py -m hpcopt train …",
    )
    p.add_argument("--problem", help="poisson1d, poisson2d, mnist, quadratic, logistic (default poisson2d)")
    p.add_argument("--model", help="model name (default: the problem's)")
    p.add_argument("--optimizer", help="apts-d, sgd, adam (default apts-d)")
    p.add_argument("--data-dir", dest="data_dir", help="directory with the dataset files")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int, help="global mini-batch size")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="HDF5 run log to write")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --out file")
    p.add_argument("--threads", type=int, help="torch threads per rank (default 1)")
    p.add_argument("--eval-every", dest="eval_every", type=int, help="evaluate every N epochs")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="stop after N outer iterations")
    p.add_argument("--quiet", action="store_true", default=None)
    p.add_argument("--config", help="TOML file: train options at top level, [OPTIMIZER] and [PROBLEM] option tables")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="optimizer option (e.g. radius=0.5); problem.KEY=VALUE for a problem option",
    )


def _analyze_parser(sub: Any) -> None:
    p = sub.add_parser("analyze", help="tabulate the final metrics of run logs")
    p.add_argument("runs", nargs="+", help="HDF5 run logs")
    p.add_argument("--csv", help="also write the table as CSV")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcopt", description="MPI-native trust-region and second-order training")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _analyze_parser(sub)
    return parser


def _train_options(args: argparse.Namespace) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Merge the TOML file, the command line and ``--set`` (later wins).

    The TOML file holds train options at top level and one table per optimizer or
    problem (``[apts-d]``, ``[sgd]``, ``[poisson2d]``, …); the tables of the chosen
    optimizer and problem apply, so one file can serve a comparison of optimizers.
    """
    from hpcopt.config import build_config, load_toml, parse_set
    from hpcopt.errors import ConfigError
    from hpcopt.optimizers import OPTIMIZERS, RESERVED
    from hpcopt.problems import PROBLEMS
    from hpcopt.train import TrainConfig

    file_values: dict[str, Any] = load_toml(args.config) if args.config else {}
    sections = {key: value for key, value in file_values.items() if isinstance(value, dict)}
    train_values = {key: value for key, value in file_values.items() if key not in sections}
    for name in sections:
        if name not in OPTIMIZERS and name not in RESERVED and name not in PROBLEMS:
            raise ConfigError(
                f"config file {args.config}: table [{name}] names no optimizer or problem "
                f"(optimizers: {', '.join(OPTIMIZERS)}; problems: {', '.join(PROBLEMS)})"
            )
    for name in (
        "problem",
        "model",
        "optimizer",
        "data_dir",
        "epochs",
        "batch_size",
        "seed",
        "out",
        "overwrite",
        "threads",
        "eval_every",
        "max_steps",
        "quiet",
    ):
        value = getattr(args, name)
        if value is not None:
            train_values[name] = value
    cfg = build_config(TrainConfig, train_values, what="train")
    optimizer_options = dict(sections.get(cfg.optimizer, {}))
    problem_options = dict(sections.get(cfg.problem, {}))
    for key, value in parse_set(args.set).items():
        if key.startswith("problem."):
            problem_options[key.removeprefix("problem.")] = value
        else:
            optimizer_options[key] = value
    return cfg, optimizer_options, problem_options


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "analyze":
            from hpcopt.analysis import main_analyze

            print(main_analyze(args.runs, csv=args.csv))
            return 0
        from hpcopt.train import train

        cfg, optimizer_options, problem_options = _train_options(args)
        train(cfg, optimizer_options, problem_options)
        return 0
    except HpcoptError as exc:
        # One write() per line, so the lines of several ranks never interleave.
        sys.stderr.flush()
        os.write(2, f"hpcopt: error: {exc}\n".encode())
        return EXIT_USAGE


def entry_point() -> None:
    sys.exit(main())
