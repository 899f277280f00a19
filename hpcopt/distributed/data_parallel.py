"""The global objective f(θ) = mean loss over a global mini-batch split across ranks.

Each rank holds its shard B_r of the current global batch B.  The global value and
gradient are one packed allreduce of ``[w_r·g_r ; w_r·f_r]`` with
``w_r = |B_r|/|B|``, so the sum over ranks is ``[g ; f]`` directly.

Two details make repeated evaluations on one batch comparable, which a
trust-region ratio needs:

* dropout draws the same mask for every evaluation on the same batch (the RNG is
  re-seeded from the batch's seed before each forward), so f(θ_k) and f(θ_k+s)
  differ only because θ differs;
* value-only evaluations (trial points) do not move batch-norm running statistics;
  only gradient evaluations do, as in ordinary training.

The global curvature product ``Σ_r w_r B_r v`` is :class:`DistributedCurvature`, the
one operator of Hessian-free's Krylov solves and of the APTS global pass.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from hpcopt.comm import Communicator, PackedBuffer
from hpcopt.numerics.curvature import CurvatureKind, CurvatureOperator, LocalObjective
from hpcopt.numerics.flat import FlatParameters
from hpcopt.problems.base import Problem
from hpcopt.testing import faults


@contextlib.contextmanager
def _frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        # momentum 0 keeps running = (1-0)·running + 0·batch: statistics unchanged.
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


class DistributedObjective:
    """Value, gradient and curvature of the global mini-batch loss.

    Args:
        problem: defines the forward map and the loss.
        flat: the model's flat parameters (identical on every rank).
        comm: the communicator over which the batch is sharded.
    """

    def __init__(self, problem: Problem, flat: FlatParameters, comm: Communicator) -> None:
        self.problem = problem
        self.flat = flat
        self.comm = comm
        self.model = flat.model
        self._stochastic = any(isinstance(m, nn.modules.dropout._DropoutNd) for m in self.model.modules())
        self._packed = PackedBuffer(flat.numel, 1, dtype=flat.dtype, device=flat.device)
        # Same dtype as the packed loss, so f(θ_k) and f(θ_k+s) are rounded alike.
        self._scalar = torch.zeros(1, dtype=flat.dtype, device=flat.device)
        self._local: LocalObjective | None = None
        self.weight = 1.0
        self.noise_seed = 0
        self.evaluations = 0  # local forward passes, for cost accounting
        self.step = 0  # 1-based global step, set by the trainer (fault injection only)

    @property
    def numel(self) -> int:
        return self.flat.numel

    def set_batch(self, inputs: torch.Tensor, targets: torch.Tensor, global_size: int, noise_seed: int) -> None:
        """Make ``(inputs, targets)`` this rank's shard of a global batch of ``global_size`` rows."""
        self.weight = inputs.shape[0] / global_size
        self.noise_seed = noise_seed
        self._local = LocalObjective(self.flat, self.problem.forward, self.problem.criterion, inputs, targets)

    @property
    def local(self) -> LocalObjective:
        if self._local is None:
            raise RuntimeError("set_batch() must be called before evaluating the objective")
        return self._local

    @contextlib.contextmanager
    def local_rows(self, rows: LocalObjective) -> Iterator[None]:
        """Make the local methods (``local_value``… and ``local_curvature``) evaluate ``rows``.

        ``rows``: a local objective on some of this shard's rows (APTS-D's
        ``local_fraction``).  Only the local methods may be called meanwhile: a global
        value or gradient would reduce a part of the shard as if it were all of it.
        """
        shard = self.local
        self._local = rows
        try:
            yield
        finally:
            self._local = shard

    @contextlib.contextmanager
    def _same_noise(self) -> Iterator[None]:
        if not self._stochastic:
            yield
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.noise_seed)
            yield

    def comm_buffer(self, scalars: int = 1) -> PackedBuffer:
        """A packed ``[n-vector; scalars]`` buffer for one collective of an optimizer."""
        return PackedBuffer(self.flat.numel, scalars, dtype=self.flat.dtype, device=self.flat.device)

    # -- local (no communication) -------------------------------------------

    def local_value(self) -> float:
        """f_r at the current parameters (trial evaluation: BN statistics untouched)."""
        self.evaluations += 1
        with self._same_noise(), _frozen_batchnorm_stats(self.model):
            value = self.local.value()
        return faults.inject("trial", self.comm.rank, self.step, value)

    def local_value_then_grad(self) -> tuple[float, Callable[[], torch.Tensor]]:
        """f_r now and a function that returns g_r (``flat.grad``) later: see :meth:`LocalObjective.value_then_grad`."""
        self.evaluations += 1
        with self._same_noise():
            value, finish = self.local.value_then_grad()
        return faults.inject("gradient", self.comm.rank, self.step, value), finish

    def local_value_and_grad(self) -> tuple[float, torch.Tensor]:
        """f_r and g_r at the current parameters; g_r is ``flat.grad`` (no copy)."""
        self.evaluations += 1
        with self._same_noise():
            value, grad = self.local.value_and_grad()
        return faults.inject("gradient", self.comm.rank, self.step, value), grad

    def local_curvature(self, kind: CurvatureKind, damping: float = 0.0) -> CurvatureOperator:
        """The local curvature operator B_r at the current parameters."""
        faults.inject("curvature", self.comm.rank, self.step)
        with self._same_noise():
            return self.local.curvature(kind, damping=damping)

    # -- global (one collective each) ----------------------------------------

    def reduce_value_and_grad(self, local_loss: float, local_grad: torch.Tensor) -> tuple[float, torch.Tensor]:
        """One allreduce(n+1) of [w_r·g_r; w_r·f_r] → (f, g); ``g`` is a view of an internal buffer."""
        packed = self._packed
        torch.mul(local_grad, self.weight, out=packed.vector)
        packed.scalars[0] = self.weight * local_loss
        self.comm.allreduce_(packed.data)
        return float(packed.scalars[0]), packed.vector

    def value_and_grad(self) -> tuple[float, torch.Tensor]:
        """Global f and g at the current parameters; ``g`` is overwritten by the next call."""
        return self.reduce_value_and_grad(*self.local_value_and_grad())

    def reduce_value(self, local_loss: float) -> float:
        """One allreduce of the single scalar w_r·f_r → f."""
        self._scalar[0] = self.weight * local_loss
        self.comm.allreduce_(self._scalar)
        return float(self._scalar[0])

    def value(self) -> float:
        """Global f at the current parameters (trial evaluation)."""
        return self.reduce_value(self.local_value())

    def curvature(self, kind: CurvatureKind) -> DistributedCurvature:
        """The global curvature B = Σ_r w_r B_r at the current parameters on the whole batch."""
        return DistributedCurvature(self, self.local_curvature(kind), self.weight)


class DistributedCurvature:
    """``v ↦ (Σ_r w_r B_r v) + λv``: one allreduce(n) per product, nothing else.

    Every Krylov vector is replicated, so the product is the only collective a
    solve needs.  With ``watch_negative`` it also watches every product for negative
    curvature: the Rayleigh quotient ``κ = vᵀBv/vᵀv`` of the undamped B (local dots
    of replicated vectors) and the most negative direction met so far are kept, so
    any Krylov solver reports negative curvature without knowing about it.

    Args:
        objective: the communicator and the layout of the product buffer.
        local: this rank's B_r, or ``None`` when it has no rows in the curvature
            batch (it still joins every allreduce, with zeros).
        weight: w_r, this rank's share of the rows B is taken over; read at every
            product, so a caller may rescale it.
        damping: λ (0: none).
        watch_negative: track negative curvature (costs two local dots per product).

    Attributes:
        products: collectives (products) taken so far.
        negative_direction: the vector with the most negative κ, or None.
        negative_curvature: that κ (0.0 when none).
    """

    def __init__(
        self,
        objective: DistributedObjective,
        local: CurvatureOperator | None,
        weight: float,
        damping: float = 0.0,
        *,
        watch_negative: bool = False,
    ) -> None:
        self.comm = objective.comm
        self.local = local
        self.weight = weight
        self.damping = damping
        self.watch_negative = watch_negative
        self.buffer = objective.comm_buffer(scalars=0)
        self.products = 0
        self.negative_direction: torch.Tensor | None = None
        self.negative_curvature = 0.0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        vector = self.buffer.vector
        if self.local is None:
            vector.zero_()
        else:
            torch.mul(self.local(v), self.weight, out=vector)
        self.comm.allreduce_(self.buffer.data)
        self.products += 1
        product = vector.clone()
        if self.watch_negative:
            self._watch(v, product)
        if self.damping:
            product.add_(v, alpha=self.damping)
        return product

    def quadratic_form(self, v: torch.Tensor) -> float:
        """``vᵀ(Σ_r w_r B_r)v + λ‖v‖²`` with one allreduce of one scalar, not of n floats.

        A line search needs only the curvature along v, and vᵀBv = Σ_r w_r·vᵀB_r v, so
        each rank reduces its own number (``v`` is replicated).  Not watched for
        negative curvature.
        """
        local = 0.0 if self.local is None else self.weight * self.local.quadratic_form(v)
        (total,) = self.comm.allreduce_scalars([local])
        self.products += 1
        return total + self.damping * float(torch.dot(v, v))

    def _watch(self, v: torch.Tensor, product: torch.Tensor) -> None:
        vv = float(torch.dot(v, v))
        vbv = float(torch.dot(v, product))
        # Relative threshold: a PSD operator may show -1e-9-sized quotients by rounding.
        if vv > 0 and vbv < -1e-6 * math.sqrt(vv) * float(product.norm()):
            kappa = vbv / vv
            if kappa < self.negative_curvature:
                self.negative_curvature = kappa
                self.negative_direction = v.detach().clone()
