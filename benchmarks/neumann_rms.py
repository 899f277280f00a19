"""Neumann at a large batch with its gradient scaled per coordinate: is the missing scaling the gap to Adam?

Run: ``python benchmarks/neumann_rms.py --data-dir ../shared/datasets/mnist-full
[--rms-lrs 0.003,0.01,0.03] [--neumann-lr 0.2] [--adam-lr 0.01] [--batch 15000] [--epochs 10]
[--model cnn-small] [--set KEY=VALUE ...]``

At batch 15 000 Neumann's rate is held down by the sharpest direction of the loss, which
grows along its path, while Adam divides each coordinate's step by that coordinate's
gradient scale (docs/results-large-batch.md, "What caps Neumann's rate").  This diagnostic runs the
same Neumann optimizer, with ``large_batch.py``'s options, on the gradient divided by its
running root mean square per coordinate, the scaling of Adam's step (β₂ = 0.999 with
Adam's bias correction, ε = 1e-8): ``neumann-rms``.  Everything else is the paper's
algorithm as the study runs it: the burn-in, resets, the μ and η schedules, the
regularisers and the anchor.  It is not the paper's method and not an option of hpcopt's
optimizer; it asks whether that one difference accounts for the gap.

The same process also trains the study's plain ``neumann`` (the control) and Adam, with
the study's options, on one rank: the global batches are the same at any rank count, so
these two reproduce the two-rank study's numbers.

``--set KEY=VALUE`` (repeatable) changes an option of the ``neumann-rms`` runs after the
study's (for instance ``warmup_epochs=0``: no burn-in), to see what each part of the
paper's algorithm around the step costs on the scaled gradient; the controls keep the
study's options.

Output: a line per epoch, a summary table (final accuracy, and its difference from
Adam's), ``neumann_rms.csv`` (one row per run and epoch: validation accuracy and the mean
loss of the epoch's steps) and ``neumann_rms.png`` (validation accuracy against the step,
one line per run).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import _common
import large_batch
import torch
import torch.nn.functional as F
from torch import Tensor

import hpcopt
from hpcopt.config import parse_set
from hpcopt.distributed.data_parallel import DistributedObjective
from hpcopt.errors import ConfigError
from hpcopt.optimizers import OPTIMIZERS
from hpcopt.optimizers.adam import AdamConfig, second_moment_root
from hpcopt.optimizers.neumann import Neumann, NeumannConfig
from hpcopt.problems.mnist.problem import MODELS, MnistProblem

ADAM = AdamConfig()  # its second-moment decay β₂ and ε


class RmsScaledNeumann(Neumann):
    """Neumann's update fed with ĝ / (√v̂ + ε), v̂ Adam's bias-corrected running mean of ĝ²."""

    name = "neumann-rms"

    def __init__(self, objective: DistributedObjective, config: NeumannConfig) -> None:
        super().__init__(objective, config)
        self.second_moment = torch.zeros_like(self.flat.data)
        plain = objective.value_and_grad

        def scaled() -> tuple[float, Tensor]:
            # the reduced gradient, identical on every rank: the state stays replicated
            loss, grad = plain()
            self.second_moment.mul_(ADAM.beta2).addcmul_(grad, grad, value=1 - ADAM.beta2)
            # one gradient a step, taken before the step is counted: this is the (steps + 1)-th
            scale = second_moment_root(self.second_moment, ADAM.beta2, self.steps + 1, ADAM.eps)
            return loss, grad / scale

        objective.value_and_grad = scaled  # type: ignore[method-assign]


@contextlib.contextmanager
def registered() -> Iterator[None]:
    """``neumann-rms`` known to ``hpcopt.optimizer`` for the block: a diagnostic, not an optimizer of hpcopt."""
    OPTIMIZERS[RmsScaledNeumann.name] = RmsScaledNeumann
    try:
        yield
    finally:
        del OPTIMIZERS[RmsScaledNeumann.name]


@dataclass
class Run:
    method: str
    lr: float
    changed: str = ""  # the --set options of a neumann-rms run, as given
    steps: list[int] = field(default_factory=list)  # steps done at each evaluation (after each epoch)
    accuracy: list[float] = field(default_factory=list)  # validation accuracy %, after each epoch
    epoch_loss: list[float] = field(default_factory=list)  # mean loss of the epoch's steps


def train(method: str, lr: float, problem: MnistProblem, args: argparse.Namespace) -> Run:
    """Train ``method`` (``neumann``, ``neumann-rms`` or ``adam``) at ``lr`` with the study's options."""
    study_method = "neumann" if method == "neumann-rms" else method
    (config,) = large_batch.configurations(
        [study_method], [args.batch], {study_method: (lr,)}, args.epochs, len(problem.train)
    )
    changed = parse_set(args.set) if method == "neumann-rms" else {}
    options = config.options | changed  # strings, parsed and checked as --set's are
    torch.manual_seed(args.seed)  # the trainer's initialisation of the model
    model = MODELS[args.model]()
    with registered():  # the optimizer's class is looked up when it is made
        opt = hpcopt.optimizer(method, model, F.cross_entropy, seed=args.seed, **options)
    train_rows, val = problem.train, problem.val
    sampler = opt.sampler(len(train_rows), args.batch)
    run, steps = Run(method, lr, " ".join(f"{key}={value}" for key, value in changed.items())), 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        losses = [opt.step(train_rows.inputs[rows], train_rows.targets[rows]) for rows in sampler]
        steps += len(losses)
        with opt.evaluation_parameters() as evaluated, torch.no_grad():
            accuracy = float((evaluated(val.inputs).argmax(dim=1) == val.targets).float().mean()) * 100
        run.steps.append(steps)
        run.accuracy.append(accuracy)
        run.epoch_loss.append(sum(losses) / len(losses))
        print(
            f"{method} lr {lr:g} epoch {epoch + 1}: step {steps}, loss {run.epoch_loss[-1]:.4f}, "
            f"accuracy {accuracy:.2f} %",
            flush=True,
        )
    return run


def write_csv(path: Path, runs: list[Run]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "lr", "changed", "epoch", "steps", "val_accuracy", "mean_loss"])
        for run in runs:
            for epoch, (steps, accuracy, loss) in enumerate(zip(run.steps, run.accuracy, run.epoch_loss, strict=True)):
                row = [run.method, f"{run.lr:g}", run.changed, epoch + 1, steps, f"{accuracy:.2f}", f"{loss:.5f}"]
                writer.writerow(row)


def plot(path: Path, runs: list[Run], batch: int) -> None:
    plt = _common.pyplot(path)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"adam": "C0", "neumann": "C1", "neumann-rms": "C2"}
    styles = ["-", "--", ":", "-."]
    for run in runs:
        same = [other for other in runs if other.method == run.method]
        ax.plot(
            run.steps,
            run.accuracy,
            marker="o",
            markersize=3,
            color=colors[run.method],
            linestyle=styles[same.index(run) % len(styles)],
            label=f"{run.method}, lr {run.lr:g}{', ' + run.changed if run.changed else ''} ({run.accuracy[-1]:.2f} %)",
        )
    bottom = max(0.0, min(80.0, min(run.accuracy[-1] for run in runs) - 10.0))
    ax.set_ylim(bottom, 100)
    ax.set_xlabel("steps")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"batch {batch}, cnn-small: Neumann on the RMS-scaled gradient (a diagnostic)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=_common.dataset_dir("mnist-full"))
    parser.add_argument("--outdir", default="runs/neumann_rms")
    parser.add_argument(
        "--rms-lrs", type=_common.floats, default="0.003,0.01,0.03", help="comma-separated rates of neumann-rms"
    )
    parser.add_argument("--neumann-lr", type=float, default=0.2, help="the study's best rate of neumann (0: skip)")
    parser.add_argument("--adam-lr", type=float, default=0.01, help="the study's best rate of Adam")
    parser.add_argument("--batch", type=int, default=15000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--model", default="cnn-small", choices=sorted(MODELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="an option of the neumann-rms runs"
    )
    args = parser.parse_args()
    try:
        parse_set(args.set)  # a malformed item stops here, before any training
    except ConfigError as error:
        parser.error(str(error))
    problem = MnistProblem(data_dir=args.data_dir)
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    plan = [("adam", args.adam_lr)]
    plan += [("neumann", args.neumann_lr)] if args.neumann_lr > 0 else []
    plan += [("neumann-rms", lr) for lr in args.rms_lrs]
    runs = [train(method, lr, problem, args) for method, lr in plan]
    adam = runs[0].accuracy[-1]
    print(f"\n| method | lr | changed | final accuracy % | minus Adam's (lr {args.adam_lr:g}) |")
    print("|---|---|---|---|---|")
    for run in runs:
        final = run.accuracy[-1]
        print(f"| {run.method} | {run.lr:g} | {run.changed} | {final:.2f} | {final - adam:+.2f} |")
    write_csv(outdir / "neumann_rms.csv", runs)
    plot(outdir / "neumann_rms.png", runs, args.batch)
    print(f"wrote {outdir / 'neumann_rms.csv'} and {outdir / 'neumann_rms.png'}")


if __name__ == "__main__":
    main()
