"""``hpcopt`` command line: ``train``, ``analyze``, ``jobs``, ``study``, ``calibrate``, ``options`` and ``info``.

Errors a user can cause end with one line, ``hpcopt: error: …``, on every rank and
exit status 2; the traceback of anything else is kept, because that is a bug.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hpcopt
from hpcopt.cli.flags import add_flags, flag_values
from hpcopt.cli.option_tables import add_options_parser, run_options
from hpcopt.errors import AbortError, HpcoptError
from hpcopt.training.config import TrainConfig
from hpcopt.training.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED, caught_early, exit_code

EXIT_USAGE = 2
EXIT_ABORT = 3
# The exit statuses of `hpcopt train` (docs/reliability.md has the table).
_TRAIN_EXIT_STATUS = """exit status:
  0    completed
  2    bad input: one "hpcopt: error: ..." line per rank, nothing written
  3    aborted: a rank failed or stalled (--collective-timeout); run log "failed"
  75   preempted by SIGTERM or --stop-signal: checkpoint written (--checkpoint),
       run log "preempted"; continue with --resume CHECKPOINT
  130  interrupted by SIGINT (Ctrl-C): the same, run log "interrupted"
"""
# Seconds between writing an abort's error line and MPI_Abort (see main).
_ABORT_GRACE_SECONDS = 0.5


def _train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a model with a distributed optimizer",
        description="Train under MPI: mpiexec -n P python -m mpi4py -m hpcopt train …",
        epilog=_TRAIN_EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(p, TrainConfig)
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
    p.add_argument(
        "--read-timeout",
        dest="read_timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="give up on a run log that takes longer to read (a damaged file; default 60)",
    )


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
            "--batch-size",
            dest="batch_size",
            type=int,
            help="strong: global; weak: per rank (default: the problem's default batch size)",
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
        q.add_argument(
            "--requeue",
            action="store_true",
            help="render: SIGUSR1 before the time limit, checkpoint, requeue, resume (docs/reliability.md)",
        )
        q.add_argument(
            "--signal-seconds",
            dest="signal_seconds",
            type=int,
            default=120,
            help="with --requeue: seconds before the time limit that SLURM sends SIGUSR1 (default 120)",
        )
        q.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then extra hpcopt train arguments")


def _calibrate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help="time MPI_Allreduce per message size for the α–β model (run under mpiexec)",
        description="Allreduce timings on the ranks at hand: mpiexec -n P python -m mpi4py -m hpcopt calibrate …",
    )
    p.add_argument("--sizes", help="float32 counts per message, e.g. 16,1024,1e6 (default: the model's sweep)")
    p.add_argument("--repeats", type=int, default=20, help="timed allreduces per size (default 20)")
    p.add_argument("--json", metavar="OUT", help="write the [ranks, bytes, seconds] samples here (rank 0)")


def _info_parser(sub: Any) -> None:
    p = sub.add_parser(
        "info",
        help="versions, MPI, rank layout, GPUs and data directories: check a set-up",
        description="Run as the job will: mpiexec -n P python -m mpi4py -m hpcopt info (rank 0 prints)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _run_calibrate(args: argparse.Namespace) -> str:
    """Rank 0's table of the timings (other ranks: ``""``); ``--json`` gets the samples."""
    import json
    from pathlib import Path

    from hpcopt.analysis.perfmodel import DEFAULT_SIZES
    from hpcopt.comm import Communicator, measure_allreduce, parse_sizes
    from hpcopt.errors import ConfigError

    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    sizes = parse_sizes(args.sizes) if args.sizes else DEFAULT_SIZES
    comm = Communicator()
    samples = measure_allreduce(sizes, args.repeats, comm)
    if not comm.is_root:
        return ""
    if args.json:
        Path(args.json).write_text(json.dumps(samples))
    return "\n".join(
        f"{ranks:4d} ranks {nbytes:12.0f} B {seconds * 1e6:10.1f} µs" for ranks, nbytes, seconds in samples
    )


def _train_arguments(args: argparse.Namespace) -> list[str]:
    """The ``hpcopt train`` arguments given after ``--`` (``jobs``, ``study``)."""
    extra = list(args.train_args)
    return extra[1:] if extra and extra[0] == "--" else extra


def _study_parser(sub: Any) -> None:
    p = sub.add_parser("study", help="studies made of many runs: robustness to each optimizer's tuning knob")
    study_sub = p.add_subparsers(dest="study_command", required=True)
    q = study_sub.add_parser(
        "robustness",
        help="each optimizer over a grid of its one tuning knob (lr, Δ₀, damping); one figure",
        description=(
            "Run each optimizer over a grid of its tuning knob (learning rate of sgd/adam/nlcg/neumann, initial "
            "radius of the APTS variants, damping of hf) with mpiexec, then write robustness.csv and "
            "robustness.png (final metric against the knob) into --outdir. Train arguments go after --."
        ),
    )
    q.add_argument("--problem", required=True, help="built-in problem or plug-in spec (FILE.py:ATTR, MODULE:ATTR)")
    q.add_argument("--optimizers", required=True, help="comma-separated, e.g. adam,apts-d,hf")
    q.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="OPTIMIZER=V1,V2,...",
        help="knob values of one optimizer (default: five decades, see docs/cli.md)",
    )
    q.add_argument("--ranks", type=int, default=1, help="mpiexec -n of every run (default 1)")
    q.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    q.add_argument("--outdir", required=True, help="run logs, their output, robustness.csv and robustness.png")
    q.add_argument("--report-only", dest="report_only", action="store_true", help="read the logs there; run nothing")
    q.add_argument("--python", help="interpreter of the runs (default: this one)")
    q.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then extra hpcopt train arguments")


def _run_study(args: argparse.Namespace) -> str:
    from hpcopt.analysis.robustness import plot_robustness, read_results, robustness_table, write_table
    from hpcopt.analysis.tables import format_table
    from hpcopt.jobs.robustness import RobustnessSpec, parse_grid, run_robustness, study_points

    extra = _train_arguments(args)
    grids = dict(parse_grid(text) for text in args.grid)
    spec = RobustnessSpec(
        problem=args.problem,
        optimizers=[name.strip() for name in args.optimizers.split(",") if name.strip()],
        outdir=args.outdir,
        ranks=args.ranks,
        grids=grids,
        threads=args.threads,
        python=args.python or sys.executable,
        train_args=extra,
    )
    points = study_points(spec)
    if not args.report_only:
        run_robustness(spec)
    results = read_results([(p.optimizer, p.knob, p.value, log) for p, log in points])
    outdir = Path(spec.outdir)
    write_table(results, outdir / "robustness.csv")
    title = f"{spec.problem}, {spec.ranks} rank(s)" + (f", {' '.join(extra)}" if extra else "")
    figure = plot_robustness(results, outdir / "robustness.png", title)
    table = format_table(robustness_table(results))
    return f"{table}\nwrote {outdir / 'robustness.csv'} and {figure}"


def _run_jobs(args: argparse.Namespace) -> str:
    from hpcopt.jobs.local import run_local
    from hpcopt.jobs.render import SweepSpec, parse_ranks, render_sweep

    extra = _train_arguments(args)
    ranks = parse_ranks(args.ranks)
    note = ""
    batch_size = args.batch_size
    if batch_size is None:
        batch_size, problem = _default_sweep_batch(args, extra, ranks)
        per = "global batch" if args.study == "strong" else "batch per rank"
        note = f"{per} {batch_size}: the default of problem {problem} (--batch-size to change it)\n"
    spec = SweepSpec(
        study=args.study,
        ranks=ranks,
        batch_size=batch_size,
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
        requeue=args.requeue,
        signal_seconds=args.signal_seconds,
    )
    if args.jobs_command == "render":
        scripts = render_sweep(spec)
        return note + "\n".join(str(path) for path in scripts)
    from hpcopt.analysis.report import analyze

    logs = run_local(spec)
    return note + analyze([str(path) for path in logs])


def _default_sweep_batch(args: argparse.Namespace, extra: list[str], ranks: list[int]) -> tuple[int, str]:
    """The batch size ``hpcopt train`` takes without ``--batch-size`` for this sweep, and the problem's name.

    The arguments after ``--`` are read as ``hpcopt train`` reads them, because problem
    options (``--set problem.n=…``, ``--config``, ``--data-dir``) change the default; the
    problem is then built here, as each job will build it, and asked for its batch.
    """
    from hpcopt.errors import ConfigError, DataError
    from hpcopt.problems import make_problem

    argv = ["train"]
    if args.problem:
        argv += ["--problem", args.problem]
    if args.optimizer:
        argv += ["--optimizer", args.optimizer]
    cfg, _, problem_options = _train_options(build_parser().parse_args([*argv, *extra]))
    try:
        problem = make_problem(cfg.problem, data_dir=cfg.data_dir, seed=cfg.seed, options=problem_options)
    except DataError as error:
        raise ConfigError(
            f"without --batch-size the sweep takes problem {cfg.problem}'s default batch size, "
            f"but the problem cannot be loaded here: {error}"
        ) from None
    batch = problem.resolve_batch_size()
    # Refused here with the default named, since the user gave no batch to correct.
    uneven = [count for count in ranks if batch % count] if args.study == "strong" else []
    if uneven:
        raise ConfigError(
            f"strong scaling with problem {cfg.problem}'s default global batch of {batch}: {uneven[0]} ranks "
            f"cannot share it equally; give --batch-size (divisible by every rank count)"
        )
    largest = batch * max(ranks) if args.study == "weak" else batch
    if largest > len(problem.train):
        # Fail now, not in every job: the default batch per rank times the ranks exceeds the data.
        raise ConfigError(
            f"weak scaling with problem {cfg.problem}'s default batch of {batch} per rank needs "
            f"{largest} training samples at {max(ranks)} ranks, but the problem has {len(problem.train)}; "
            f"give --batch-size (per rank)"
        )
    return batch, cfg.problem


def _run_analyze(args: argparse.Namespace) -> str:
    from hpcopt.analysis.perfmodel import Network, calibrate
    from hpcopt.analysis.report import analyze
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
    return text + analyze(
        args.runs,
        csv=args.csv,
        plot=args.plot,
        network=network if args.model else None,
        model_ranks=model_ranks,
        read_timeout=args.read_timeout,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcopt", description="MPI-native trust-region and second-order training")
    parser.add_argument("--version", action="version", version=f"hpcopt {hpcopt.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _analyze_parser(sub)
    _jobs_parser(sub)
    _study_parser(sub)
    _calibrate_parser(sub)
    _info_parser(sub)
    add_options_parser(sub)
    return parser


def _train_options(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any], dict[str, Any]]:
    """Merge the TOML file, the command line and ``--set`` (later wins).

    The TOML file holds train options at top level and one table per optimizer or
    problem (``[apts-d]``, ``[sgd]``, ``[poisson2d]``, ``["heat.py:make_problem"]``); the tables of the chosen
    optimizer and problem apply, so one file can serve a comparison of optimizers.
    Last, the problem's ``train_defaults`` fill the train and optimizer options that
    none of the three set (:mod:`hpcopt.problems.defaults`).
    """
    from hpcopt.config import build_config, load_toml, parse_set
    from hpcopt.errors import ConfigError
    from hpcopt.optimizers import OPTIMIZERS, RESERVED
    from hpcopt.problems import PROBLEM_OPTIONS, PROBLEMS
    from hpcopt.problems.defaults import resolve_optimizer_options, resolve_train_values
    from hpcopt.problems.plugin import find_entry_point, is_spec, parse_literal

    file_values: dict[str, Any] = load_toml(args.config) if args.config else {}
    sections = {key: value for key, value in file_values.items() if isinstance(value, dict)}
    train_values = {key: value for key, value in file_values.items() if key not in sections}
    for name in sections:
        plugin = is_spec(name) or find_entry_point(name) is not None  # a table of a plug-in's options
        if name not in OPTIMIZERS and name not in RESERVED and name not in PROBLEMS and not plugin:
            raise ConfigError(
                f"config file {args.config}: table [{name}] names no optimizer or problem "
                f"(optimizers: {', '.join(OPTIMIZERS)}; problems: {', '.join(PROBLEMS)})"
            )
    train_values.update(flag_values(args, TrainConfig))
    # The user's values alone first: they say which problem's defaults apply.
    problem = build_config(TrainConfig, train_values, what="train").problem
    # An unknown problem gets no defaults; building it fails later, on every rank alike.
    defaults = PROBLEM_OPTIONS[problem].train_defaults if problem in PROBLEM_OPTIONS else None
    cfg = build_config(TrainConfig, resolve_train_values(defaults, train_values), what="train")
    optimizer_options = dict(sections.get(cfg.optimizer, {}))
    problem_options = dict(sections.get(cfg.problem, {}))
    for key, value in parse_set(args.set).items():
        if key.startswith("problem."):
            # A built-in problem's options are typed fields; a plug-in's are read as TOML literals.
            problem_options[key.removeprefix("problem.")] = value if cfg.problem in PROBLEMS else parse_literal(value)
        else:
            optimizer_options[key] = value
    return cfg, resolve_optimizer_options(defaults, cfg.optimizer, optimizer_options), problem_options


def _run_train(args: argparse.Namespace) -> int:
    """``hpcopt train``: 0, or the exit status of a graceful stop (75 preempted, 130 interrupted)."""
    from hpcopt.comm import Communicator
    from hpcopt.training.trainer import train

    cfg, optimizer_options, problem_options = _train_options(args)
    comm = Communicator()
    try:
        result = train(cfg, optimizer_options, problem_options, comm=comm)
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
    return exit_code(result.status)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "analyze":
            print(_run_analyze(args))
            return 0
        if args.command == "jobs":
            print(_run_jobs(args))
            return 0
        if args.command == "study":
            print(_run_study(args))
            return 0
        if args.command == "options":
            print(run_options(args))
            return 0
        if args.command == "info":
            from hpcopt.cli.info import run_info

            text = run_info(args.json)
            if text:
                print(text)
            return 0
        if args.command == "calibrate":
            text = _run_calibrate(args)
            if text:
                print(text)
            return 0
        # Before the slow imports: a signal during start-up stops the run after its first
        # step (hpcopt.training.preemption) instead of killing it.
        with caught_early(args.stop_signal or "USR1"):
            return _run_train(args)
    except HpcoptError as exc:
        # One write() per line, so the lines of several ranks never interleave.
        sys.stderr.flush()
        os.write(2, f"hpcopt: error: {exc}\n".encode())
        if isinstance(exc, AbortError):
            # Other ranks may be stuck in a collective and would never return.  The
            # launcher forwards this process's stderr through a pipe that MPI_Abort
            # tears down; without a pause the line above was lost under load (seen in CI).
            import time

            from hpcopt.comm import Communicator

            time.sleep(_ABORT_GRACE_SECONDS)
            Communicator().abort(EXIT_ABORT)
        return EXIT_USAGE


def entry_point() -> None:
    code = main()
    if code in (EXIT_PREEMPTED, EXIT_INTERRUPTED):
        # A graceful stop has closed every file and passed a barrier.  `python -m mpi4py`
        # turns a non-zero SystemExit into MPI_Abort (an "Abort(75)" banner, and MPICH's
        # shared-memory segments left behind for a requeued job with the same job and step
        # id to attach to) unless MPI is already finalized: finalize first.  Then leave
        # through SystemExit, not os._exit: a 4-rank script doing MPI_Finalize then
        # os._exit made the mpich wheel's mpiexec (Hydra 5.0.2) end with status 9,
        # "Killed (signal 9)", in 11 of 20 runs (and a CI run); with SystemExit, 0 of 20.
        from hpcopt.comm.mpi import mpi_module

        mpi_module().Finalize()
    sys.exit(code)
