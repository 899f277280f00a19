"""MNIST (8 000/2 000 split): APTS-D vs Adam and SGD at equal epochs.

Run: ``python benchmarks/mnist_apts.py --data-dir ../shared/datasets/mnist [--runs NAME,…] [--epochs 10]``

Each configuration is one ``mpiexec -n P python -m mpi4py -m hpcopt train …`` job
writing an HDF5 run log into ``--outdir``; the table is read back from those logs
(``--report-only`` re-prints it without training).  Columns:

* ``acc`` final and best validation accuracy (%), ``t@98.5`` wall time to the
  first evaluation at ≥ 98.5 % (``-`` if never);
* ``s/epoch`` median epoch time; ``traffic`` bytes this rank moved per outer
  iteration over 4n (n = parameters), i.e. n-sized collectives per iteration.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _common
import numpy as np
from apts_scaling_accuracy import SECTION_1

CNN = {"model": "cnn", "batch": 2000}
SMALL = {"model": "cnn-small", "batch": 128}

# name: (optimizer, ranks, model settings, --set options).  The APTS-D runs are §1's set
# (APTS-D's defaults when this table was measured), spelled out.
RUNS: dict[str, tuple[str, int, dict, dict]] = {
    "apts-d.P2": ("apts-d", 2, CNN, dict(SECTION_1)),
    "apts-d.P4": ("apts-d", 4, CNN, dict(SECTION_1)),
    "apts-d.P2.radius0.01": ("apts-d", 2, CNN, {**SECTION_1, "radius": 0.01}),
    "apts-d.P2.radius1.0": ("apts-d", 2, CNN, {**SECTION_1, "radius": 1.0}),
    "apts-d.P2.average": ("apts-d", 2, CNN, {**SECTION_1, "combine": "average"}),
    "apts-d.P2.G0": ("apts-d", 2, CNN, {**SECTION_1, "global_passes": 0}),
    "sgd.P2.cnn.lr0.1": ("sgd", 2, CNN, {"lr": 0.1, "momentum": 0.9}),
    "adam.P2.cnn.lr1e-3": ("adam", 2, CNN, {"lr": 1e-3}),
    "adam.P2.small.lr1e-3": ("adam", 2, SMALL, {"lr": 1e-3}),
    "sgd.P2.small.mom.lr0.01": ("sgd", 2, SMALL, {"lr": 0.01, "momentum": 0.9}),
    "sgd.P2.small.lr1.0": ("sgd", 2, SMALL, {"lr": 1.0}),
}


def launch_run(name: str, args: argparse.Namespace) -> None:
    optimizer, ranks, model, options = RUNS[name]
    command = _common.train_command(ranks, "--problem", "mnist", "--data-dir", args.data_dir)
    command += ["--model", model["model"]]
    command += ["--optimizer", optimizer, "--batch-size", str(model["batch"]), "--epochs", str(args.epochs)]
    _common.launch(name, command + _common.log_arguments(args, name) + _common.set_options(options))


def report(names: list[str], outdir: Path) -> None:
    header = (
        f"{'run':<26}{'P':>3}{'epochs':>7}{'acc%':>7}{'best%':>7}{'t@98.5':>8}{'wall s':>8}{'s/epoch':>8}{'traffic':>8}"
    )
    print(header)
    print("-" * len(header))
    curves = []
    for name in names:
        found = _common.evaluated_run(outdir, name, "val_accuracy", 26)
        if found is None:
            continue
        run, acc = found[0], found[1] * 100
        wall = np.asarray(run.evaluations["wall_time"], dtype=float)
        epochs = np.asarray(run.evaluations["epoch"], dtype=float)
        reached = np.nonzero(acc >= 98.5)[0]
        t_reach = f"{wall[reached[0]]:.0f}" if len(reached) else "-"
        epoch_times = np.diff(np.concatenate([[0.0], wall]))
        ranks = run.integer("world_size")
        print(
            f"{name:<26}{ranks:>3}{int(epochs[-1]):>7}{acc[-1]:>7.2f}{acc.max():>7.2f}{t_reach:>8}"
            f"{wall[-1]:>8.0f}{np.median(epoch_times):>8.1f}{_common.traffic(run):>7.2f}n"
        )
        curves.append((name, epochs, acc, wall))
    print("\naccuracy (%) after each epoch [wall s]:")
    for name, _epochs, acc, wall in curves:
        points = "  ".join(f"{a:.1f}[{w:.0f}]" for a, w in zip(acc, wall))
        print(f"  {name:<24} {points}")


def main() -> None:
    parser = _common.study_parser(__doc__, "runs/mnist_apts", RUNS)
    parser.add_argument("--data-dir", default=_common.dataset_dir("mnist"))
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    names = _common.chosen(parser, args, RUNS)
    _common.run_study(args, names, lambda name: launch_run(name, args), lambda: report(names, Path(args.outdir)))


if __name__ == "__main__":
    main()
