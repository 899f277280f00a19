"""PINN study: APTS variants at P ranks vs Adam and L-BFGS at equal wall time.

Every method gets the same wall-clock budget on the same full-batch problem and is
scored by the validation relative L2 error against the exact (Poisson) or
finite-difference reference (Allen–Cahn) solution.

* APTS-D, APTS-P and APTS-IP run as ``mpiexec -n P python -m hpcopt train ... --time-limit``
  (one step per epoch: the batch is the whole collocation set); APTS-D and APTS-P
  also with the second-order global pass (``global_solver=steihaug, curvature=ggn``).
  APTS-IP cuts the network into P pipeline stages that pass Taylor-mode jets of the
  activations (``hpcopt/numerics/jets.py``), so P is at most the model's 4 linear layers.
* Adam runs in one process through ``hpcopt train`` (one rank), at several lrs.
* L-BFGS is ``torch.optim.LBFGS`` (strong Wolfe, history 50) in one process.

Usage::

    python benchmarks/pinn_study.py --budget 60 --ranks 2
    python benchmarks/pinn_study.py --budget 20 --problems poisson2d --adam-lrs 1e-3

Timings depend on the machine's load; the table says what was measured in this run.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import torch
from _common import REPO, run_job, set_options, train_command

from hpcopt.optimizers.apts.apts_d import SECTION_1_OPTIONS

PROBLEMS = {
    "poisson2d": ["--set", "problem.interior=1024", "--set", "problem.boundary=1024"],
    "allen-cahn": [],
}
# The problems' defaults for `hpcopt train` (a target, mini-batches, an evaluation every few
# steps, APTS-D's Gauss-Newton global pass) would change what this study compares, so every
# run is pinned to what it measured: the whole collocation set as the batch, an evaluation
# every step, no target (no relative error reaches 0), and APTS-D's own options.
FULL_BATCH = {"poisson2d": "2048", "allen-cahn": "258"}
PINNED = ["--eval-every", "1", "--target", "0"]
# APTS-D with one global pass and §1's options (its defaults when this study ran); the
# second run swaps the L-SR1 pass for a Gauss–Newton one.
SECTION_1_ONE_PASS = {**SECTION_1_OPTIONS, "global_passes": 1}
APTS_D_OWN = set_options({**SECTION_1_ONE_PASS, "max_cg_iterations": 20})
GAUSS_NEWTON_PASS = {"global_solver": "steihaug", "curvature": "ggn", "max_cg_iterations": 50}
APTS_RUNS = {
    "apts-d": ("apts-d", APTS_D_OWN),
    "apts-d+ggn": ("apts-d", set_options({**SECTION_1_ONE_PASS, **GAUSS_NEWTON_PASS})),
    "apts-p": ("apts-p", []),
    "apts-p+ggn": (
        "apts-p",
        ["--set", "global_solver=steihaug", "--set", "curvature=ggn", "--set", "max_cg_iterations=50"],
    ),
    "apts-ip": ("apts-ip", []),
}
_DONE = re.compile(r"done: (\d+) steps.* in ([\d.]+)s; final val_rel_l2_error ([\d.eE+-]+|nan)")


def _train(problem: str, optimizer: str, extra: list[str], ranks: int, budget: float) -> tuple[float, int, float]:
    """``(relative L2 error, steps, seconds)`` of one ``hpcopt train`` run."""
    command = train_command(ranks, "--problem", problem, "--optimizer", optimizer, "--epochs", "1000000")
    command += ["--time-limit", str(budget), "--batch-size", FULL_BATCH[problem], *PINNED, *PROBLEMS[problem], *extra]
    out = run_job(command, capture_output=True, text=True, cwd=REPO, timeout=budget * 3 + 120)
    match = _DONE.search(out.stdout)
    if match is None:
        raise RuntimeError(f"{optimizer} on {problem} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return float(match.group(3)), int(match.group(1)), float(match.group(2))


def _lbfgs(problem_name: str, budget: float) -> tuple[float, int, float]:
    from hpcopt.problems import make_problem

    options = {k.split("=")[0].removeprefix("problem."): int(k.split("=")[1]) for k in PROBLEMS[problem_name][1::2]}
    problem = make_problem(problem_name, options=options)
    torch.manual_seed(0)
    model = problem.build_model()
    optimizer = torch.optim.LBFGS(
        model.parameters(), lr=1.0, history_size=50, max_iter=20, line_search_fn="strong_wolfe"
    )
    data = problem.train

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = problem.criterion(problem.forward(model, data.inputs), data.targets)
        loss.backward()
        return loss

    start = time.perf_counter()
    steps = 0
    while time.perf_counter() - start < budget:
        optimizer.step(closure)
        steps += optimizer.defaults["max_iter"]
    elapsed = time.perf_counter() - start
    error = problem.eval_metrics(problem.eval_sums(model, problem.val))["val_rel_l2_error"]
    return error, steps, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=60.0, help="wall-clock seconds per method (60)")
    parser.add_argument("--ranks", type=int, default=2, help="P for the APTS runs (2)")
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--methods", nargs="+", default=[*APTS_RUNS, "adam", "lbfgs"])
    parser.add_argument("--adam-lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2])
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows: list[tuple[str, str, float, int, float]] = []
    for problem in args.problems:
        for method in args.methods:
            if method in APTS_RUNS:
                name, extra = APTS_RUNS[method]
                rows.append(
                    (problem, f"{method} P={args.ranks}", *_train(problem, name, extra, args.ranks, args.budget))
                )
            elif method == "adam":
                for lr in args.adam_lrs:
                    result = _train(problem, "adam", ["--set", f"lr={lr}"], 1, args.budget)
                    rows.append((problem, f"adam lr={lr:g}", *result))
            elif method == "lbfgs":
                rows.append((problem, "L-BFGS (1 process)", *_lbfgs(problem, args.budget)))
            print(f"  {rows[-1][0]:<11} {rows[-1][1]:<22} {rows[-1][2]:.3e}", file=sys.stderr, flush=True)

    print(f"\nPINN study: budget {args.budget:g}s per method (stops, and evaluates, after the first step past it)")
    print(f"{'problem':<11} {'method':<22} {'rel L2 error':>12} {'steps':>7} {'seconds':>8}")
    for problem, method, error, steps, seconds in rows:
        print(f"{problem:<11} {method:<22} {error:>12.3e} {steps:>7d} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
