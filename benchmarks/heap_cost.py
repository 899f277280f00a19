"""What ``--heap keep`` and glibc's huge-page tunable save: a gradient and Gauss–Newton products under each.

Three modes: ``release`` (glibc's defaults: ``--heap release``, the default), ``keep`` (``--heap
keep``) and ``hugetlb`` (``--heap release`` in a process started with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``).  Each runs in its own process (the settings
are process-wide), one thread, on random MNIST-shaped data (``--rows`` rows, ``--model`` of the MNIST problem): the
median time of a gradient (``LocalObjective.value_and_grad``) and of a Gauss–Newton
operator's set-up plus ``--products`` products, over ``--repeats`` runs, with the
process's system time, minor page faults and peak resident memory.  The modes
alternate ``--rounds`` times and each figure is the median over rounds, so a load
that comes and goes touches both.

Usage::

    python benchmarks/heap_cost.py [--model cnn] [--rows 1000] [--repeats 3] [--products 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

MODES = ("release", "keep", "hugetlb")
HUGETLB = "glibc.malloc.hugetlb=1"


def measure(args: argparse.Namespace) -> dict[str, float]:
    """One process's figures under ``args.mode`` (the child's side)."""
    import torch

    from hpcopt.numerics.curvature import LocalObjective
    from hpcopt.numerics.flat import FlatParameters
    from hpcopt.problems.mnist.problem import MODELS
    from hpcopt.training.heap import set_heap

    set_heap("keep" if args.mode == "keep" else "release")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    flat = FlatParameters(MODELS[args.model]())
    inputs = torch.randn(args.rows, 1, 28, 28)
    targets = torch.randint(0, 10, (args.rows,))
    objective = LocalObjective(flat, lambda net, x: net(x), torch.nn.functional.cross_entropy, inputs, targets)
    vector = torch.randn(flat.numel)

    def median_seconds(work: Callable[[], object]) -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            work()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def products() -> None:
        operator = objective.curvature("ggn")
        for _ in range(args.products):
            operator(vector)

    before = resource.getrusage(resource.RUSAGE_SELF)
    gradient = median_seconds(objective.value_and_grad)
    ggn = median_seconds(products)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "gradient_s": gradient,
        "ggn_s": ggn,
        "system_s": after.ru_stime - before.ru_stime,
        "user_s": after.ru_utime - before.ru_utime,
        "minor_faults": float(after.ru_minflt - before.ru_minflt),
        "max_rss_gb": after.ru_maxrss / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=("mlp", "cnn-small", "cnn"))
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--products", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # the child's side
    args = parser.parse_args()
    if args.mode is not None:
        print(json.dumps(measure(args)))
        return
    figures: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            child = [sys.executable, __file__, "--mode", mode, *sys.argv[1:]]
            env = dict(os.environ)
            if mode == "hugetlb":
                env["GLIBC_TUNABLES"] = HUGETLB
            else:
                env.pop("GLIBC_TUNABLES", None)
            out = subprocess.run(child, capture_output=True, text=True, check=True, env=env)
            figures[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = ("gradient_s", "ggn_s", "system_s", "user_s", "minor_faults", "max_rss_gb")
    medians = {mode: {key: statistics.median(f[key] for f in figures[mode]) for key in keys} for mode in MODES}
    print(f"{args.model}, {args.rows} rows, 1 thread; GGN = set-up + {args.products} products; median of {args.rounds}")
    print(f"{'':<14}{'release':>12}{'keep':>12}{'hugetlb':>12}{'release/keep':>14}{'release/hugetlb':>17}")
    for key in keys:
        release, keep, huge = (medians[mode][key] for mode in MODES)
        ratios = [f"{release / other:.2f}" if other else "-" for other in (keep, huge)]
        print(f"{key:<14}{release:>12.3f}{keep:>12.3f}{huge:>12.3f}{ratios[0]:>14}{ratios[1]:>17}")


if __name__ == "__main__":
    main()
