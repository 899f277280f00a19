"""APTS-D accuracy against the number of ranks P and the initial radius Δ₀: the ablation of the combined step.

Run (the whole study, on the full 60 000/10 000 split)::

    python benchmarks/apts_scaling_accuracy.py --data-dir ../shared/datasets/mnist-full

A smaller part: ``--ranks 2,4 --variants sum,average-model --radii ''`` (no Δ₀ sweep),
``--data-dir ../shared/datasets/mnist --batch 2000`` (the 8 000/2 000 split).  Every run
is one ``hpcopt train`` job writing ``OUTDIR/NAME.h5``; ``--report-only`` re-reads the logs.

Runs: ``VARIANT.P{P}`` for every variant and rank count (default Δ₀: MNIST's problem default
for ``apts-d``, 0.5, which ``hpcopt train`` applies when no radius is set), ``VARIANT.P{P0}.r{Δ₀}``
for the Δ₀ sweep of each variant at ``--radius-ranks`` ranks, and ``adam.P2.lr{LR}``, the
tuned baseline (best of ``--adam-lrs``).  Variants (APTS-D ``--set`` options):

* ``sum``: §1 (local radius Δ/P, s = Σ s_r, pred = Σ pred_r, L-SR1 global pass, radius
  ×1.2 / ×0.9; APTS-D's defaults until 2026-12-04);
* ``average``: ``combine=average`` (local radius Δ, s and pred the means);
* ``sum-model`` / ``average-model``: the same with ``predicted=model`` (ρ divides by the
  decrease the global L-SR1 model predicts for the combined step);
* ``average-fast``: ``combine=average`` with ``gamma_inc=2`` (the radius doubles after a
  very successful boundary step instead of growing by 1.2);
* ``average-gn``: ``combine=average`` whose global pass is a Gauss–Newton trust-region
  step on the whole batch (``global_solver=steihaug``, ``curvature=ggn``, up to 20 CG
  iterations), the pass the PINN defaults use: its curvature comes from all P shards,
  so it does not thin out as P grows; with HF's radius factors (×2 on a very successful
  boundary step, ×0.5 on a rejection) so that a badly chosen Δ₀ is left quickly;
* ``average-gn-step``: ``average-gn`` with ``shrink_to_step=true`` (a rejection shrinks
  from min(Δ, ‖s‖), so a Δ₀ far above the steps' length is left at the first rejection);
* ``average-gn-sub``: ``average-gn`` whose curvature products use a tenth of the batch
  (``curvature_fraction=0.1``, strided rows), so that the pass costs about two
  gradients instead of eight;
* ``average-gn-nm``: ``average-gn`` with the non-monotone acceptance of the combined
  step over a window of 5 outer iterations (``nonmonotone=5``);
* ``average-gn-start``: ``average-gn`` whose local phases start from 1.5× the last
  combined step's length instead of the whole ball (``local_start=step``): APTS-D's
  defaults from 2026-12-04 to 2026-12-05;
* ``average-gn-start-sub``: ``average-gn-start`` whose global pass takes its products on
  a tenth of the batch, as ``average-gn-sub`` does;
* ``average-gn-start-sub-l2``: the same with two local iterations instead of three;
* ``average-gn-start-subspace``: ``average-gn-start`` whose global pass is the exact
  Gauss–Newton trust-region step in span{g, the last two steps} (``global_solver=subspace``)
  instead of up to 20 CG products: three Jacobian-vector products per rank and one
  allreduce of 3 × 3 scalars, so the traffic is 3n;
* ``average-gn-start-subspace-sub-l2``: the same on a tenth of the batch with two local
  iterations, as ``average-gn-start-sub-l2``;
* ``average-gn-start-subspace6-sub-l2``: the same in span{g, the last six steps};
* ``defaults``: no ``--set`` at all, APTS-D's defaults of the checkout that runs it;
* ``metric-adam``: ``average-gn-start`` whose trust region is measured in Adam's diagonal
  norm (``metric=adam``);
* ``metric-adam-l5``: the same with five local iterations: APTS-D's defaults from
  2026-12-05 to 2026-12-06;
* ``metric-adam-sub-l2``: ``average-gn-start-sub-l2`` (the set within the cost goal) in
  Adam's ellipsoid;
* ``metric-adam-g0-l4``: the defaults without the global pass (``global_passes=0``) and
  with four local iterations: traffic 2n (the gradient and the combination);
* ``metric-adam-lsr1-l3``: the defaults with the first-order L-SR1 global pass
  (``global_solver=lsr1``) and three local iterations: traffic 3n (the trial gradient
  that the pass needs rides in the trial value's allreduce);
* ``metric-adam-gn-local``: no global pass; two local iterations, each a Steihaug solve on
  the rank's own shard with its Gauss–Newton products on a tenth of it (up to 10
  products, no communication), in Adam's ellipsoid: traffic 2n;
* ``metric-adam-gn-local-l3`` / ``metric-adam-gn-local-q``: the same with three local
  iterations / with the local products on a quarter of the shard;
* ``metric-adam-gn-local-f35`` / ``metric-adam-gn-local-l3-f18``: the same with the local
  products on 35 % of the shard / with three local iterations on 18 % of it;
* ``metric-adam-gn-local-q-ls``: ``metric-adam-gn-local-q`` whose local phases start from
  the mean length of the last local steps (``local_start=local``) instead of the last
  combined step's: the average of P local steps is shorter than they are where they
  disagree, so the combined step's length shrinks the local phases as P grows;
* ``metric-adam-gn-local-q-sc``: ``metric-adam-gn-local-q`` whose average is stretched (or
  shrunk) along itself to the minimiser of the whole batch's Gauss–Newton model on that
  line (``combine=scaled``: one local product and one scalar allreduce more);
  ``metric-adam-gn-local-f35-sc``: the same on 35 % of the shard;
  ``metric-adam-gn-local-l4s-cg5-f35-sc``: that with up to four local iterations of at most
  five products each, ending where the local model is settled (``local_stop=settled``);
  ``metric-adam-gn-local-l4s-cg3-f35-sc``: the same with at most three products per solve;
  ``metric-adam-gn-local-f35-sc-cg3``: the two-iteration set with at most three products per solve;
  ``metric-adam-gn-local-l4s-cg5-f35-sc-lf35`` / ``…-l4s-cg3-f35-sc-lf35``: the settled
  four-iteration sets whose local phases see only the curvature rows, 35 % of the shard
  (``local_fraction=0.35``: values and gradients too, not only products);
  ``metric-adam-gn-local-l2-cg5-f35-sc-lf35-rt1``: the ``lf35`` set with two local
  iterations whose CG solves stop at a tenth of the residual (``cg_rtol=0.1``);
  ``metric-adam-gn-local-l3-cg5-f35-sc-lf25-rt1``: the same with three local iterations
  on a quarter of the shard: APTS-D's defaults since 2026-12-06;
* ``average-gn-local``: the Gauss–Newton step moved into the local phase: one local
  iteration per outer iteration, a Steihaug solve on the rank's own shard with its GGN
  (up to 10 products, no communication), the average of the local steps, and the
  default L-SR1 global pass (traffic 3n).

The Δ₀ sweep raises ``radius_max`` to Δ₀ where Δ₀ exceeds its default 2.  Every rank
takes an equal share of the global batch, so at a P that does not divide ``--batch``
the batch is rounded down to a multiple of P (10 000 rows at P = 6 run as 9 996); the
CSV records each run's batch.  ``--adam-best`` draws Adam's best accuracy measured in
another study when this one has no Adam run, ``--goal`` and ``--radius-goal`` goal
lines against P and against Δ₀.

Writes ``OUTDIR/apts_scaling_accuracy.csv`` (one row per run: final and best validation
accuracy, accepted combined steps, median ρ, final radius, seconds, and with ``--goal``
the seconds to the first evaluation at or above it), ``OUTDIR/apts_scaling_accuracy.png``
(accuracy against P, one line per variant, Adam's best as a horizontal line; accuracy
against Δ₀ beside it) and ``OUTDIR/apts_scaling_curves.png`` (validation accuracy of
every run against epochs and against wall time).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import _common
import numpy as np

from hpcopt.optimizers.apts.apts_d import SECTION_1_OPTIONS

# §1 as published, spelled out: APTS-D's defaults are the average-gn-start set below
# (since 2026-12-04); every variant is stated against §1, so each run's options stay the
# ones it was measured with whatever the defaults are.
SECTION_1: dict[str, object] = dict(SECTION_1_OPTIONS)
VARIANTS: dict[str, dict[str, object]] = {
    "sum": dict(SECTION_1),
    "average": {**SECTION_1, "combine": "average"},
    "sum-model": {**SECTION_1, "predicted": "model"},
    "average-model": {**SECTION_1, "combine": "average", "predicted": "model"},
    "average-fast": {**SECTION_1, "combine": "average", "gamma_inc": 2.0},
    "average-gn": {
        **SECTION_1,
        "combine": "average",
        "gamma_inc": 2.0,
        "gamma_dec": 0.5,
        "global_solver": "steihaug",
        "curvature": "ggn",
        "max_cg_iterations": 20,
    },
}
VARIANTS["average-gn-step"] = {**VARIANTS["average-gn"], "shrink_to_step": True}
VARIANTS["average-gn-sub"] = {**VARIANTS["average-gn"], "curvature_fraction": 0.1}
VARIANTS["average-gn-nm"] = {**VARIANTS["average-gn"], "nonmonotone": 5}
VARIANTS["average-gn-start"] = {**VARIANTS["average-gn"], "local_start": "step"}
VARIANTS["average-gn-start-sub"] = {**VARIANTS["average-gn-start"], "curvature_fraction": 0.1}
VARIANTS["average-gn-start-sub-l2"] = {**VARIANTS["average-gn-start-sub"], "local_iterations": 2}
# Whatever APTS-D's defaults are in this checkout (since 2026-12-06: the
# metric-adam-gn-local-l3-cg5-f35-sc-lf25-rt1 set; tests/optimizers/test_apts_d.py checks
# that they agree).
VARIANTS["defaults"] = {}
# average-gn-start in Adam's ellipsoid (docs/optimizers/apts-d.md, "metric=adam"); with five
# local iterations, APTS-D's defaults of 2026-12-05.
VARIANTS["metric-adam"] = {**VARIANTS["average-gn-start"], "metric": "adam"}
VARIANTS["metric-adam-l5"] = {**VARIANTS["metric-adam"], "local_iterations": 5}
# The cheap set (average-gn-start-sub-l2) in Adam's ellipsoid: does the metric buy back
# what the curvature sub-batch and two local iterations cost?
VARIANTS["metric-adam-sub-l2"] = {**VARIANTS["average-gn-start-sub-l2"], "metric": "adam"}
# Within goal 3's traffic (≤ 3n per outer iteration): the defaults with the n-float
# products of the Gauss–Newton pass replaced by nothing, by L-SR1, or by local products.
VARIANTS["metric-adam-g0-l4"] = {**VARIANTS["metric-adam"], "global_passes": 0, "local_iterations": 4}
VARIANTS["metric-adam-lsr1-l3"] = {**VARIANTS["metric-adam"], "global_solver": "lsr1", "local_iterations": 3}
VARIANTS["metric-adam-gn-local"] = {
    **VARIANTS["metric-adam"],
    "global_passes": 0,
    "local_solver": "steihaug",
    "local_iterations": 2,
    "curvature_fraction": 0.1,
    "max_cg_iterations": 10,
}
VARIANTS["metric-adam-gn-local-l3"] = {**VARIANTS["metric-adam-gn-local"], "local_iterations": 3}
VARIANTS["metric-adam-gn-local-q"] = {**VARIANTS["metric-adam-gn-local"], "curvature_fraction": 0.25}
# The rest of the 5.5-gradient budget spent on the local curvature: more rows, or a third iteration.
VARIANTS["metric-adam-gn-local-f35"] = {**VARIANTS["metric-adam-gn-local"], "curvature_fraction": 0.35}
VARIANTS["metric-adam-gn-local-l3-f18"] = {**VARIANTS["metric-adam-gn-local-l3"], "curvature_fraction": 0.18}
# The local phases start from the local steps' own mean length, not the averaged step's.
VARIANTS["metric-adam-gn-local-q-ls"] = {**VARIANTS["metric-adam-gn-local-q"], "local_start": "local"}
# The average stretched along itself to the whole batch's Gauss–Newton minimiser on that line.
VARIANTS["metric-adam-gn-local-q-sc"] = {**VARIANTS["metric-adam-gn-local-q"], "combine": "scaled"}
VARIANTS["metric-adam-gn-local-f35-sc"] = {**VARIANTS["metric-adam-gn-local-f35"], "combine": "scaled"}
# Up to four local iterations of at most five products that end where the local model is
# settled (local_stop=settled): TinyShakespeare needs four, MNIST fewer.
VARIANTS["metric-adam-gn-local-l4s-cg5-f35-sc"] = {
    **VARIANTS["metric-adam-gn-local-f35-sc"],
    "local_iterations": 4,
    "max_cg_iterations": 5,
    "local_stop": "settled",
}
VARIANTS["metric-adam-gn-local-l4s-cg3-f35-sc"] = {
    **VARIANTS["metric-adam-gn-local-l4s-cg5-f35-sc"],
    "max_cg_iterations": 3,
}
# Its local CG solves capped at three products: a bound on the whole run's cost by construction.
VARIANTS["metric-adam-gn-local-f35-sc-cg3"] = {**VARIANTS["metric-adam-gn-local-f35-sc"], "max_cg_iterations": 3}
# The settled four-iteration sets with their local phases on the curvature rows
# (local_fraction=0.35): a local iteration's trial costs 35 % of one on the shard.
VARIANTS["metric-adam-gn-local-l4s-cg5-f35-sc-lf35"] = {
    **VARIANTS["metric-adam-gn-local-l4s-cg5-f35-sc"],
    "local_fraction": 0.35,
}
VARIANTS["metric-adam-gn-local-l4s-cg3-f35-sc-lf35"] = {
    **VARIANTS["metric-adam-gn-local-l4s-cg3-f35-sc"],
    "local_fraction": 0.35,
}
# The local CG solves held to a tenth of the gradient's residual (cg_rtol=0.1) instead of
# the forcing term min(0.5, √‖g‖), which is 0.5 while ‖g‖ > 0.25 (0.32–1.76 in Adam's metric
# over MNIST's first 15 outer iterations); two local iterations of five products each.
VARIANTS["metric-adam-gn-local-l2-cg5-f35-sc-lf35-rt1"] = {
    **VARIANTS["metric-adam-gn-local-l4s-cg5-f35-sc-lf35"],
    "local_iterations": 2,
    "cg_rtol": 0.1,
}
# Three such iterations (TinyShakespeare needs more than two) on 25 % of the shard, to stay
# within 5.5 gradient evaluations per MNIST outer iteration.
VARIANTS["metric-adam-gn-local-l3-cg5-f35-sc-lf25-rt1"] = {
    **VARIANTS["metric-adam-gn-local-l2-cg5-f35-sc-lf35-rt1"],
    "local_iterations": 3,
    "local_fraction": 0.25,
}
VARIANTS["average-gn-start-subspace"] = {
    **VARIANTS["average-gn-start"],
    "global_solver": "subspace",
    "subspace_steps": 2,
}
VARIANTS["average-gn-start-subspace-sub-l2"] = {
    **VARIANTS["average-gn-start-subspace"],
    "curvature_fraction": 0.1,
    "local_iterations": 2,
}
VARIANTS["average-gn-start-subspace6-sub-l2"] = {**VARIANTS["average-gn-start-subspace-sub-l2"], "subspace_steps": 6}
VARIANTS["average-gn-local"] = {
    **SECTION_1,
    "combine": "average",
    "gamma_inc": 2.0,
    "gamma_dec": 0.5,
    "local_solver": "steihaug",
    "local_iterations": 1,
    "curvature": "ggn",
    "max_cg_iterations": 10,
}


def plan(args: argparse.Namespace) -> list[tuple[str, str, int, dict[str, object]]]:
    """(run name, optimizer, ranks, --set options) of every run of the study."""
    runs: list[tuple[str, str, int, dict[str, object]]] = []
    for lr in args.adam_lrs:
        runs.append((f"adam.P2.lr{lr:g}", "adam", 2, {"lr": lr}))
    for variant in args.variants.split(","):
        options = VARIANTS[variant]
        for ranks in args.ranks:
            runs.append((f"{variant}.P{ranks}", "apts-d", ranks, dict(options)))
        for radius in args.radii:
            runs.append(
                (
                    f"{variant}.P{args.radius_ranks}.r{radius:g}",
                    "apts-d",
                    args.radius_ranks,
                    {**options, "radius": radius, "radius_max": max(2.0, radius)},
                )
            )
    return runs


def batch_for(batch: int, ranks: int) -> int:
    """The global batch at ``ranks`` ranks: ``--batch`` rounded down to a multiple of P.

    Every rank takes an equal share, so 10 000 rows at P = 6 run as 9 996.
    """
    return batch - batch % ranks


def launch_run(run: tuple[str, str, int, dict[str, object]], args: argparse.Namespace) -> None:
    name, optimizer, ranks, options = run
    command = _common.train_command(ranks, "--problem", "mnist", "--data-dir", args.data_dir, "--model", args.model)
    batch = batch_for(args.batch, ranks)
    command += ["--optimizer", optimizer, "--batch-size", str(batch), "--epochs", str(args.epochs)]
    _common.launch(name, command + _common.log_arguments(args, name) + _common.set_options(options))


def report(runs: list[tuple[str, str, int, dict[str, object]]], args: argparse.Namespace) -> None:
    outdir = Path(args.outdir)
    header = f"{'run':<28}{'P':>3}{'acc%':>7}{'best%':>7}{'accepted':>10}{'median rho':>11}{'radius':>8}{'wall s':>8}"
    header += f"{'t@goal s':>10}{'s/outer':>9}"
    print(header)
    print("-" * len(header))
    rows = []
    adam: list[float] = []  # the final accuracy of each Adam run
    curves: list[tuple[str, _common.Run]] = []
    for name, optimizer, ranks, options in runs:
        found = _common.evaluated_run(outdir, name, "val_accuracy", 28)
        if found is None:
            continue
        run, acc = found[0], found[1] * 100
        its = run.iterations
        accepted = np.asarray(its["accepted"], dtype=float)
        ratio = np.asarray(its["ratio"], dtype=float)
        radius = np.asarray(its["radius"], dtype=float)
        times = np.asarray(run.evaluations["wall_time"], dtype=float)
        wall = float(times[-1])
        # Goal 3's cost over the whole run: the median time of an outer iteration (the median
        # leaves out the evaluations between epochs).  Over the first few iterations only it
        # reads low for local Gauss-Newton phases, whose CG solves lengthen as steps turn interior.
        outer = outer_seconds(run)
        reached = np.flatnonzero(acc >= args.goal) if args.goal is not None else np.array([], dtype=int)
        row = {
            "run": name,
            "optimizer": optimizer,
            "ranks": ranks,
            "batch": run.integer("batch_size", batch_for(args.batch, ranks)),
            "options": " ".join(f"{k}={v}" for k, v in options.items()),
            # Δ₀ as the run used it (the radius logged before its first step): a run without
            # --set radius takes MNIST's problem default for apts-d, not APTSDConfig's.
            "initial_radius": float(radius[0]),
            "final_accuracy": round(float(acc[-1]), 3),
            "best_accuracy": round(float(acc.max()), 3),
            "accepted": f"{int(np.nansum(accepted))}/{len(accepted)}",
            "median_ratio": round(float(np.nanmedian(ratio)), 3) if np.isfinite(ratio).any() else "",
            "final_radius": round(float(radius[-1]), 4) if np.isfinite(radius[-1]) else "",
            "wall_s": round(wall, 1),
            "time_to_goal_s": round(float(times[reached[0]]), 1) if len(reached) else "",
            "median_outer_s": round(float(np.median(outer)), 2),
        }
        rows.append(row)
        if optimizer == "adam":
            adam.append(round(float(acc[-1]), 3))
        curves.append((name, run))
        print(
            f"{name:<28}{ranks:>3}{row['final_accuracy']:>7.2f}{row['best_accuracy']:>7.2f}{row['accepted']:>10}"
            f"{row['median_ratio']!s:>11}{row['final_radius']!s:>8}{wall:>8.0f}{row['time_to_goal_s']!s:>10}"
            f"{row['median_outer_s']:>9.2f}"
        )
    if not rows:
        return
    with open(outdir / "apts_scaling_accuracy.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if adam:
        print(f"\nAdam's best of {len(adam)} learning rates: {max(adam):.2f} %")
    adam_best = max(adam) if adam else args.adam_best
    _plot(rows, args, adam_best, outdir / "apts_scaling_accuracy.png")
    _plot_curves(curves, args, outdir / "apts_scaling_curves.png")
    _plot_outer_times(curves, outdir / "apts_scaling_outer_time.png")


def outer_seconds(run: _common.Run) -> np.ndarray:
    """Seconds of each outer iteration (the first one's from the start of training)."""
    return np.diff(np.asarray(run.iterations["wall_time"], dtype=float), prepend=0.0)


def _plot_outer_times(curves: list[tuple[str, _common.Run]], path: Path) -> None:
    """Seconds per outer iteration against the iteration: goal 3's cost over the whole run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6.5, 4))
    for name, run in curves:
        outer = outer_seconds(run)
        axis.plot(np.arange(1, len(outer) + 1), outer, marker=".", label=f"{name} (median {np.median(outer):.1f} s)")
    axis.set_xlabel("outer iteration (steps for SGD/Adam)")
    axis.set_ylabel("seconds (evaluations between epochs included)")
    axis.set_ylim(bottom=0.0)
    axis.grid(alpha=0.3)
    # under the axes, not over the curves it names
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")


def _plot_curves(curves: list[tuple[str, _common.Run]], args: argparse.Namespace, path: Path) -> None:
    """Validation accuracy of every run against epochs and against wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    finals = []
    for name, run in curves:
        evaluations = run.evaluations
        accuracy = np.asarray(evaluations["val_accuracy"], dtype=float) * 100
        finals.append(float(accuracy[-1]))
        style = "--" if name.startswith("adam") else "-"
        by_epoch.plot(np.asarray(evaluations["epoch"], dtype=float), accuracy, style, marker="o", label=name)
        by_time.plot(np.asarray(evaluations["wall_time"], dtype=float), accuracy, style, marker="o", label=name)
    for axis in (by_epoch, by_time):
        if args.goal is not None:
            axis.axhline(args.goal, color="k", linestyle=":", linewidth=1, label=f"goal: {args.goal:g} %")
        # Every run's final accuracy in view, and no more below it: the early epochs sit far lower.
        bottom = max(0.0, min(finals) - 5.0)
        axis.set_ylim(bottom, 100.0)
        axis.set_ylabel("validation accuracy (%)")
        axis.grid(alpha=0.3)
    by_epoch.set_xlabel("epoch")
    by_time.set_xlabel("wall time (s)")
    # beside the panels, not over the curves it names
    by_time.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    cut = f"; the axes start at {bottom:.1f} %" if bottom > 0 else ""
    by_epoch.set_title(f"{args.model}, batch {args.batch}{cut}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")


def _plot(rows: list[dict[str, object]], args: argparse.Namespace, adam_best: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeping = bool(args.radii)
    variants = args.variants.split(",")
    points = {
        variant: [(r["ranks"], r["final_accuracy"]) for r in rows if r["run"] == f"{variant}.P{r['ranks']}"]
        for variant in variants
    }
    # A study of Δ₀ alone (--ranks '') has no P sweep: one panel, not an empty one beside it.
    against_ranks = not sweeping or bool(args.ranks)
    panels = int(against_ranks) + int(sweeping)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    by_ranks, by_radius = axes[0][0], axes[0][-1]
    for variant in variants:
        if against_ranks and points[variant]:
            by_ranks.plot(*zip(*sorted(points[variant])), marker="o", label=variant)
        prefix = f"{variant}.P{args.radius_ranks}.r"
        sweep = [(r["initial_radius"], r["final_accuracy"]) for r in rows if str(r["run"]).startswith(prefix)]
        if sweep:  # the run at the default Δ₀ belongs to the sweep too
            sweep += [
                (r["initial_radius"], r["final_accuracy"])
                for r in rows
                if r["run"] == f"{variant}.P{args.radius_ranks}"
            ]
        if sweep:
            by_radius.semilogx(*zip(*sorted(sweep)), marker="o", label=variant)
    for axis in {by_ranks, by_radius}:
        if adam_best is not None:
            axis.axhline(adam_best, color="grey", linestyle="--", label=f"Adam, best lr (P = 2): {adam_best:.2f} %")
        goal = args.radius_goal if sweeping and axis is by_radius else args.goal
        if goal is not None:
            axis.axhline(goal, color="k", linestyle=":", linewidth=1, label=f"goal: {goal:g} %")
        axis.set_ylabel("final validation accuracy (%)")
        low, high = axis.get_ylim()
        if high - low < 2.0:  # at least two points of accuracy, so that tenths do not look like a cliff
            middle = (low + high) / 2
            axis.set_ylim(middle - 1.0, middle + 1.0)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:  # a panel can be empty (a run of the other sweep only)
            axis.legend(fontsize=8)
    if against_ranks:
        by_ranks.set_xlabel("ranks P")
    uneven = any(args.batch % int(str(r["ranks"])) for r in rows)
    batch = f"batch {args.batch}" + (" (or less: a multiple of P)" if uneven else "")
    by_ranks.set_title(f"APTS-D, {args.model}, {batch}, {args.epochs} epochs", fontsize=9)
    if sweeping:
        by_radius.set_xlabel(f"initial radius Δ₀ (P = {args.radius_ranks})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", default="runs/apts_scaling_accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--data-dir", default=_common.dataset_dir("mnist-full"))
    parser.add_argument("--model", default="cnn-small")
    parser.add_argument("--batch", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--ranks", type=_common.ints, default="2,4,6,8", help="rank counts of the P sweep")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"a subset of {', '.join(VARIANTS)}")
    parser.add_argument(
        "--radii",
        type=_common.floats,
        default="1e-3,1e-2,1e-1,1,10",
        help="Δ₀ values of the radius sweep ('' for none)",
    )
    parser.add_argument("--radius-ranks", type=int, default=4)
    parser.add_argument(
        "--adam-lrs", type=_common.floats, default="1e-3,3e-3,1e-2", help="Adam's learning rates ('' for none)"
    )
    parser.add_argument(
        "--adam-best", type=float, help="Adam's best accuracy (%%) measured elsewhere, drawn when no Adam run is here"
    )
    parser.add_argument("--goal", type=float, help="draw this accuracy (%%) as the goal line against P")
    parser.add_argument("--radius-goal", type=float, help="draw this accuracy (%%) as the goal line against Δ₀")
    args = parser.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    runs = plan(args)
    _common.run_study(args, runs, lambda run: launch_run(run, args), lambda: report(runs, args))


if __name__ == "__main__":
    main()
