"""MNIST at large global batches: HF, NLCG and Neumann against SGD and Adam at equal epochs.

Run: ``python benchmarks/large_batch.py --data-dir ../shared/datasets/mnist-full
[--batches 15000,1000] [--epochs 10] [--methods hf-cg,nlcg,nlcg-gn,neumann-start,sgd,adam]
[--lrs adam=1e-3:3e-3] [--model cnn-small] [--ranks 2] [--seeds 0,1,2] [--timing-steps 6]``

Every configuration is one ``mpiexec -n P python -m mpi4py -m hpcopt train …`` job
writing an HDF5 run log into ``--outdir``; a run whose log exists and says
``completed`` is not run again (``--rerun`` runs it anyway), so an interrupted study
resumes where it stopped.  SGD (momentum 0.9), Adam, NLCG and Neumann get the best of
three learning rates (``LEARNING_RATES``, at a batch in ``BATCH_LEARNING_RATES`` that batch's
grid, or ``--lrs`` for every batch); HF runs with the options in
``METHODS``.  SGD, Adam and NLCG warm their learning rate up linearly over the first
10 % of the steps; Neumann runs its own SGD burn-in over the first 10 % of the epochs
(``neumann-scaled``: the paper's 5 of 230 epochs, with the run taken as 230 of them;
``neumann-ramp``: its rate warmed up linearly over the burn-in).

Output: a table per run (final and best validation accuracy in %, steps, wall time,
median seconds per step in the run, traffic in n-sized collectives per step), the best
learning rate of each method, ``large_batch.csv`` (one row per run; a run with no evaluation,
diverged or failed, has its status and empty figures) and
``large_batch.png`` (validation accuracy against steps and against wall time, one line
per method at its best learning rate, one row of panels per batch size).  With
``--timing-steps N`` each method's best configuration is also timed for N steps in
``--timing-rounds`` interleaved rounds (:func:`time_steps`), which gives its time per
step over Adam's.  The table of a study run in pieces (``--methods``/``--lrs``) is
``--report-only`` with every method.

With three batch sizes or more (``--batches 15000,7500,4000,2000,1000``) the study is also a
batch sweep, which is what the papers' claims are about: a table of each method's final
accuracy at its best rate against the batch size, with its distance to Adam's best at that
batch, ``large_batch_sizes.csv`` (one row per method and batch) and ``large_batch_sizes.png``.
With several seeds as well, each seed's best against Adam's best on the same seed: the mean gap
with its lowest and highest, ``large_batch_sizes_seeds.csv`` (one row per method, batch and
seed) and ``large_batch_sizes_seeds.png`` (the means as lines, every seed as a dot).

With ``--seeds 0,1,2`` every configuration runs once per seed (logs ``NAME.sS.h5`` for a
seed S other than 0).  The first seed chooses each method's best learning rate, as a
single-seed study does; the other seeds measure how far a result moves with the seed
alone (the initial weights and the order of the batches): a table of each configuration's
final accuracy over the seeds (mean, sample standard deviation, lowest, highest),
``large_batch_seeds.csv`` (one row per configuration) and ``large_batch_seeds.png`` (every
seed's final accuracy, one column per configuration); a seed with no result is named in
both and left out of the mean.  A seed study at the learning rates
a single-seed study chose is ``--lrs`` with one rate per method.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import _common
import numpy as np

from hpcopt.analysis.tables import Run, load_run

# name: (optimizer, --set options); the learning rate of every method but HF is swept.
METHODS: dict[str, tuple[str, dict]] = {
    "hf-cg": ("hf", {"solver": "cg", "curvature": "ggn", "max_iterations": 20}),
    # The paper's loss-average heuristic, checked every step instead of every 5: a run of 40
    # steps gives the 5-step check only 8 chances, each after the damage is done.
    "nlcg": ("nlcg", {"check_every": 1}),
    "nlcg-paper": ("nlcg", {}),  # the heuristic as published: a check every 5 steps
    # Polak–Ribière with the step length that minimises the Gauss–Newton model along d
    # (docs/optimizers/nlcg.md#a-step-length-from-the-curvature); lr scales that length.
    "nlcg-gn": ("nlcg", {"check_every": 1, "beta": "pr", "step_length": "curvature"}),
    # The paper's algorithm with its constants except β, whose shell radius is carried over
    # relative to ‖w‖ (docs/optimizers/neumann.md#the-regulariser-on-a-small-model).
    # Its schedules count epochs from the burn-in's end, as every figure of the study did
    # (hpcopt's default counts from step 0 since 2026-12-07: "neumann-start").
    "neumann": ("neumann", {"beta_rule": "relative", "schedule_origin": "burn-in"}),
    # The paper's constants as published: β = 1e-5·n.
    "neumann-paper": ("neumann", {"beta_rule": "paper", "schedule_origin": "burn-in"}),
    # The paper's schedules (5 epochs of burn-in, first reset after 10, μ and η over
    # epochs) with its "epoch" scaled so that this run is as long as the paper's
    # (PAPER_RUN_EPOCHS); β relative as in "neumann" (docs/optimizers/neumann.md).
    "neumann-scaled": (
        "neumann",
        {"beta_rule": "relative", "warmup_epochs": 5, "reset_epochs": 10, "schedule_origin": "burn-in"},
    ),
    # hpcopt train's defaults (since 2026-12-07): "neumann" with the schedules' epochs counted
    # from step 0 instead of the burn-in's end, so that the first momentum steps run at the
    # burn-in's effective step (lr, not 2·lr); on 10 epochs its burn-in and first reset period
    # are the study's 1 and 2 epochs (docs/optimizers/neumann.md#the-schedules-on-a-shorter-run).
    "neumann-start": ("neumann", {}),
    # "neumann-start" with its SGD burn-in's rate warmed up linearly over the whole burn-in,
    # the same 10 % of the run over which SGD, Adam and NLCG warm theirs up.
    "neumann-ramp": ("neumann", {"beta_rule": "relative", "schedule_origin": "start"}),
    "sgd": ("sgd", {"momentum": 0.9}),
    "adam": ("adam", {}),
}
# The goal's study at hpcopt's defaults: NLCG with both step lengths (the fixed step is the
# better at batch 1 000, the curvature step at 15 000) and Neumann as `hpcopt train` runs it.
DEFAULT_METHODS = ("hf-cg", "nlcg", "nlcg-gn", "neumann-start", "sgd", "adam")
LEARNING_RATES: dict[str, tuple[float, ...]] = {
    "nlcg": (0.03, 0.1, 0.3),
    "nlcg-paper": (0.03, 0.1, 0.3),
    "nlcg-gn": (1.0, 2.0, 3.0),
    "neumann": (0.1, 0.2, 0.3),
    "neumann-paper": (0.03, 0.1, 0.3),
    "neumann-scaled": (0.5, 1.0, 2.0),
    "neumann-start": (0.1, 0.2, 0.3),
    "neumann-ramp": (0.2, 0.3, 0.5),
    "sgd": (0.03, 0.1, 0.3),
    "adam": (3e-3, 1e-2, 3e-2),
}
# A batch with a grid of its own: at batch 1 000 Neumann's best rate is the grid's largest,
# 0.3, on seed 0, and 0.3 / 0.4 / 0.5 are the best three adjacent rates over seeds 0-2
# (docs/results-large-batch.md#where-the-schedules-epochs-start-schedule_originstart).
# Between the goal's two batches (the batch sweep of docs/results-large-batch.md) Neumann's and
# SGD's grids move with their best rates: Neumann's from 0.3 at 1 000 to 0.2 at 15 000, SGD's
# from 0.03 at 1 000 to 0.01 at 15 000 (seed 0); at 7 500 Neumann's best of 0.1 / 0.2 / 0.3 was
# the grid's largest, and 0.4 beat it and 0.5 and 0.6 (seed 0; docs/results-large-batch.md).
BATCH_LEARNING_RATES: dict[tuple[str, int], tuple[float, ...]] = {
    ("neumann-start", 1000): (0.3, 0.4, 0.5),
    ("neumann-start", 2000): (0.2, 0.3, 0.4),
    ("neumann-start", 4000): (0.2, 0.3, 0.4),
    ("neumann-start", 7500): (0.2, 0.3, 0.4),
    ("sgd", 2000): (0.01, 0.03, 0.1),
    ("sgd", 4000): (0.01, 0.03, 0.1),
    ("sgd", 7500): (0.01, 0.03, 0.1),
}
WARMUP_FRACTION = 0.1  # of the steps (SGD, Adam, NLCG) or of the epochs (Neumann's burn-in)
# The paper's ResNet-50 runs are 230 epochs of ImageNet long (updates × batch / 1 281 167
# for its five batch sizes: 226, 230, 258, 210, 237); "neumann-scaled" maps them onto this run.
PAPER_RUN_EPOCHS = 230


@dataclass(frozen=True)
class Config:
    """One ``hpcopt train`` job of the study."""

    setting: str  # METHOD.bBATCH[.lrLR]: what the seeds of one configuration share
    method: str
    batch: int
    lr: float | None
    optimizer: str
    options: dict
    seed: int = 0

    @property
    def name(self) -> str:
        """The run's name (its log is ``NAME.h5``): the setting, and ``.sSEED`` for a seed other than 0."""
        return f"{self.setting}.s{self.seed}" if self.seed else self.setting


def parse_lrs(text: str) -> dict[str, tuple[float, ...]]:
    """``adam=1e-3:3e-3,nlcg=0.1`` → the learning rates to sweep per method (an argparse type)."""
    swept: dict[str, tuple[float, ...]] = {}
    for item in filter(None, text.split(",")):
        method, _, values = item.partition("=")
        if method not in METHODS:
            raise argparse.ArgumentTypeError(f"unknown method '{method}' in '{item}'; choose from {', '.join(METHODS)}")
        try:
            swept[method] = tuple(float(value) for value in values.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected METHOD=LR[:LR...], got '{item}'") from None
    return swept


def configurations(
    methods: list[str],
    batches: list[int],
    lrs: dict[str, tuple[float, ...]],
    epochs: int,
    train_size: int,
    seeds: tuple[int, ...] = (0,),
    batch_lrs: Mapping[tuple[str, int], tuple[float, ...]] | None = None,
) -> list[Config]:
    """Every method, batch, swept learning rate and seed, batch by batch in the order given.

    ``batch_lrs[(method, batch)]``, where given, is that batch's grid instead of ``lrs[method]``.
    Within a batch and a seed the middle learning rate of every method runs first, then HF,
    then the other learning rates, so that a study stopped early has every method at least
    once; seed by seed in the order given.
    """
    runs = []
    for batch, seed in ((batch, seed) for batch in batches for seed in seeds):
        steps_per_epoch = max(1, train_size // batch)
        warmup_steps = max(1, round(WARMUP_FRACTION * epochs * steps_per_epoch))
        grid = {method: (batch_lrs or {}).get((method, batch), lrs.get(method, (None,))) for method in methods}
        ordered = [(method, lr) for method in methods for lr in _middle_first(grid[method])]
        ordered.sort(key=lambda item: _middle_first(grid[item[0]]).index(item[1]) if item[1] is not None else 0.5)
        for method, lr in ordered:
            optimizer, options = METHODS[method]
            opts = dict(options)
            if optimizer in ("sgd", "adam", "nlcg"):
                opts["warmup_steps"] = warmup_steps
            if method == "neumann-scaled":
                opts["epoch_steps"] = round(epochs * steps_per_epoch / PAPER_RUN_EPOCHS, 4)
            elif optimizer == "neumann" and method != "neumann-start":
                # the paper's schedules count epochs: burn-in 10 % of them, first reset period 2 epochs
                opts |= {"epoch_steps": steps_per_epoch, "warmup_epochs": WARMUP_FRACTION * epochs}
                opts["reset_epochs"] = 2
                if method == "neumann-ramp":
                    opts["ramp_epochs"] = opts["warmup_epochs"]
            if lr is not None:
                opts["lr"] = lr
            suffix = f".lr{lr:g}" if lr is not None else ""
            runs.append(Config(f"{method}.b{batch}{suffix}", method, batch, lr, optimizer, opts, seed))
    return runs


def _middle_first(values: tuple[float | None, ...]) -> list[float | None]:
    middle = len(values) // 2
    return [values[middle], *values[:middle], *values[middle + 1 :]]


def completed(path: Path) -> bool:
    return path.exists() and load_run(path).status == "completed"


def launch_run(config: Config, args: argparse.Namespace) -> None:
    if not args.rerun and completed(Path(args.outdir) / f"{config.name}.h5"):
        print(f"== {config.name}: completed run log present, skipped", flush=True)
        return
    command = _common.train_command(args.ranks, "--problem", "mnist", "--data-dir", args.data_dir)
    command += ["--model", args.model, "--optimizer", config.optimizer, "--batch-size", str(config.batch)]
    command += ["--epochs", str(args.epochs), *_common.log_arguments(args, config.name, config.seed), "--quiet"]
    _common.launch(config.name, command + _common.set_options(config.options))


@dataclass
class Result:
    """What the table, the CSV and the figure read from one run log."""

    config: Config
    run: Run
    accuracy: np.ndarray  # % after each evaluation
    eval_steps: np.ndarray
    eval_wall: np.ndarray
    steps: int
    seconds_per_step: float


def read_result(config: Config, outdir: Path) -> Result | None:
    found = _common.evaluated_run(outdir, config.name, "val_accuracy", 28)
    if found is None:
        return None
    run, accuracy = found
    iterations = run.iterations
    steps = len(iterations["loss"])
    step_wall = np.asarray(iterations["wall_time"], dtype=float)
    epochs = np.asarray(run.evaluations["epoch"], dtype=float)
    # Steps done by each evaluation: evaluations follow whole epochs of equal length.
    eval_steps = np.round(epochs * steps / max(epochs[-1], 1)).astype(int)
    # Time per step from the steps' own clock: evaluations excluded, the first step (start-up) too.
    seconds = float(np.median(np.diff(step_wall))) if steps > 2 else float(step_wall[-1]) / max(steps, 1)
    wall = np.asarray(run.evaluations["wall_time"], dtype=float)
    return Result(config, run, accuracy * 100, eval_steps, wall, steps, seconds)


def best_per_method(results: list[Result], seed: int) -> dict[tuple[str, int], Result]:
    """The run with the highest final accuracy of each (method, batch) among the runs of ``seed``."""
    best: dict[tuple[str, int], Result] = {}
    for result in (result for result in results if result.config.seed == seed):
        key = (result.config.method, result.config.batch)
        if key not in best or result.accuracy[-1] > best[key].accuracy[-1]:
            best[key] = result
    return best


def step_seconds(run: Run) -> np.ndarray:
    """Wall time between consecutive steps, the first (start-up) left out."""
    return np.diff(np.asarray(run.iterations["wall_time"], dtype=float))


def time_steps(best: dict[tuple[str, int], Result], args: argparse.Namespace) -> dict[tuple[str, int], float]:
    """Each method's time per step over Adam's at the same batch, measured apart from the study.

    On a shared machine the load changes between runs that last minutes, so the runs'
    own step times compare the load as much as the methods.  Here every method's best
    configuration runs ``--timing-steps`` steps, all methods one after the other, in
    ``--timing-rounds`` rounds.  Other jobs only ever add time, so a method's cost is its
    least-disturbed step, the minimum over all its timed steps (as ``timeit`` reports),
    and its ratio is that over Adam's.  Logs: ``OUTDIR/timing/``.
    """
    timing_dir = Path(args.outdir) / "timing"
    timing_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[tuple[str, int], list[float]] = {key: [] for key in best}
    for round_index in range(args.timing_rounds):
        for key, result in sorted(best.items()):
            config = result.config
            path = timing_dir / f"{config.name}.t{round_index}.h5"
            if not args.report_only and not (path.exists() and len(load_run(path).iterations["loss"]) >= 3):
                command = _common.train_command(args.ranks, "--problem", "mnist", "--data-dir", args.data_dir)
                command += ["--model", args.model, "--optimizer", config.optimizer, "--batch-size", str(config.batch)]
                # as many epochs as the steps need, with no evaluation in between
                command += ["--epochs", "1000", "--eval-every", "1000", "--max-steps", str(args.timing_steps)]
                command += ["--seed", str(config.seed)]
                command += ["--out", str(path), "--overwrite", "--quiet", *_common.set_options(config.options)]
                _common.launch(path.stem, command)
            if path.exists():
                seconds[key].extend(step_seconds(load_run(path)).tolist())
    ratios = {}
    for (method, batch), times in seconds.items():
        adam = seconds.get(("adam", batch), [])
        if times and adam:
            ratios[(method, batch)] = min(times) / min(adam)
    return ratios


def report(runs: list[Config], args: argparse.Namespace) -> None:
    outdir = Path(args.outdir)
    header = f"{'run':<28}{'P':>3}{'acc%':>8}{'best%':>8}{'steps':>7}{'wall s':>8}{'s/step':>9}{'traffic':>9}"
    print(header)
    print("-" * len(header))
    results = []
    for config in runs:
        result = read_result(config, outdir)
        if result is None:
            continue
        results.append(result)
        run, acc = result.run, result.accuracy
        print(
            f"{config.name:<28}{run.attributes['world_size']!s:>3}{acc[-1]:>8.2f}{acc.max():>8.2f}"
            f"{result.steps:>7}{result.eval_wall[-1]:>8.0f}{result.seconds_per_step:>9.3f}"
            f"{_common.traffic(run):>8.1f}n"
        )
    best = best_per_method(results, args.seeds[0])
    over_adam = time_steps(best, args) if best and args.timing_steps > 0 else {}
    if best:
        print("\nbest learning rate of each method (final accuracy; time per step over Adam's, --timing-steps):")
        for (method, batch), result in sorted(best.items(), key=lambda item: (-item[0][1], item[0][0])):
            ratio = f"{over_adam[(method, batch)]:.2f}x Adam" if (method, batch) in over_adam else "(not timed)"
            lr = f"lr {result.config.lr:g}" if result.config.lr is not None else "defaults"
            print(f"  batch {batch:>6} {method:<14} {result.accuracy[-1]:6.2f}%  {lr:<10} {ratio}")
    finished = {result.config.name for result in results}
    without_result = [config for config in runs if config.name not in finished]
    write_csv(results, best, over_adam, outdir / "large_batch.csv", without_result)
    if best:
        write_figure(best, outdir / "large_batch.png")
    if len({batch for _method, batch in best}) >= 3:
        report_batch_sizes(best, outdir)
        if len(args.seeds) > 1:
            report_batch_sizes_over_seeds(results, args.seeds, outdir)
    if len(args.seeds) > 1:
        report_seeds(results, without_result, outdir)


@dataclass
class SeedSummary:
    """One configuration's final accuracy over the seeds it ran with."""

    setting: str
    batch: int
    seeds: list[int]
    accuracies: np.ndarray  # final accuracy (%), one per seed
    # seeds whose run left no evaluation (diverged, failed or not run): left out of the mean, and said so
    without_result: list[int] = field(default_factory=list)

    @property
    def spread(self) -> float:
        """The sample standard deviation (NaN for one seed)."""
        return float(np.std(self.accuracies, ddof=1)) if len(self.accuracies) > 1 else float("nan")


def seed_summaries(results: list[Result], without_result: Sequence[Config] = ()) -> list[SeedSummary]:
    """The runs grouped by configuration (the name without its seed), in the study's order.

    The seeds of ``without_result`` (runs that diverged, failed or did not run) are listed in
    their configuration's ``without_result`` instead of silently dropped.
    """
    configs = [result.config for result in results] + list(without_result)
    summaries = {config.setting: SeedSummary(config.setting, config.batch, [], np.array([])) for config in configs}
    for result in results:
        summary = summaries[result.config.setting]
        summary.seeds.append(result.config.seed)
        summary.accuracies = np.append(summary.accuracies, float(result.accuracy[-1]))
    for config in without_result:
        summaries[config.setting].without_result.append(config.seed)
    return list(summaries.values())


def _statistics(summary: SeedSummary) -> tuple[str, str, str, str]:
    """Mean, std, lowest and highest final accuracy as text; empty where no seed finished."""
    acc = summary.accuracies
    if len(acc) == 0:
        return "", "", "", ""
    return f"{acc.mean():.2f}", f"{summary.spread:.2f}", f"{acc.min():.2f}", f"{acc.max():.2f}"


def report_seeds(results: list[Result], without_result: Sequence[Config], outdir: Path) -> None:
    summaries = seed_summaries(results, without_result)
    header = f"{'configuration':<24}{'seeds':>8}{'mean%':>8}{'std':>7}{'lowest%':>9}{'highest%':>10}  no result"
    print(f"\nfinal accuracy over the seeds:\n{header}\n{'-' * len(header)}")
    for summary in summaries:
        mean, std, lowest, highest = _statistics(summary)
        missing = " ".join(f"s{seed}" for seed in summary.without_result)
        print(f"{summary.setting:<24}{len(summary.accuracies):>8}{mean:>8}{std:>7}{lowest:>9}{highest:>10}  {missing}")
    path = outdir / "large_batch_seeds.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        columns = ["configuration", "batch", "seeds", "final_accuracy", "mean", "std", "lowest", "highest"]
        writer.writerow([*columns, "seeds_without_result"])
        for summary in summaries:
            writer.writerow(
                [
                    summary.setting,
                    summary.batch,
                    " ".join(str(seed) for seed in summary.seeds),
                    " ".join(f"{value:.2f}" for value in summary.accuracies),
                    *_statistics(summary),
                    " ".join(str(seed) for seed in summary.without_result),
                ]
            )
    print(f"wrote {path}")
    write_seed_figure(summaries, outdir / "large_batch_seeds.png")


def write_seed_figure(summaries: list[SeedSummary], path: Path) -> None:
    """Every seed's final accuracy (dots), their mean (a bar) and the seeds with no result (×, at the bottom)."""
    plt = _common.pyplot(path)
    if plt is None:
        return

    batches = sorted({summary.batch for summary in summaries}, reverse=True)
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.5), squeeze=False)
    methods = sorted({summary.setting.split(".b")[0] for summary in summaries})
    colors = {method: f"C{index}" for index, method in enumerate(methods)}  # one colour per method in both panels
    for ax, batch in zip(axes[0], batches, strict=True):
        shown = sorted((summary for summary in summaries if summary.batch == batch), key=lambda item: item.setting)
        for x, summary in enumerate(shown):
            acc, color = summary.accuracies, colors[summary.setting.split(".b")[0]]
            if len(acc):
                ax.hlines(acc.mean(), x - 0.3, x + 0.3, color=color, linewidth=2)
            ax.plot(np.full(len(acc), x), acc, "o", color=color, markersize=5)
            labels: dict[float, list[str]] = {}  # seeds that ended at the same accuracy share one label
            for seed, value in zip(summary.seeds, acc, strict=True):
                labels.setdefault(float(value), []).append(f"s{seed}")
            # labels right and left of the dots in turn, so that close values stay readable
            for index, (value, seeds) in enumerate(sorted(labels.items())):
                right = index % 2 == 0
                ax.annotate(
                    " ".join(seeds),
                    (x, value),
                    xytext=(6 if right else -6, -3),
                    textcoords="offset points",
                    fontsize=7,
                    ha="left" if right else "right",
                )
        # a seed with no result is a named cross in a strip below the lowest result, so the mean's gap shows
        missing = any(summary.without_result for summary in shown)
        if missing:
            low, high = ax.get_ylim()
            strip = 0.15 * (high - low)
            ax.set_ylim(low - strip, high)
            for x, summary in enumerate(shown):
                for seed in summary.without_result:
                    ax.plot(x, low - 0.6 * strip, "x", color="k", markersize=7)
                    ax.annotate(
                        f"s{seed}: no result",
                        (x, low - 0.6 * strip),
                        xytext=(6, -3),
                        textcoords="offset points",
                        fontsize=7,
                    )
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels([summary.setting.replace(f".b{batch}", "") for summary in shown], rotation=20, fontsize=8)
        ax.set_ylabel("final validation accuracy (%)")
        what = "\n(bar: mean of the seeds with a result; ×: no result)" if missing else " (bar: mean)"
        ax.set_title(f"batch {batch}: final accuracy of every seed{what}")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def _rate(lr: float | None) -> str:
    """A learning rate in a CSV cell (empty for HF, which has none)."""
    return "" if lr is None else f"{lr:g}"


def write_csv(
    results: list[Result],
    best: dict[tuple[str, int], Result],
    over_adam: dict[tuple[str, int], float],
    path: Path,
    without_result: Sequence[Config] = (),
) -> None:
    """One row per run; ``step_time_over_adam`` is the method's, from :func:`time_steps` (NaN if not timed).

    A run of ``without_result`` (no evaluation: it diverged, failed or did not run) gets a row with
    its status and empty figures, so that the table shows it.
    """
    columns = ["run", "method", "batch", "lr", "seed", "final_accuracy", "best_accuracy", "steps", "wall_s"]
    columns += ["seconds_per_step", "step_time_over_adam", "best_lr_of_method", "traffic_n", "status"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for result in results:
            config = result.config
            ratio = over_adam.get((config.method, config.batch), float("nan"))
            is_best = best.get((config.method, config.batch)) is result
            writer.writerow(
                [
                    config.name,
                    config.method,
                    config.batch,
                    _rate(config.lr),
                    config.seed,
                    f"{result.accuracy[-1]:.2f}",
                    f"{result.accuracy.max():.2f}",
                    result.steps,
                    f"{result.eval_wall[-1]:.1f}",
                    f"{result.seconds_per_step:.4f}",
                    f"{ratio:.3f}",
                    int(is_best),
                    f"{_common.traffic(result.run):.2f}",
                    result.run.status,
                ]
            )
        for config in without_result:
            log = path.parent / f"{config.name}.h5"  # the study's folder, where the CSV goes
            status = load_run(log).status if log.exists() else "no log"
            lr = _rate(config.lr)
            figures = [""] * (len(columns) - 6)  # every column between the seed and the status
            writer.writerow([config.name, config.method, config.batch, lr, config.seed, *figures, status])
    print(f"wrote {path}")


def write_figure(best: dict[tuple[str, int], Result], path: Path) -> None:
    plt = _common.pyplot(path)
    if plt is None:
        return

    batches = sorted({batch for _method, batch in best}, reverse=True)
    # Each batch's axes from 10 points under its worst final accuracy (at most 80 %), so that
    # every method's last epochs show and one batch's diverging runs do not flatten the other's.
    finals = {batch: [float(r.accuracy[-1]) for (_m, b), r in best.items() if b == batch] for batch in batches}
    bottoms = {batch: max(0.0, min(80.0, min(finals[batch]) - 10.0)) for batch in batches}
    fig, axes = plt.subplots(len(batches), 2, figsize=(11, 4 * len(batches)), squeeze=False)
    methods = sorted({method for method, _batch in best})
    colors = {method: f"C{index}" for index, method in enumerate(methods)}  # one colour per method in every panel
    for row, batch in zip(axes, batches, strict=True):
        for (method, b), result in sorted(best.items()):
            if b != batch:
                continue
            lr = f", lr {result.config.lr:g}" if result.config.lr is not None else ""
            label = f"{method}{lr} ({result.accuracy[-1]:.2f} %)"
            style = {"marker": "o", "markersize": 3, "color": colors[method], "label": label}
            row[0].plot(result.eval_steps, result.accuracy, **style)
            row[1].plot(result.eval_wall, result.accuracy, **style)
        for ax, xlabel in zip(row, ("steps", "wall time (s)"), strict=True):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation accuracy (%)")
            ax.set_ylim(bottoms[batch], 100)
            ax.grid(alpha=0.3)
            cut = f"\n(axis from {bottoms[batch]:.1f} %: points below are out of the frame)" if bottoms[batch] else ""
            ax.set_title(f"batch {batch}: accuracy against {xlabel.split(' (')[0]}{cut}", fontsize=10)
        # beside the panels, not over them: inside, a legend hides the curves it names
        row[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


BatchTable = dict[str, dict[int, tuple[float, float]]]  # method → batch → (final %, minus Adam's best)


def by_batch_size(best: dict[tuple[str, int], Result]) -> BatchTable:
    """Each method's final accuracy at its best rate, batch by batch, and that minus Adam's best there.

    The second figure is NaN at a batch where Adam did not run.
    """
    adam = {batch: float(result.accuracy[-1]) for (method, batch), result in best.items() if method == "adam"}
    table: BatchTable = {}
    for (method, batch), result in sorted(best.items()):
        final = float(result.accuracy[-1])
        table.setdefault(method, {})[batch] = (final, final - adam.get(batch, float("nan")))
    return table


def report_batch_sizes(best: dict[tuple[str, int], Result], outdir: Path) -> None:
    """The study as a batch sweep: each method's best final accuracy against the batch size.

    The paper's claim for Neumann (and NLCG's) is about the batch size: no loss of accuracy as it
    grows.  A table (final accuracy, and minus Adam's best in brackets), ``large_batch_sizes.csv``
    (one row per method and batch) and ``large_batch_sizes.png``.
    """
    table = by_batch_size(best)
    batches = sorted({batch for _method, batch in best})
    steps = {batch: next(r.steps for (_m, b), r in best.items() if b == batch) for batch in batches}
    header = f"{'batch (steps)':<16}" + "".join(f"{f'{b} ({steps[b]})':>18}" for b in batches)
    print(f"\nfinal accuracy % at the best rate against the batch size (minus Adam's best):\n{header}")
    print("-" * len(header))
    for method, row in table.items():
        cells = "".join(f"{f'{row[b][0]:.2f} ({row[b][1]:+.2f})' if b in row else '':>18}" for b in batches)
        print(f"{method:<16}{cells}")
    path = outdir / "large_batch_sizes.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "batch", "steps", "lr", "final_accuracy", "minus_adam_best"])
        for method, row in table.items():
            for batch, (final, gap) in sorted(row.items()):
                lr = _rate(best[(method, batch)].config.lr)
                writer.writerow([method, batch, steps[batch], lr, f"{final:.2f}", f"{gap:.2f}"])
    print(f"wrote {path}")
    write_batch_size_figure(table, outdir / "large_batch_sizes.png")


def seed_batch_tables(bests: Mapping[int, dict[tuple[str, int], Result]]) -> dict[int, BatchTable]:
    """:func:`by_batch_size` of every seed, from its :func:`best_per_method`: each method at its
    best rate on that seed, against Adam's best on the same seed (as the goals are judged)."""
    return {seed: by_batch_size(best) for seed, best in bests.items()}


def mean_batch_table(tables: Mapping[int, BatchTable]) -> tuple[BatchTable, dict[tuple[str, int], list[int]]]:
    """The mean over the seeds of each method's final accuracy and of its gap to Adam, batch by batch,
    and the seeds each mean is over (those with a result; a NaN gap, no Adam on that seed, is left out
    of the gap's mean)."""
    finals: dict[tuple[str, int], list[float]] = {}
    gaps: dict[tuple[str, int], list[float]] = {}
    seeds: dict[tuple[str, int], list[int]] = {}
    for seed, table in tables.items():
        for method, row in table.items():
            for batch, (final, gap) in row.items():
                finals.setdefault((method, batch), []).append(final)
                seeds.setdefault((method, batch), []).append(seed)
                if math.isfinite(gap):
                    gaps.setdefault((method, batch), []).append(gap)
    mean: BatchTable = {}
    for method, batch in sorted(finals):
        gap = float(np.mean(gaps[(method, batch)])) if (method, batch) in gaps else float("nan")
        mean.setdefault(method, {})[batch] = (float(np.mean(finals[(method, batch)])), gap)
    return mean, seeds


def report_batch_sizes_over_seeds(results: list[Result], seeds: Sequence[int], outdir: Path) -> None:
    """The batch sweep on every seed: the mean gap to Adam with its lowest and highest over the seeds,
    ``large_batch_sizes_seeds.csv`` (one row per method, batch and seed) and
    ``large_batch_sizes_seeds.png`` (the means as lines, every seed as a dot)."""
    bests = {seed: best_per_method(results, seed) for seed in seeds}
    tables = seed_batch_tables(bests)
    mean, ran = mean_batch_table(tables)
    batches = sorted({batch for row in mean.values() for batch in row})
    print("\nminus Adam's best on the same seed, each seed at its best rate: mean (lowest, highest) [seeds]:")
    header = f"{'batch':<16}" + "".join(f"{batch:>26}" for batch in batches)
    print(f"{header}\n{'-' * len(header)}")
    for method, row in mean.items():
        cells = []
        for batch in batches:
            gaps = [tables[s][method][batch][1] for s in ran.get((method, batch), [])]
            gaps = [gap for gap in gaps if math.isfinite(gap)]
            text = f"{row[batch][1]:+.2f} ({min(gaps):+.2f}, {max(gaps):+.2f}) [{len(gaps)}]" if gaps else ""
            cells.append(f"{text:>26}")
        print(f"{method:<16}{''.join(cells)}")
    path = outdir / "large_batch_sizes_seeds.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "batch", "seed", "lr", "final_accuracy", "minus_adam_best"])
        for seed, best in bests.items():
            for method, row in tables[seed].items():
                for batch, (final, gap) in sorted(row.items()):
                    lr = _rate(best[(method, batch)].config.lr)
                    writer.writerow([method, batch, seed, lr, f"{final:.2f}", f"{gap:.2f}"])
    print(f"wrote {path}")
    write_batch_size_figure(mean, outdir / "large_batch_sizes_seeds.png", tables)


GAP_FLOOR = -10.0  # points below Adam's best where the batch-size figure's right panel stops


def write_batch_size_figure(table: BatchTable, path: Path, seeds: Mapping[int, BatchTable] | None = None) -> None:
    """Final accuracy (left) and the same minus Adam's best (right) against the batch size, log scale.

    With ``seeds`` (seed → that seed's table) ``table`` is their mean, drawn as lines, and every
    seed's point is a dot of its method's colour.
    """
    plt = _common.pyplot(path)
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, (method, row) in enumerate(table.items()):
        ran = sorted(row)  # the batches this method ran at
        style = {"marker": "o", "markersize": 4, "color": f"C{index}", "label": method}
        axes[0].plot(ran, [row[b][0] for b in ran], **style)
        axes[1].plot(ran, [row[b][1] for b in ran], **style)
        # each method's dots a little to the side of the batch, so that two methods' dots
        # (at the floor, or level) do not hide each other
        shift = 1.0 + 0.04 * (index - (len(table) - 1) / 2)
        for seed_table in (seeds or {}).values():
            points = sorted(seed_table.get(method, {}).items())
            dots = {"color": f"C{index}", "alpha": 0.35, "markersize": 6, "linestyle": "none"}
            axes[0].plot([b * shift for b, _ in points], [final for _b, (final, _gap) in points], "o", **dots)
            shown = [(b * shift, gap) for b, (_final, gap) in points if not gap < GAP_FLOOR]
            below = [b * shift for b, (_final, gap) in points if gap < GAP_FLOOR]  # on the floor, pointing down
            axes[1].plot([b for b, _ in shown], [gap for _b, gap in shown], "o", **dots)
            axes[1].plot(below, [GAP_FLOOR] * len(below), "v", **dots)
    axes[1].axhline(0.0, color="k", linewidth=0.8)
    # One method far behind (SGD at 40 steps) would squeeze the others' gaps into a line: the
    # panel stops at GAP_FLOOR and names the value of each point below it, at its foot (a
    # seed's dot below it is a triangle on the floor).
    every = [table, *(seeds or {}).values()]
    gaps = [gap for each in every for row in each.values() for _final, gap in row.values() if math.isfinite(gap)]
    if gaps and min(gaps) < GAP_FLOOR:
        axes[1].set_ylim(GAP_FLOOR - 0.3, max(1.0, max(gaps) + 0.5))
        for index, row in enumerate(table.values()):
            for batch, (_final, gap) in row.items():
                if gap < GAP_FLOOR:
                    axes[1].annotate(
                        f"{gap:.2f} ↓",
                        (batch, GAP_FLOOR),
                        xytext=(0, 4),
                        textcoords="offset points",
                        ha="center",
                        fontsize=8,
                        color=f"C{index}",
                    )
    titles = ("final validation accuracy (%), each method at its best rate", "minus Adam's best at that batch (points)")
    if seeds:
        names = ", ".join(str(seed) for seed in seeds)
        titles = (f"{titles[0]}\n(line: mean over seeds {names}; dots: each seed)", f"{titles[1]}\n(on the same seed)")
    batches = sorted({batch for row in table.values() for batch in row})
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log")
        ax.set_xticks(batches, [str(batch) for batch in batches])  # the batches run, not powers of ten
        ax.minorticks_off()
        ax.set_xlabel("global batch size (log scale)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("validation accuracy (%)")
    axes[1].set_ylabel("points")
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    parser = _common.study_parser(__doc__, "runs/large_batch", METHODS, what="methods")
    parser.set_defaults(runs=",".join(DEFAULT_METHODS))
    parser.add_argument("--methods", dest="runs", default=argparse.SUPPRESS, help="the same as --runs")
    parser.add_argument("--data-dir", default=_common.dataset_dir("mnist-full"))
    parser.add_argument("--batches", type=_common.ints, default="15000,1000")
    parser.add_argument(
        "--lrs", type=parse_lrs, default="", help="learning rates to sweep instead, e.g. adam=1e-3:3e-3,nlcg=0.1"
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--model", default="cnn-small")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=60000, help="training rows (steps per epoch)")
    parser.add_argument("--rerun", action="store_true", help="run again configurations with a completed log")
    parser.add_argument("--timing-steps", type=int, default=0, help="steps of each timing run (0: no timing)")
    parser.add_argument("--timing-rounds", type=int, default=3, help="rounds of timing runs")
    parser.add_argument(
        "--seeds", type=_common.ints, default=None, help="seeds of every configuration, e.g. 0,1,2 (default: --seed)"
    )
    args = parser.parse_args()
    args.seeds = tuple(args.seeds) if args.seeds else (args.seed,)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds has a seed twice: {args.seeds}")
    methods = _common.chosen(parser, args, METHODS, what="methods")
    lrs = {**LEARNING_RATES, **args.lrs}
    batch_lrs = {key: grid for key, grid in BATCH_LEARNING_RATES.items() if key[0] not in args.lrs}  # --lrs wins
    runs = configurations(methods, args.batches, lrs, args.epochs, args.train_size, args.seeds, batch_lrs)
    _common.run_study(args, runs, lambda run: launch_run(run, args), lambda: report(runs, args))


if __name__ == "__main__":
    main()
