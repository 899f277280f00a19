"""APTS-P (docs/algorithms.md §2): the decomposition, the concatenated step, agreement across ranks.

Multi-rank tests run at 1 rank in the serial pass and under ``mpiexec -n 2`` / ``-n 4``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hpcopt.comm import Communicator
from hpcopt.distributed.data_parallel import DistributedObjective
from hpcopt.distributed.decomposition import ParameterDecomposition, linear_partition
from hpcopt.errors import ConfigError
from hpcopt.numerics.flat import FlatParameters
from hpcopt.optimizers import APTSP, make_config
from hpcopt.problems import make_problem
from tests.optimizers.apts_support import outer_start

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_thread")]


def _setup(problem_name: str = "logistic", options: dict | None = None, **apts: object):
    comm = Communicator()
    problem = make_problem(problem_name, seed=0, options=options or {"n": 256, "dim": 12})
    torch.manual_seed(0)
    flat = FlatParameters(problem.build_model())
    objective = DistributedObjective(problem, flat, comm)
    size = len(problem.train) // comm.size
    shard = problem.train.subset(slice(comm.rank * size, (comm.rank + 1) * size))
    objective.set_batch(shard.inputs, shard.targets, size * comm.size, noise_seed=0)
    return comm, flat, objective, APTSP(objective, make_config("apts-p", apts))


# -- the decomposition (pure) ------------------------------------------------------


def test_linear_partition_is_optimal() -> None:
    weights = [5, 1, 9, 2, 2, 7, 3, 1]
    for parts in (1, 2, 3, 4, 8):
        cuts = linear_partition(weights, parts)
        assert cuts[0] == 0 and cuts[-1] == len(weights) and all(a < b for a, b in itertools.pairwise(cuts))
        got = max(sum(weights[a:b]) for a, b in itertools.pairwise(cuts))
        best = min(
            max(sum(weights[a:b]) for a, b in itertools.pairwise((0, *inner, len(weights))))
            for inner in itertools.combinations(range(1, len(weights)), parts - 1)
        )
        assert got == best


def test_decomposition_covers_the_vector_contiguously() -> None:
    names = [f"t{i}" for i in range(6)]
    sizes = [100, 10, 100, 10, 100, 10]
    d = ParameterDecomposition.build(names, sizes, 3, "tensors")
    assert d.mode == "tensors" and d.counts == [110, 110, 110] and d.imbalance == 1.0
    assert d.ranges[0][0] == 0 and d.ranges[-1][1] == sum(sizes)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(d.ranges))
    # Unbalanced tensors: auto falls back to chunks; chunks differ by at most one element.
    d = ParameterDecomposition.build(["big", "small"], [1000, 3], 2, "auto")
    assert d.mode == "chunks" and d.counts == [502, 501]
    assert ParameterDecomposition.build(["big", "small"], [1000, 3], 2, "tensors").imbalance > 1.9
    # Same inputs, same assignment (and signature) — what every rank relies on.
    assert d == ParameterDecomposition.build(["big", "small"], [1000, 3], 2, "auto")
    assert d.signature() == ParameterDecomposition.build(["big", "small"], [1000, 3], 2).signature()


def test_more_ranks_than_blocks_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="only 2 parameter tensors"):
        ParameterDecomposition.build(["w", "b"], [10, 1], 4, "tensors")
    with pytest.raises(ConfigError, match="only 3 parameters"):
        ParameterDecomposition.build(["w", "b"], [2, 1], 4, "auto")
    with pytest.raises(ConfigError, match="blocks mode"):
        ParameterDecomposition.build(["w"], [2], 1, "rows")
    with pytest.raises(ConfigError):
        make_config("apts-p", {"norm": "1"})


@pytest.mark.mpi(min_size=3)
def test_model_with_fewer_tensors_than_ranks_fails_on_every_rank() -> None:
    # The logistic model has two tensors (weight, bias): three or more ranks cannot own them whole.
    with pytest.raises(ConfigError, match="only 2 parameter tensors"):
        _setup(blocks="tensors")
    Communicator().barrier()  # raised before any collective: every rank is still in step


@pytest.mark.mpi(min_size=2)
def test_mismatched_assignment_fails_on_every_rank() -> None:
    comm = Communicator()
    sizes = [40, 40, 40, 40] if comm.rank == 0 else [40, 40, 40, 41]
    decomposition = ParameterDecomposition.build(["a", "b", "c", "d"], sizes, comm.size, "chunks")
    with pytest.raises(ConfigError, match="differs across ranks"):
        decomposition.validate(comm)
    wrong_size = ParameterDecomposition.build(["a"], [40], comm.size + 1, "chunks")
    with pytest.raises(ConfigError, match="communicator has"):
        wrong_size.validate(comm)
    comm.barrier()  # every rank is still in step: no collective was left pending


# -- the optimizer ------------------------------------------------------------------


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("norm", ["2", "inf"])
def test_concatenated_step_is_what_the_owners_computed(norm: str) -> None:
    comm, flat, objective, optimizer = _setup(local_solver="cauchy", local_iterations=2, norm=norm, radius=0.2)
    theta, loss_local, grad_local, grad = outer_start(flat, objective)
    step_r, pred_r, _ = optimizer._block_local_phase(theta, loss_local, grad_local, grad)
    assert torch.equal(flat.data, theta)  # θ_k restored bit for bit
    ball = optimizer.radius / math.sqrt(comm.size) if norm == "2" else optimizer.radius
    assert float(step_r.norm()) <= ball * (1 + 1e-6)
    calls_before = comm.stats.ops.get("allgatherv")
    calls_before = 0 if calls_before is None else calls_before.calls
    step, pred, step_norm, _, counts = optimizer._combined_step(theta, loss_local, grad_local, grad)
    assert comm.stats.ops["allgatherv"].calls == calls_before + 1
    pieces = comm.allgather_object((step_r, pred_r))
    for rank, (piece, _) in enumerate(pieces):
        assert torch.allclose(step[optimizer.decomposition.owned(rank)], piece, rtol=1e-6, atol=0)
    assert pred == pytest.approx(sum(p for _, p in pieces), rel=1e-6)
    assert step.numel() == flat.numel and counts["imbalance"] >= 1.0
    if norm == "2":
        assert step_norm <= optimizer.radius * (1 + 1e-6)
    # With FOC the first Cauchy step on the owned block is along −g restricted to it.
    owned = optimizer.owned
    first = -min(ball, optimizer.radius) * grad[owned] / grad[owned].norm()
    assert float(step_r.dot(first)) > 0


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("local_solver", ["lsr1", "steihaug"])
def test_steps_agree_across_ranks_and_decrease_the_loss(local_solver: str) -> None:
    comm, flat, _, optimizer = _setup(local_solver=local_solver, max_cg_iterations=5)
    losses = []
    for _ in range(6):
        result = optimizer.step()
        losses.append(result.loss)
        decisions = comm.allgather_object((result.accepted, repr(result.ratio), result.radius))
        assert all(d == decisions[0] for d in decisions)
    parameters = comm.allgather_object(flat.clone())
    assert all(torch.equal(p, parameters[0]) for p in parameters)
    assert losses[-1] < losses[0]


def test_apts_p_defaults_are_section_1_where_apts_d_departs_from_it() -> None:
    import dataclasses

    from hpcopt.optimizers import make_config
    from hpcopt.optimizers.apts.apts_d import SECTION_1_OPTIONS

    apts_p, apts_d = make_config("apts-p", {}), make_config("apts-d", {})
    assert {key: getattr(apts_p, key) for key in SECTION_1_OPTIONS} == dict(SECTION_1_OPTIONS)
    # APTS-D departs from §1 in exactly those options, and SECTION_1_OPTIONS undoes every one.
    section_1 = make_config("apts-d", dict(SECTION_1_OPTIONS))
    names = [field.name for field in dataclasses.fields(apts_d)]
    assert {name for name in names if getattr(apts_d, name) != getattr(section_1, name)} == set(SECTION_1_OPTIONS)


@pytest.mark.mpi(min_size=1)
def test_cg_rtol_reaches_both_apts_p_solvers() -> None:
    *_, optimizer = _setup(cg_rtol=0.2, local_solver="steihaug")
    assert optimizer.local_solver.rtol == 0.2 and optimizer.global_solver.rtol == 0.2
