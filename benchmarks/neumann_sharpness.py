"""Neumann at a large batch: the sharpness along its path against the stability bound of its steps.

Run: ``python benchmarks/neumann_sharpness.py --data-dir ../shared/datasets/mnist-full
[--lrs 0.1,0.2,0.3] [--batch 15000] [--epochs 10] [--model cnn-small] [--rows 1000]
[--iterations 20] [--cap 0.9] [--max-steps N] [--every K]``

Between resets the Neumann optimizer (``docs/optimizers/neumann.md``) is a momentum
method, m ← μm − ηd, w ← w + μm − ηd.  On a quadratic with curvature λ along a direction
this recursion is stable if and only if ηλ < 2(1 + μ)/(1 + 2μ) (the Jury conditions of its
2×2 iteration matrix); its SGD burn-in, if and only if lr·λ < 2.

This script trains the optimizer exactly as ``benchmarks/large_batch.py``'s ``neumann``
method does (the same options, computed by that script), in this process on one rank:
the global batches are the same at any rank count, so the losses agree with the
two-rank study's to the digits its run logs show.  Before each step it estimates the
largest eigenvalue λ of the loss Hessian at the stored (displaced) weights, where the
step's gradient is taken, by power iteration (``--iterations`` Hessian-vector products
by double backward, on a fixed ``--rows``-row sample of the training set), and records
the ratio of ηλ to the bound of the step about to be taken: above 1, the sharpest
direction grows instead of shrinking.  ``--every K`` estimates λ at every K-th step only
(the others record nan), ``--max-steps N`` stops after N steps: together they look at a
long burn-in's end at a fraction of the cost.

With ``--cap C`` (a diagnostic, not the paper's method) each step's learning rate is
lowered, where needed, so that the ratio is at most C: ``lr·min(1, C/ratio)``, the ratio
taken at ``lr`` (at a reset, for the momentum step its m feeds).  It asks whether a rate
that follows the sharpness would train: the paper's algorithm has no sharpness estimate.

Output: a line per step, a summary table, ``neumann_sharpness.csv`` (one row per
learning rate and step: ``phase`` (``sgd`` burn-in, ``reset`` or ``neumann``), η, μ, λ,
the ratio, the loss of the step's batch and the step's length) and
``neumann_sharpness.png`` (loss and ratio against the step, one line per learning rate,
the resets marked).
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from math import isfinite, nan
from pathlib import Path

import _common
import large_batch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hpcopt
from hpcopt.distributed.sharding import ShardBatchSampler
from hpcopt.problems.mnist.problem import MODELS, MnistProblem


@dataclass
class StepRecord:
    """One step of one run: the state before it and what it did."""

    lr: float  # the run's learning rate
    step_lr: float  # this step's: below lr where --cap lowered it
    step: int
    phase: str
    eta: float
    mu: float
    sharpness: float  # λ, the largest eigenvalue of the loss Hessian
    ratio: float  # ηλ over the bound of this step; nan at a reset (no move)
    loss: float
    step_norm: float


def stability_ratio(phase: str, eta: float, mu: float, lr: float, sharpness: float) -> float:
    """ηλ over the largest stable ηλ of the Neumann step about to be taken (> 1: the sharpest direction grows)."""
    if phase == "sgd":
        return lr * sharpness / 2.0
    if phase == "reset":
        return float("nan")
    return eta * sharpness * (1.0 + 2.0 * mu) / (2.0 * (1.0 + mu))


def next_phase(opt: hpcopt.Optimizer) -> str:
    """The phase of the optimizer's next step (checked against the phase the step reports)."""
    if opt.steps < opt.config.warmup_steps:
        return "sgd"
    state = opt.state_dict()["optimizer"]  # None before the first step: the first reset ends the burn-in
    next_reset = opt.config.warmup_steps if state is None else state["next_reset"]
    return "reset" if opt.steps == next_reset else "neumann"


def capped_lr(lr: float, cap: float, opt: hpcopt.Optimizer, phase: str, sharpness: float) -> float:
    """``lr``, lowered so that the ratio of the next step (a ``phase`` step) is at most ``cap`` (0: ``lr``)."""
    if cap <= 0:
        return lr
    eta, mu = opt.config.schedule(opt.steps)
    # a reset moves nothing; its m = −ηg is the momentum the next (Neumann) step carries on
    ratio = stability_ratio("neumann" if phase == "reset" else phase, eta, mu, lr, sharpness)
    return lr * min(1.0, cap / ratio) if ratio > 0 else lr


def top_eigenvalue(model: nn.Module, inputs: Tensor, targets: Tensor, iterations: int, seed: int) -> float:
    """The Rayleigh quotient after ``iterations`` power iterations on the loss Hessian at the model's weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator) for p in params]
    estimate = 0.0
    for _ in range(iterations):
        norm = torch.sqrt(torch.stack([(v * v).sum() for v in vector]).sum())
        vector = [v / norm for v in vector]
        loss = F.cross_entropy(model(inputs), targets)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        products = torch.autograd.grad(grads, params, vector)
        estimate = float(sum((h * v).sum() for h, v in zip(products, vector, strict=True)))
        vector = [h.detach() for h in products]
    return estimate


def epoch_batches(sampler: ShardBatchSampler, epochs: int) -> Iterator[list[int]]:
    """The sampler's batches of ``epochs`` epochs in a row, each epoch shuffled as the trainer's."""
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        yield from sampler


def run(lr: float, problem: MnistProblem, args: argparse.Namespace) -> tuple[list[StepRecord], float]:
    """Train ``large_batch.py``'s ``neumann`` at ``lr``; the per-step records and the final accuracy (%)."""
    (config,) = large_batch.configurations(
        ["neumann"], [args.batch], {"neumann": (lr,)}, args.epochs, len(problem.train)
    )
    options = dict(config.options)
    torch.manual_seed(args.seed)  # the trainer's initialisation of the model
    model = MODELS[args.model]()
    opt = hpcopt.optimizer("neumann", model, F.cross_entropy, seed=args.seed, **options)
    train, val = problem.train, problem.val
    sample = torch.randperm(len(train), generator=torch.Generator().manual_seed(123))[: args.rows]
    sample_inputs, sample_targets = train.inputs[sample], train.targets[sample]
    sampler = opt.sampler(len(train), args.batch)
    records: list[StepRecord] = []
    for step, rows in enumerate(islice(epoch_batches(sampler, args.epochs), args.max_steps or None)):
        # λ at the weights the step's gradient is taken at; the step reports its phase, η and μ.
        sharpness = nan
        if step % args.every == 0:
            sharpness = top_eigenvalue(model, sample_inputs, sample_targets, args.iterations, seed=step)
        expected = next_phase(opt)
        opt.config.lr = lr  # the schedule's η at the run's rate, then lowered where --cap says
        opt.config.lr = step_lr = capped_lr(lr, args.cap, opt, expected, sharpness)
        loss = opt.step(train.inputs[rows], train.targets[rows])
        assert opt.last is not None
        phase, eta, mu = opt.last.extras["phase"], opt.last.extras["eta"], opt.last.extras["mu"]
        assert phase == expected, f"step {step}: expected a {expected} step, the optimizer took a {phase} step"
        step_norm = opt.last.step_norm
        ratio = stability_ratio(phase, eta, mu, step_lr, sharpness)
        records.append(StepRecord(lr, step_lr, step, phase, eta, mu, sharpness, ratio, loss, step_norm))
        print(
            f"lr {step_lr:.4g} step {step:3d} {phase:7s} loss {loss:7.4f} step {step_norm:6.3f} "
            f"eta {eta:.4f} mu {mu:.3f} lambda {sharpness:8.2f} ratio {ratio:6.2f}",
            flush=True,
        )
    with opt.evaluation_parameters() as evaluated, torch.no_grad():
        accuracy = float((evaluated(val.inputs).argmax(dim=1) == val.targets).float().mean()) * 100
    return records, accuracy


def write_csv(path: Path, records: list[StepRecord]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["lr", "step_lr", "step", "phase", "eta", "mu", "sharpness", "ratio", "loss", "step_norm"])
        for r in records:
            writer.writerow(
                [
                    r.lr,
                    f"{r.step_lr:.6g}",
                    r.step,
                    r.phase,
                    f"{r.eta:.6g}",
                    f"{r.mu:.4f}",
                    f"{r.sharpness:.4g}",
                    f"{r.ratio:.4g}",
                    f"{r.loss:.5f}",
                    f"{r.step_norm:.5f}",
                ]
            )


def plot(path: Path, records: list[StepRecord], accuracies: dict[float, float], batch: int, cap: float) -> None:
    """Loss against the step above; below, the ratio (or, with ``--cap``, where the ratio is held, λ)."""
    plt = _common.pyplot(path)
    if plt is None:
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7.5), sharex=True)
    for lr, accuracy in accuracies.items():
        rows = [r for r in records if r.lr == lr]
        label = f"lr {lr:g} ({accuracy:.2f} %)"
        (line,) = top.plot([r.step for r in rows], [r.loss for r in rows], marker=".", label=label)
        moving = [r for r in rows if r.ratio > 0]  # a reset's nan and a negative estimate have no place on a log scale
        shown = [r.sharpness if cap > 0 else r.ratio for r in moving]
        bottom.semilogy([r.step for r in moving], shown, marker=".", color=line.get_color(), label=label)
    for step in sorted({r.step for r in records if r.phase == "reset"}):
        for axis in (top, bottom):
            axis.axvline(step, color="0.8", linestyle=":", linewidth=1)
    if cap > 0:
        bottom.set_ylabel("λ, largest eigenvalue of the loss Hessian")
        capped = f", each step's lr lowered to ratio ≤ {cap:g}"
    else:
        bottom.axhline(1.0, color="k", linewidth=1)
        bottom.set_ylabel("ηλ / stable bound of the step")
        capped = ""
    top.set_ylabel("loss of the step's batch")
    top.set_title(f"Neumann at batch {batch}, cnn-small{capped}\n(final accuracy in the legend; dotted: resets)")
    top.legend(fontsize=8)
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=_common.dataset_dir("mnist-full"))
    parser.add_argument("--outdir", default="runs/neumann_sharpness")
    parser.add_argument("--lrs", type=_common.floats, default="0.1,0.2,0.3", help="comma-separated learning rates")
    parser.add_argument("--batch", type=int, default=15000)
    parser.add_argument("--epochs", type=int, default=10)
    # Models without batch norm or dropout: the estimate's forward passes would move batch-norm
    # statistics and draw dropout masks, so the path would no longer be the trainer's.
    parser.add_argument("--model", default="cnn-small", choices=["cnn-small", "mlp"])
    parser.add_argument("--rows", type=int, default=1000, help="training rows of the sharpness estimate")
    parser.add_argument("--iterations", type=int, default=20, help="power iterations per estimate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cap", type=float, default=0.0, help="lower each step's lr to this ratio (0: off)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: the whole run)")
    parser.add_argument("--every", type=int, default=1, help="estimate λ at every this-many-th step only")
    args = parser.parse_args()
    if args.cap < 0:
        parser.error(f"--cap must be >= 0, got {args.cap}")
    if args.max_steps < 0:
        parser.error(f"--max-steps must be >= 0, got {args.max_steps}")
    if args.every < 1:
        parser.error(f"--every must be >= 1, got {args.every}")
    if args.cap > 0 and args.every > 1:
        parser.error("--cap needs λ before every step: leave --every at 1")
    problem = MnistProblem(data_dir=args.data_dir)
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    records: list[StepRecord] = []
    accuracies: dict[float, float] = {}
    for lr in args.lrs:
        found, accuracies[lr] = run(lr, problem, args)
        records += found
    print("\n| lr | final accuracy % | steps with ratio > 1 | largest ratio | largest λ |")
    print("|---|---|---|---|---|")
    for lr, accuracy in accuracies.items():
        moving = [r for r in records if r.lr == lr and r.phase != "reset" and isfinite(r.ratio)]
        over = [str(r.step) for r in moving if r.ratio > 1]
        print(
            f"| {lr:g} | {accuracy:.2f} | {', '.join(over) or 'none'} | "
            f"{max(r.ratio for r in moving):.2f} | {max(r.sharpness for r in moving):.1f} |"
        )
    write_csv(outdir / "neumann_sharpness.csv", records)
    plot(outdir / "neumann_sharpness.png", records, accuracies, args.batch, args.cap)
    print(f"wrote {outdir / 'neumann_sharpness.csv'} and {outdir / 'neumann_sharpness.png'}")


if __name__ == "__main__":
    main()
