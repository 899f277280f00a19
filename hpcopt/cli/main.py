"""``hpcopt`` command line: ``train``, ``analyze`` and ``jobs``.

Errors a user can cause end with one line, ``hpcopt: error: …``, on every rank and
exit status 2; the traceback of anything else is kept, because that is a bug.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from hpcopt.errors import AbortError, HpcoptError

EXIT_USAGE = 2
EXIT_ABORT = 3


def _train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a model with a distributed optimizer",
        description="Train under MPI: mpiexec -n P python -m mpi4py -m hpcopt train …",
    )
    p.add_argument(
        "--problem",
        help="poisson1d|2d|3d, allen-cahn, allen-cahn-time, mnist, tinyshakespeare, quadratic, logistic "
        "(default poisson2d)",
    )
    p.add_argument("--model", help="model name (default: the problem's)")
    p.add_argument("--optimizer", help="apts-d, apts-p, apts-ip, hf, nlcg, neumann, sgd, adam (default apts-d)")
    p.add_argument("--data-dir", dest="data_dir", help="directory with the dataset files")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int, help="global mini-batch size")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="HDF5 run log to write")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --out file")
    p.add_argument("--threads", type=int, help="torch threads per rank (default 1)")
    p.add_argument("--eval-every", dest="eval_every", type=int, help="evaluate every N epochs")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="stop after N outer iterations")
    p.add_argument("--time-limit", dest="time_limit", type=float, help="stop at the first evaluation after N seconds")
    p.add_argument("--target", type=float, help="stop when the validation metric reaches this value")
    p.add_argument("--quiet", action="store_true", default=None)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="auto (default: cuda if a GPU is seen), cpu, cuda")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, help="write a checkpoint every N steps")
    p.add_argument("--checkpoint", help="checkpoint file (default: the --out path with .ckpt appended)")
    p.add_argument("--resume", help="continue the run saved in this checkpoint (same rank count)")
    p.add_argument(
        "--collective-timeout",
        dest="collective_timeout",
        type=float,
        help="abort the job when a collective waits longer than this many seconds (default 0: no watchdog)",
    )
    p.add_argument("--config", help="TOML file: train options at top level, [OPTIMIZER] and [PROBLEM] option tables")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="optimizer option (e.g. radius=0.5); problem.KEY=VALUE for a problem option",
    )


def _analyze_parser(sub: Any) -> None:
    p = sub.add_parser(
        "analyze",
        help="tabulate run logs; scaling tables, figures and the α–β model for sweeps",
        description="Summary table of run logs; for runs at several rank counts also the scaling table.",
    )
    p.add_argument("runs", nargs="*", help="HDF5 run logs, or directories of them")
    p.add_argument("--csv", help="also write the table as CSV (the scaling table to <stem>-scaling.csv)")
    p.add_argument("--plot", metavar="DIR", help="write PNG figures (curves.png, scaling.png) into DIR")
    p.add_argument("--model", action="store_true", help="α–β model prediction beside the measured scaling")
    p.add_argument("--latency", type=float, help="model network latency in seconds (e.g. 2e-6)")
    p.add_argument("--bandwidth", type=float, help="model network bandwidth in bytes/s (e.g. 25e9)")
    p.add_argument("--algorithm", default="auto", help="allreduce: auto, ring, recursive-doubling, rabenseifner")
    p.add_argument("--model-ranks", dest="model_ranks", help="extra rank counts to predict, e.g. 64,1024")
    p.add_argument("--network", metavar="JSON", help="calibrated network to read (or, with --calibrate, write)")
    p.add_argument("--calibrate", action="store_true", help="time allreduces under mpiexec and fit latency/bandwidth")
    p.add_argument("--calibrate-ranks", dest="calibrate_ranks", type=int, default=2, help="ranks for --calibrate")


def _jobs_parser(sub: Any) -> None:
    p = sub.add_parser("jobs", help="scaling sweeps: render SLURM scripts or run the sweep locally")
    jobs_sub = p.add_subparsers(dest="jobs_command", required=True)
    for name, text in (
        ("render", "write one sbatch script per rank count and submit.sh"),
        ("local", "run the sweep here with mpiexec (same run logs)"),
    ):
        q = jobs_sub.add_parser(name, help=text, description=f"{text}; train arguments go after --")
        q.add_argument("--study", required=True, help="strong (fixed global batch) or weak (fixed batch per rank)")
        q.add_argument("--ranks", required=True, help="rank counts, e.g. 1,2,4,8")
        q.add_argument(
            "--batch-size", dest="batch_size", type=int, required=True, help="strong: global; weak: per rank"
        )
        q.add_argument("--problem")
        q.add_argument("--optimizer")
        q.add_argument("--outdir", required=True, help="scripts, SLURM output and run logs go here")
        q.add_argument("--template", default="cpu", help="cpu or gpu (render)")
        q.add_argument("--ranks-per-node", dest="ranks_per_node", type=int, default=32)
        q.add_argument("--threads", type=int, default=1, help="cores (--cpus-per-task) and torch threads per rank")
        q.add_argument("--time", default="00:30:00", help="SLURM wall-time limit")
        q.add_argument("--sbatch-option", dest="sbatch_options", action="append", default=[], metavar="OPT")
        q.add_argument("--python", help="interpreter of the jobs (default: this one)")
        q.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then extra hpcopt train arguments")


def _run_jobs(args: argparse.Namespace) -> str:
    from hpcopt.jobs.render import SweepSpec, parse_ranks, render_sweep, run_local

    extra = list(args.train_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    spec = SweepSpec(
        study=args.study,
        ranks=parse_ranks(args.ranks),
        batch_size=args.batch_size,
        problem=args.problem,
        optimizer=args.optimizer,
        template=args.template,
        outdir=args.outdir,
        ranks_per_node=args.ranks_per_node,
        threads=args.threads,
        time=args.time,
        train_args=extra,
        sbatch_options=args.sbatch_options,
        python=args.python or sys.executable,
    )
    if args.jobs_command == "render":
        scripts = render_sweep(spec)
        return "\n".join(str(path) for path in scripts)
    from hpcopt.analysis.tables import main_analyze

    logs = run_local(spec)
    return main_analyze([str(path) for path in logs])


def _run_analyze(args: argparse.Namespace) -> str:
    from hpcopt.analysis.perfmodel import Network, calibrate
    from hpcopt.analysis.tables import main_analyze
    from hpcopt.errors import ConfigError

    network = None
    text = ""
    if args.calibrate:
        network, samples = calibrate(args.calibrate_ranks, algorithm=args.algorithm)
        text = f"calibrated on {args.calibrate_ranks} ranks: {network.describe()}\n"
        text += "".join(f"  {int(b):>10d} B  {s * 1e6:9.1f} µs\n" for _, b, s in samples)
        if args.network:
            network.to_json(args.network)
            text += f"wrote {args.network}\n"
        if not args.runs:
            return text.rstrip("\n")
    elif args.latency is not None or args.bandwidth is not None:
        if args.latency is None or args.bandwidth is None:
            raise ConfigError("--latency and --bandwidth go together")
        network = Network(args.latency, args.bandwidth, args.algorithm)
    elif args.network:
        network = Network.from_json(args.network)
    if args.model and network is None:
        raise ConfigError("--model needs a network: --latency and --bandwidth, --network FILE, or --calibrate")
    model_ranks = []
    if args.model_ranks:
        from hpcopt.jobs.render import parse_ranks

        model_ranks = parse_ranks(args.model_ranks)
    return text + main_analyze(
        args.runs,
        csv=args.csv,
        plot=args.plot,
        network=network if args.model else None,
        model_ranks=model_ranks,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcopt", description="MPI-native trust-region and second-order training")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _analyze_parser(sub)
    _jobs_parser(sub)
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
    from hpcopt.training.trainer import TrainConfig

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
        "checkpoint_every",
        "checkpoint",
        "resume",
        "collective_timeout",
        "time_limit",
        "target",
        "quiet",
        "device",
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
            print(_run_analyze(args))
            return 0
        if args.command == "jobs":
            print(_run_jobs(args))
            return 0
        from hpcopt.comm.communicator import Communicator
        from hpcopt.training.trainer import train

        cfg, optimizer_options, problem_options = _train_options(args)
        comm = Communicator()
        try:
            train(cfg, optimizer_options, problem_options, comm=comm)
        except HpcoptError:
            raise
        except Exception as exc:
            # A bug or a fault on this rank only: let rank 0 close its run log as failed
            # before `python -m mpi4py` turns the exception into MPI_Abort (which rank 0's
            # own abort may pre-empt, so the traceback is printed here first).
            if comm.rank != 0 and comm.collective_timeout > 0:
                import traceback

                traceback.print_exc()
            comm.notify_failure(exc)
            raise
        return 0
    except HpcoptError as exc:
        # One write() per line, so the lines of several ranks never interleave.
        sys.stderr.flush()
        os.write(2, f"hpcopt: error: {exc}\n".encode())
        if isinstance(exc, AbortError):
            # Other ranks may be stuck in a collective and would never return.
            from hpcopt.comm.communicator import Communicator

            Communicator().abort(EXIT_ABORT)
        return EXIT_USAGE


def entry_point() -> None:
    sys.exit(main())
