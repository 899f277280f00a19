"""Trust-region building blocks: radius policy, subproblem solvers, L-SR1, the loop.

See docs/algorithms.md §0.  Everything here works against ``matvec`` and ``dot`` callables
and plain floats, so the same code runs serially and inside distributed optimizers; it
may import torch, :mod:`hpcopt.errors`, :mod:`hpcopt.kernels` and the Krylov solvers.
"""

from hpcopt.numerics.trust_region.loop import (
    IterationRecord,
    LoopResult,
    TrustRegionModel,
    minimize_trust_region,
    trust_region_loop,
)
from hpcopt.numerics.trust_region.lsr1 import LSR1Operator
from hpcopt.numerics.trust_region.nonmonotone import ReferenceWindow
from hpcopt.numerics.trust_region.radius import Decision, RadiusPolicy, decide
from hpcopt.numerics.trust_region.subproblem import (
    CauchySolver,
    LSR1Solver,
    SteihaugSolver,
    SubproblemResult,
    SubproblemSolver,
    make_subproblem_solver,
)
from hpcopt.numerics.trust_region.subspace import SubspaceSolver, small_trust_region

__all__ = [
    "CauchySolver",
    "Decision",
    "IterationRecord",
    "LSR1Operator",
    "LSR1Solver",
    "LoopResult",
    "RadiusPolicy",
    "ReferenceWindow",
    "SteihaugSolver",
    "SubproblemResult",
    "SubproblemSolver",
    "SubspaceSolver",
    "TrustRegionModel",
    "decide",
    "make_subproblem_solver",
    "minimize_trust_region",
    "small_trust_region",
    "trust_region_loop",
]
