"""Optimizers, chosen by name (``--optimizer``): the registry and every optimizer.

Each optimizer is one file with a typed config dataclass and a subclass of
:class:`~hpcopt.optimizers.base.Optimizer`; adding one is its file, one entry in
:data:`OPTIMIZERS` below and its docs page.  Optimizers drive an
:class:`~hpcopt.distributed.objective.Objective` and never call MPI themselves: they may
import :mod:`hpcopt.distributed`, :mod:`hpcopt.comm` (types and the communicator they
are given), :mod:`hpcopt.numerics`, :mod:`hpcopt.kernels`, :mod:`hpcopt.config`,
:mod:`hpcopt.problems` (the interface) and :mod:`hpcopt.testing`, never the trainer,
the log or the CLI.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hpcopt.config import build_config
from hpcopt.distributed.objective import Objective
from hpcopt.errors import ConfigError
from hpcopt.optimizers.adam import Adam, AdamConfig
from hpcopt.optimizers.apts.apts_d import APTSD, APTSDConfig
from hpcopt.optimizers.apts.apts_ip import APTSIP, APTSIPConfig
from hpcopt.optimizers.apts.apts_p import APTSP, APTSPConfig
from hpcopt.optimizers.base import Optimizer, StepResult
from hpcopt.optimizers.hessian_free import HessianFree, HFConfig
from hpcopt.optimizers.neumann import Neumann, NeumannConfig
from hpcopt.optimizers.nlcg import NLCG, NLCGConfig
from hpcopt.optimizers.sgd import SGD, SGDConfig

OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.name: cls for cls in (APTSD, APTSP, APTSIP, SGD, Adam, HessianFree, NLCG, Neumann)
}

# Names taken by optimizers that later versions add; asking for one is a clear error.
RESERVED: tuple[str, ...] = ()


def optimizer_class(name: str) -> type[Optimizer]:
    if name in OPTIMIZERS:
        return OPTIMIZERS[name]
    if name in RESERVED:
        raise ConfigError(f"optimizer '{name}' is planned but not implemented in this version")
    raise ConfigError(f"unknown optimizer '{name}' (choose from {', '.join(OPTIMIZERS)})")


def make_config(name: str, options: Mapping[str, Any]) -> Any:
    """The typed config of optimizer ``name`` from option strings/values (validated)."""
    cls = optimizer_class(name)
    return build_config(cls.config_class, options, what=name)


def make_optimizer(name: str, objective: Objective, config: Any) -> Optimizer:
    return optimizer_class(name)(objective, config)


__all__ = [
    "APTSD",
    "APTSIP",
    "APTSP",
    "NLCG",
    "OPTIMIZERS",
    "SGD",
    "APTSDConfig",
    "APTSIPConfig",
    "APTSPConfig",
    "Adam",
    "AdamConfig",
    "HFConfig",
    "HessianFree",
    "NLCGConfig",
    "Neumann",
    "NeumannConfig",
    "Optimizer",
    "SGDConfig",
    "StepResult",
    "make_config",
    "make_optimizer",
    "optimizer_class",
]
