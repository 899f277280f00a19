"""What the study scripts share: ``hpcopt train`` jobs, their options, and a column of their logs.

``mnist_apts``, ``large_batch``, ``lm_study`` and ``pinn_study`` each run named
``hpcopt train`` configurations (under ``mpiexec`` for more than one rank, one
thread per rank) and print a table from what the runs wrote.  This module owns the
command line and the launch of such a job, the options every study takes
(``--outdir``, ``--runs``, ``--seed``, ``--report-only``), the study's run-then-report
sequence, and reading a run's log back for its table.  It imports the standard
library, numpy and :mod:`hpcopt.analysis.tables` only.  The scripts import it as
``_common``: running ``python benchmarks/NAME.py`` puts this folder on the path.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hpcopt.analysis.tables import Run, load_run

REPO = Path(__file__).resolve().parents[1]


def dataset_dir(name: str) -> str:
    """Where a dataset is by default: ``$HPCOPT_DATA_DIR/NAME``, else ``shared/datasets/NAME`` beside the repo."""
    return str(Path(os.environ.get("HPCOPT_DATA_DIR", REPO.parent / "shared/datasets")) / name)


def _comma_list(text: str, convert: Callable[[str], Any], what: str) -> list[Any]:
    try:
        return [convert(item) for item in text.split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got '{text}'") from None


# argparse types of comma-separated lists: a bad item is a one-line usage error, not a traceback.
def floats(text: str) -> list[float]:
    """``0.1,0.2`` → ``[0.1, 0.2]``."""
    return _comma_list(text, float, "numbers")


def ints(text: str) -> list[int]:
    """``0,1,2`` → ``[0, 1, 2]``."""
    return _comma_list(text, int, "integers")


def sizes(text: str) -> list[int]:
    """``1e3,1e6`` → ``[1000, 1000000]``: vector lengths, by ``hpcopt calibrate --sizes``'s rule."""
    from hpcopt.comm.calibration import parse_sizes  # here: it brings torch, which the study scripts do not need
    from hpcopt.errors import ConfigError

    try:
        return parse_sizes(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def train_command(ranks: int, *arguments: str) -> list[str]:
    """``python -m mpi4py -m hpcopt train ARGUMENTS`` on ``ranks`` ranks (``mpiexec`` for more than one)."""
    command = [sys.executable, "-m", "mpi4py", "-m", "hpcopt", "train", *arguments]
    if ranks == 1:
        return command
    return [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks), *command]


def set_options(options: Mapping[str, object]) -> list[str]:
    """``--set KEY=VALUE`` for each optimizer option."""
    return [item for key, value in options.items() for item in ("--set", f"{key}={value}")]


def log_arguments(args: argparse.Namespace, name: str, seed: int | None = None) -> list[str]:
    """The seed (``seed``, else ``--seed``) and the run log ``OUTDIR/NAME.h5`` (replaced if present) of run ``name``."""
    seed = args.seed if seed is None else seed
    return ["--seed", str(seed), "--out", str(Path(args.outdir) / f"{name}.h5"), "--overwrite"]


def pyplot(path: Path) -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` after a line saying ``path`` needs matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print(f"no {path.name}: the figure needs matplotlib (pip install 'hpcopt[plot]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_job(command: Sequence[str], **options: Any) -> subprocess.CompletedProcess[Any]:
    """Run a job with one thread per rank, whatever its exit status; ``options`` go to :func:`subprocess.run`."""
    return subprocess.run(list(command), check=False, env={**os.environ, "OMP_NUM_THREADS": "1"}, **options)


#: Runs of this study that exited non-zero; :func:`run_study` exits non-zero after its report if any did.
FAILED: list[str] = []


def launch(name: str, command: Sequence[str]) -> None:
    """Print the ``hpcopt train`` arguments of the run ``name`` and run it; its log says how it went."""
    print(f"== {name}: {' '.join(command[list(command).index('hpcopt') :])}", flush=True)
    if run_job(command).returncode != 0:
        FAILED.append(name)


def study_parser(doc: str, outdir: str, names: Collection[str], what: str = "runs") -> argparse.ArgumentParser:
    """A parser with the options of every study; ``--runs`` chooses among ``names`` (``what`` names them)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--outdir", default=outdir)
    parser.add_argument(
        "--runs", default=",".join(names), help=f"{what}, a comma-separated subset of: {', '.join(names)}"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true")
    return parser


def chosen(
    parser: argparse.ArgumentParser, args: argparse.Namespace, names: Collection[str], what: str = "runs"
) -> list[str]:
    """The names given to ``--runs``; exits through ``parser.error`` on one that is not in ``names``."""
    selected = [name for name in args.runs.split(",") if name]
    unknown = [name for name in selected if name not in names]
    if unknown:
        parser.error(f"unknown {what} {unknown}; choose from {list(names)}")
    return selected


def run_study(
    args: argparse.Namespace, runs: Sequence[Any], launch_run: Callable[[Any], None], report: Callable[[], None]
) -> None:
    """Launch every run (unless ``--report-only``) into ``--outdir``, then report."""
    Path(args.outdir).mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for run in runs:
            launch_run(run)
    report()
    if FAILED:
        # the table still shows what the other runs measured; the exit status says the study is incomplete
        sys.exit(f"{len(FAILED)} run(s) failed: {', '.join(FAILED)}")


def traffic(run: Run) -> float:
    """Bytes moved per outer iteration over 4n (n parameters): n-sized float32 collectives per iteration."""
    return float(np.mean(run.iterations["comm_bytes"])) / (4 * run.integer("num_parameters"))


def evaluated_run(outdir: Path, name: str, metric: str, width: int) -> tuple[Run, np.ndarray] | None:
    """The log ``OUTDIR/NAME.h5`` and its evaluations of ``metric`` (float).

    ``None``, after a table line (``name`` padded to ``width``) that says why, when the
    run left no log or stopped before its first evaluation.
    """
    path = outdir / f"{name}.h5"
    if not path.exists():
        print(f"{name:<{width}} (no run log)")
        return None
    run = load_run(path)
    values = np.asarray(run.evaluations.get(metric, []), dtype=float)
    if len(values) == 0:
        print(f"{name:<{width}} (no evaluation; status {run.status})")
        return None
    return run, values
