"""TinyShakespeare at P ranks: APTS-D and APTS-IP against Adam at equal wall time.

Run: ``python benchmarks/lm_study.py [--data-dir DIR] [--budget 120] [--ranks 2] [--runs NAME,…]``

Every configuration is one ``mpiexec -n P python -m mpi4py -m hpcopt train
--problem tinyshakespeare … --time-limit BUDGET`` job writing an HDF5 run log
into ``--outdir``; ``--report-only`` re-prints the table from those logs.  A run
stops, and evaluates, after the first step that ends past the budget, so every method
gets the same wall time up to one step (runs logged before 2026-12-06 stopped at the
first evaluation after it instead, which let APTS runs, evaluated every ten outer
iterations, end up to 17 s after Adam's).  Adam runs data-parallel at three
learning rates and the best one is the reference; APTS-D runs data-parallel
with §1's set (``apts-d``), ``average-gn-start`` (``apts-d-gn-start``, its defaults from
2026-12-04) and its defaults of 2026-12-05 (``apts-d-metric-l5``), APTS-IP cuts the
transformer into P pipeline stages.

Columns: final and best validation loss (nats per character), the ratio of the
best validation loss to Adam's best (the goal: ≤ 1.15), the same ratio over the
evaluations made no later than Adam's last one (``/Adam≤t``: equal wall time taken
strictly, since a run may overrun the budget by its last evaluation period), outer
steps, wall time, and traffic (bytes rank 0 moved per step over 4n).  The report also
writes ``lm_study.csv`` (one row per run, the table's columns) and ``lm_study.png``
(validation loss against steps and against wall time, one line per run) into
``--outdir``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import _common
import numpy as np
from apts_scaling_accuracy import VARIANTS as APTS_VARIANTS

# The cheap local Gauss–Newton set of the MNIST study, which the TinyShakespeare runs below vary.
_GN_LOCAL = APTS_VARIANTS["metric-adam-gn-local-f35-sc"]
_RT1 = APTS_VARIANTS["metric-adam-gn-local-l2-cg5-f35-sc-lf35-rt1"]

# name: (optimizer, --set options)
RUNS: dict[str, tuple[str, dict[str, object]]] = {
    # §1 (APTS-D's defaults when the study was first run).
    "apts-d": ("apts-d", dict(APTS_VARIANTS["sum"])),
    # The best APTS-D set of the MNIST scaling study (variant average-gn-start there, APTS-D's
    # defaults from 2026-12-04 to 2026-12-05): the mean of the local steps, a Gauss–Newton global pass,
    # HF's radius factors and local phases that start from the last step's length.
    "apts-d-gn-start": ("apts-d", dict(APTS_VARIANTS["average-gn-start"])),
    # The same with the global pass's products on a tenth of the batch and two local
    # iterations: the one set of that study within the cost goal (more outer steps per budget).
    "apts-d-gn-start-sub-l2": ("apts-d", dict(APTS_VARIANTS["average-gn-start-sub-l2"])),
    # average-gn-start in Adam's ellipsoid (metric=adam, docs/optimizers/apts-d.md), with and
    # without the global pass.
    "apts-d-metric": ("apts-d", dict(APTS_VARIANTS["metric-adam"])),
    "apts-d-metric-g0": ("apts-d", {**APTS_VARIANTS["metric-adam"], "global_passes": 0}),
    # ... and with five local iterations instead of three: APTS-D's defaults of 2026-12-05.
    "apts-d-metric-l5": ("apts-d", dict(APTS_VARIANTS["metric-adam-l5"])),
    # The Gauss–Newton step in the local phase on 35 % of each shard, no global pass (traffic
    # 2n), and the average stretched along itself to the whole batch's model minimiser.
    "apts-d-gn-local-f35-sc": ("apts-d", dict(_GN_LOCAL)),
    # Its local phase varied (docs/results-apts-d.md, "TinyShakespeare: what the local phase needs"):
    # the local Gauss–Newton products on the whole shard (a rank holds only 128 windows at
    # batch 256 and P = 2), ...
    "apts-d-gn-local-f100-sc": ("apts-d", {**_GN_LOCAL, "curvature_fraction": 1.0}),
    # ... four local iterations of at most five products each instead of two of ten, ...
    "apts-d-gn-local-l4-cg5-f35-sc": (
        "apts-d",
        {**_GN_LOCAL, "local_iterations": 4, "max_cg_iterations": 5},
    ),
    # ... two of at most five products, or three of five on a quarter of the shard; ...
    "apts-d-gn-local-cg5-f35-sc": ("apts-d", {**_GN_LOCAL, "max_cg_iterations": 5}),
    "apts-d-gn-local-l3-cg5-f25-sc": (
        "apts-d",
        {**_GN_LOCAL, "local_iterations": 3, "max_cg_iterations": 5, "curvature_fraction": 0.25},
    ),
    # ... and four first-order L-SR1 local iterations, the scaled combination's product on a tenth.
    "apts-d-metric-g0-l4-sc": (
        "apts-d",
        {**APTS_VARIANTS["metric-adam-g0-l4"], "combine": "scaled", "curvature_fraction": 0.1},
    ),
    # ... and four iterations at most that end where the local model is settled
    # (local_stop=settled: solved inside the ball, or the first rejection after progress).
    "apts-d-gn-local-l4s-cg5-f35-sc": (
        "apts-d",
        {**_GN_LOCAL, "local_iterations": 4, "max_cg_iterations": 5, "local_stop": "settled"},
    ),
    # ... the same with its products on 18 % of the shard, three iterations at most, or three products.
    "apts-d-gn-local-l4s-cg5-f18-sc": (
        "apts-d",
        {
            **_GN_LOCAL,
            "local_iterations": 4,
            "max_cg_iterations": 5,
            "local_stop": "settled",
            "curvature_fraction": 0.18,
        },
    ),
    "apts-d-gn-local-l3s-cg5-f35-sc": (
        "apts-d",
        {**_GN_LOCAL, "local_iterations": 3, "max_cg_iterations": 5, "local_stop": "settled"},
    ),
    "apts-d-gn-local-l4s-cg3-f35-sc": (
        "apts-d",
        {**_GN_LOCAL, "local_iterations": 4, "max_cg_iterations": 3, "local_stop": "settled"},
    ),
    # The radius trap of two local iterations (boundary steps at rho ~ 0.5 leave Delta as it
    # is): expand from rho > 0.5 instead of 0.75, with two local iterations or the settled four.
    "apts-d-gn-local-f35-sc-eta2": ("apts-d", {**_GN_LOCAL, "eta2": 0.5}),
    # The cheapest set over a whole MNIST run: two local iterations of at most three products.
    "apts-d-gn-local-f35-sc-cg3": ("apts-d", {**_GN_LOCAL, "max_cg_iterations": 3}),
    "apts-d-gn-local-l4s-cg5-f35-sc-eta2": (
        "apts-d",
        {**_GN_LOCAL, "local_iterations": 4, "max_cg_iterations": 5, "local_stop": "settled", "eta2": 0.5},
    ),
    # The settled four-iteration sets with their local phases on the curvature rows only.
    "apts-d-gn-local-l4s-cg5-f35-sc-lf35": (
        "apts-d",
        {**_GN_LOCAL, "local_iterations": 4, "max_cg_iterations": 5, "local_stop": "settled", "local_fraction": 0.35},
    ),
    "apts-d-gn-local-l4s-cg3-f35-sc-lf35": (
        "apts-d",
        {**_GN_LOCAL, "local_iterations": 4, "max_cg_iterations": 3, "local_stop": "settled", "local_fraction": 0.35},
    ),
    # The local CG solves held to a tenth of the residual (cg_rtol=0.1; docs/results-apts-d.md, "The
    # local CG tolerance"): two, three or four local iterations on 35 % of the shard, three on 25 %.
    "apts-d-gn-local-l2-cg5-f35-sc-lf35-rt1": ("apts-d", dict(_RT1)),
    "apts-d-gn-local-l3-cg5-f35-sc-lf35-rt1": ("apts-d", {**_RT1, "local_iterations": 3}),
    "apts-d-gn-local-l4s-cg5-f35-sc-lf35-rt1": ("apts-d", {**_RT1, "local_iterations": 4}),
    "apts-d-gn-local-l3-cg5-f35-sc-lf25-rt1": (
        "apts-d",
        dict(APTS_VARIANTS["metric-adam-gn-local-l3-cg5-f35-sc-lf25-rt1"]),
    ),
    "apts-ip": ("apts-ip", {}),
    "adam.lr1e-3": ("adam", {"lr": 1e-3}),
    "adam.lr3e-3": ("adam", {"lr": 3e-3}),
    "adam.lr1e-2": ("adam", {"lr": 1e-2}),
}


def launch_run(name: str, args: argparse.Namespace) -> None:
    optimizer, options = RUNS[name]
    command = _common.train_command(args.ranks, "--problem", "tinyshakespeare", "--data-dir", args.data_dir)
    command += ["--optimizer", optimizer, "--batch-size", str(args.batch_size), "--epochs", "100000"]
    command += ["--time-limit", str(args.budget), *_common.log_arguments(args, name)]
    command += ["--set", f"problem.train_windows={args.train_windows}", "--quiet"]
    _common.launch(name, command + _common.set_options(options))


def report(names: list[str], outdir: Path) -> None:
    rows: dict[str, tuple[float, float, int, float, float]] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for name in names:
        found = _common.evaluated_run(outdir, name, "val_loss", 16)
        if found is None:
            continue
        run, val = found
        wall = np.asarray(run.evaluations["wall_time"], dtype=float)
        steps = len(run.iterations["loss"])
        rows[name] = (float(val[-1]), float(np.nanmin(val)), steps, float(wall[-1]), _common.traffic(run))
        # One step per batch: the steps at an evaluation are its epoch's share of the run's.
        epochs = np.asarray(run.evaluations["epoch"], dtype=float)
        eval_steps = epochs * steps / epochs[-1]
        curves[name] = (eval_steps, wall, np.asarray(val, dtype=float))
    adam = [best for name, (_f, best, *_rest) in rows.items() if name.startswith("adam")]
    adam_best = min(adam) if adam else float("nan")
    # Adam evaluates every couple of seconds, so its last evaluation is where the budget ends.
    adam_walls = [wall_s for name, (*_first, wall_s, _moved) in rows.items() if name.startswith("adam")]
    adam_wall = max(adam_walls) if adam_walls else float("inf")
    strict = {name: within(curve[1], curve[2], adam_wall) for name, curve in curves.items()}
    width = max([16, *(len(name) + 2 for name in rows)])
    header = f"{'run':<{width}}{'val':>8}{'best':>8}{'/Adam':>7}{'/Adam≤t':>9}{'steps':>7}{'wall s':>8}{'traffic':>9}"
    print(header)
    print("-" * len(header))
    for name, (final, best, steps, wall_s, moved) in rows.items():
        print(
            f"{name:<{width}}{final:>8.3f}{best:>8.3f}{best / adam_best:>7.3f}{strict[name] / adam_best:>9.3f}"
            f"{steps:>7}{wall_s:>8.0f}{moved:>8.2f}n"
        )
    print(
        f"(val: nats per character; an untrained model scores ln 65 = {np.log(65):.3f}; /Adam: best over Adam's best; "
        f"/Adam≤t: the same over evaluations up to Adam's last, at {adam_wall:.0f} s)"
    )
    if rows:
        write_csv(rows, strict, adam_best, outdir / "lm_study.csv")
        write_figure(curves, outdir / "lm_study.png", adam_wall)


def within(wall: np.ndarray, val: np.ndarray, limit: float) -> float:
    """The best validation loss among the evaluations made by ``limit`` seconds (NaN: none)."""
    inside = wall <= limit
    return float(np.nanmin(val[inside])) if inside.any() else float("nan")


def write_csv(
    rows: dict[str, tuple[float, float, int, float, float]], strict: dict[str, float], adam_best: float, path: Path
) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        columns = ["run", "final_val_loss", "best_val_loss", "best_over_adam_best"]
        columns += ["best_by_adams_last_evaluation_over_adam_best", "steps", "wall_s", "traffic_n"]
        writer.writerow(columns)
        for name, (final, best, steps, wall, moved) in rows.items():
            ratios = [f"{best / adam_best:.4f}", f"{strict[name] / adam_best:.4f}"]
            writer.writerow([name, f"{final:.4f}", f"{best:.4f}", *ratios, steps, f"{wall:.1f}", f"{moved:.2f}"])
    print(f"wrote {path}")


def write_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path, adam_wall: float) -> None:
    plt = _common.pyplot(path)
    if plt is None:
        return

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for index, (name, (steps, wall, val)) in enumerate(curves.items()):
        style = {"marker": "o", "markersize": 3, "color": f"C{index}", "label": f"{name} (best {np.nanmin(val):.3f})"}
        axes[0].plot(steps, val, **style)
        axes[1].plot(wall, val, **style)
    for ax, xlabel in zip(axes, ("steps (outer iterations for APTS)", "wall time (s)"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats per character)")
        ax.set_xscale("log" if xlabel.startswith("steps") else "linear")
        ax.grid(alpha=0.3)
    if np.isfinite(adam_wall):
        label = f"Adam's last evaluation ({adam_wall:.0f} s)"
        axes[1].axvline(adam_wall, color="grey", linestyle=":", linewidth=1, label=label)
    axes[0].set_title("TinyShakespeare: validation loss against steps")
    axes[1].set_title("against wall time")
    # beside the panels, not over the curves it names
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    parser = _common.study_parser(__doc__, "runs/lm_study", RUNS)
    parser.add_argument("--data-dir", default=_common.dataset_dir("tinyshakespeare"))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of training per run")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-windows", type=int, default=2560, help="windows per epoch (evaluation period)")
    args = parser.parse_args()
    names = _common.chosen(parser, args, RUNS)
    _common.run_study(args, names, lambda name: launch_run(name, args), lambda: report(names, Path(args.outdir)))


if __name__ == "__main__":
    main()
