"""hpcopt: MPI-native distributed trust-region and second-order optimizers for neural networks.

The public Python API (see ``docs/custom-problems.md``)::

    import hpcopt

    problem = hpcopt.problem(model, loss, train=(x, y), val=(xv, yv), metric="accuracy")
    result = hpcopt.train(problem, optimizer="apts-d", epochs=10, batch_size=1000, out="run.h5")

    opt = hpcopt.optimizer("apts-d", model, loss)   # for a training loop of your own
    loss_before = opt.step(inputs, targets)         # each rank passes its shard

Names are imported on first use, so ``import hpcopt`` (and ``hpcopt --version``)
stays fast and does not import torch or MPI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "Problem": "hpcopt.api.problem",
    "problem": "hpcopt.api.problem",
    "train": "hpcopt.api.train",
    "TrainResult": "hpcopt.api.train",
    "optimizer": "hpcopt.api.optimizer",
    "Optimizer": "hpcopt.api.optimizer",
    "ShardBatchSampler": "hpcopt.distributed.sharding",
}

__all__ = [
    "Optimizer",
    "Problem",
    "ShardBatchSampler",
    "TrainResult",
    "__version__",
    "optimizer",
    "problem",
    "train",
]

if TYPE_CHECKING:
    from hpcopt.api.optimizer import Optimizer, optimizer
    from hpcopt.api.problem import Problem, problem
    from hpcopt.api.train import TrainResult, train
    from hpcopt.distributed.sharding import ShardBatchSampler


assert set(__all__) == {"__version__", *_EXPORTS}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hpcopt' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
