"""Cost of one curvature-vector product relative to one gradient, as a Krylov solve pays it.

For each model (by default an MLP 784-128-64-10 and the MNIST ``cnn-small``; ``--models``
adds the thesis ``cnn``) and batch size (``--batch``, default 256), with a cross-entropy
loss on random data, the script times, as medians over ``--repeats`` runs:

* ``gradient``: one forward + backward (``LocalObjective.value_and_grad``);
* for each curvature kind, a Krylov-style use: ``value_grad_and_curvature`` once
  (``setup``: it yields the gradient too, as on the HF / Steihaug hot path) and then
  ``--products`` products (``per product``);
* ``ggn (double-vjp)``: the Gauss–Newton operator with its generic ``J v``
  (``LocalObjective.layer_chain = False``); ``ggn`` takes ``J v`` through the layer
  chain where the model is one (both models by default are), and a row
  ``ggn: chain / double-vjp`` gives the set-up and product time of the one over the other.

Ratios are to the gradient time measured in the same run.  The fastest Hessian
variant over a whole solve (setup + products) is the one ``parse_curvature("hessian")``
should name; the footer says whether it does.  One thread by default, because hpcopt
runs one MPI rank per core.  ``--device cuda`` times on the GPU (synchronising before
every clock read); ``--json FILE`` also writes every figure to FILE.

Usage::

    python benchmarks/hvp_cost.py [--repeats N] [--threads T] [--products K] [--batch 256,2000]
        [--models mlp,cnn-small,cnn] [--device cpu|cuda] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import _common
import torch
from torch import Tensor, nn

from hpcopt.numerics.curvature import (
    DEFAULT_HESSIAN,
    CurvatureKind,
    CurvatureOperator,
    LocalObjective,
    _ForwardOverReverseHVP,
)
from hpcopt.numerics.flat import FlatParameters
from hpcopt.problems import models as hpcopt_models

LINEARIZE = "hvp-forward (linearize)"
# The Gauss–Newton operator with J v by the double-vjp trick, as before the layer chain.
GENERIC_GGN = "ggn (double-vjp)"


def mlp() -> tuple[nn.Module, tuple[int, ...]]:
    """784→128→64→10 with ReLU, on flattened 28×28 inputs."""
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    return model, (784,)


def cnn_small() -> tuple[nn.Module, tuple[int, ...]]:
    """The MNIST ``cnn-small``: two conv5/ReLU/maxpool2 stages, then 512→64→10."""
    model = nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip
    return model, (1, 28, 28)


def cnn() -> tuple[nn.Module, tuple[int, ...]]:
    """The thesis MNIST ``cnn`` (``hpcopt.problems.models.cnn``: conv/BN/ReLU/pool ×3, 1152→256→10, dropout)."""
    return hpcopt_models.cnn(), (1, 28, 28)


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {"mlp": mlp, "cnn-small": cnn_small, "cnn": cnn}


def plain_forward(net: Callable[[Tensor], Tensor], inputs: Tensor) -> Tensor:
    return net(inputs)


def no_sync() -> None:
    """CPU work is done when the call returns."""


def timed(fn: Callable[[], object], sync: Callable[[], None] = no_sync) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def curvature_operator(objective: LocalObjective, kind: CurvatureKind) -> CurvatureOperator:
    """Gradient pass + the objective's own operator of ``kind``."""
    return objective.value_grad_and_curvature(kind)[2]


def linearized_operator(objective: LocalObjective) -> CurvatureOperator:
    """Gradient pass + a ``torch.func.linearize``-based forward-over-reverse operator."""
    objective.value_and_grad()
    return _ForwardOverReverseHVP(
        objective._forward_mode_loss(objective.flat.buffer_snapshot()),
        objective.flat.clone(),
        objective.targets,
        objective._seeded_rng(),
        damping=0.0,
        linearize=True,
    )


def generic_ggn_operator(objective: LocalObjective) -> CurvatureOperator:
    """The Gauss–Newton operator with the generic double-vjp ``J v`` (no layer chain)."""
    objective.layer_chain = False
    try:
        return objective.value_grad_and_curvature(CurvatureKind.GGN)[2]
    finally:
        objective.layer_chain = True


def measure(
    objective: LocalObjective,
    repeats: int,
    products: int,
    with_linearize: bool,
    sync: Callable[[], None] = no_sync,
) -> dict[str, tuple[float, float]]:
    """``{variant: (median setup seconds, median seconds per product)}``, plus ``gradient``.

    ``sync`` waits for the device (``torch.cuda.synchronize`` on a GPU) before each clock read.
    """
    numel = objective.flat.numel
    vectors = [torch.randn(numel, device=objective.flat.device) for _ in range(products)]
    objective.value_and_grad()  # warm-up: allocator, first-call dispatch
    sync()
    # Gradient timings are interleaved with every variant's runs, so that drift on a
    # shared machine moves numerator and denominator of the ratios together.
    gradients = [timed(objective.value_and_grad, sync) for _ in range(repeats)]
    builders: dict[str, Callable[[], CurvatureOperator]] = {
        kind.value: partial(curvature_operator, objective, kind) for kind in CurvatureKind
    }
    builders[GENERIC_GGN] = lambda: generic_ggn_operator(objective)
    if with_linearize:
        builders[LINEARIZE] = lambda: linearized_operator(objective)
    results: dict[str, tuple[float, float]] = {}
    for name, build in builders.items():
        # Warm-up build (forward-mode decompositions load on first use); the
        # linearize tracer costs ~0.5 s per build, so it gets fewer repeats.
        build()(vectors[0])
        sync()
        runs = min(repeats, 3) if name == LINEARIZE else repeats
        setups, per_product = [], []
        for _ in range(runs):
            start = time.perf_counter()
            operator = build()
            sync()
            setups.append(time.perf_counter() - start)
            start = time.perf_counter()
            for v in vectors:
                operator(v)
            sync()
            per_product.append((time.perf_counter() - start) / products)
            gradients.append(timed(objective.value_and_grad, sync))
        results[name] = (statistics.median(setups), statistics.median(per_product))
    results["gradient"] = (statistics.median(gradients), float("nan"))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per entry (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (hpcopt: 1 per rank)")
    parser.add_argument("--products", type=int, default=10, help="products per Krylov-style solve")
    parser.add_argument(
        "--batch", type=_common.ints, default="256", help="batch sizes, comma-separated (e.g. 256,2000)"
    )
    parser.add_argument("--models", default="mlp,cnn-small", help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--no-linearize", action="store_true", help="skip the torch.func.linearize variant")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    batches: list[int] = args.batch
    names = [name for name in args.models.split(",") if name]
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no GPU")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else no_sync
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, threads={args.threads}"
    header = (
        f"{'model':<10} {'batch':>6} {'variant':<26} {'setup ms':>9} {'/grad':>6} {'prod ms':>8} {'/grad':>6} "
        f"{'solve/grad':>10}"
    )
    print(
        f"torch {torch.__version__}, {where}, batch {args.batch}, "
        f"{args.products} products per solve, median of {args.repeats}"
    )
    print("setup = value_grad_and_curvature (gradient included); solve = setup + products")
    print(header)
    print("-" * len(header))
    hessian_totals: dict[str, float] = {}
    records: list[dict[str, Any]] = []
    for model_name in names:
        for batch in batches:
            model, shape = MODELS[model_name]()
            flat = FlatParameters(model.to(device))
            inputs = torch.randn(batch, *shape, device=device)
            targets = torch.randint(0, 10, (batch,), device=device)
            objective = LocalObjective(flat, plain_forward, nn.functional.cross_entropy, inputs, targets)
            results = measure(objective, args.repeats, args.products, not args.no_linearize, sync)
            gradient = results.pop("gradient")[0]
            print(f"{model_name:<10} {batch:>6} {'gradient':<26} {gradient * 1e3:>9.2f} {1.0:>6.2f}")
            record: dict[str, Any] = {
                "model": model_name,
                "batch": batch,
                "parameters": flat.numel,
                "gradient_s": gradient,
                "variants": {},
            }
            for name, (setup, product) in results.items():
                solve = (setup + args.products * product) / gradient
                print(
                    f"{model_name:<10} {batch:>6} {name:<26} {setup * 1e3:>9.2f} {setup / gradient:>6.2f} "
                    f"{product * 1e3:>8.2f} {product / gradient:>6.2f} {solve:>10.2f}"
                )
                record["variants"][name] = {
                    "setup_s": setup,
                    "product_s": product,
                    "setup_over_gradient": setup / gradient,
                    "product_over_gradient": product / gradient,
                    "solve_over_gradient": solve,
                }
                if name not in (CurvatureKind.GGN.value, GENERIC_GGN):
                    hessian_totals[name] = hessian_totals.get(name, 0.0) + solve
            records.append(record)
            chain, generic = results[CurvatureKind.GGN.value], results[GENERIC_GGN]
            print(
                f"{model_name:<10} {batch:>6} {'ggn: chain / double-vjp':<26} {chain[0] / generic[0]:>16.2f} "
                f"{chain[1] / generic[1]:>15.2f}"
            )
    fastest = min(hessian_totals, key=hessian_totals.__getitem__)
    print("-" * len(header))
    print(f"fastest Hessian product over all models and batches (sum of solve/grad): {fastest}")
    verdict = "agrees" if fastest == DEFAULT_HESSIAN.value else "DISAGREES: update DEFAULT_HESSIAN"
    print(f'parse_curvature("hessian") -> {DEFAULT_HESSIAN.value} ({verdict})')
    if args.json is not None:
        report = {
            "device": str(device),
            "where": where,
            "torch": str(torch.__version__),
            "products": args.products,
            "repeats": args.repeats,
            "results": records,
            "fastest_hessian": fastest,
            "default_hessian": DEFAULT_HESSIAN.value,
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
