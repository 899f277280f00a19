"""A ``nn.Sequential`` cut into pipeline stages, one per rank, with micro-batched forward/backward.

Rank r holds stage r: a run of consecutive layers, balanced by parameter count
(:func:`stage_bounds`).  No rank holds another stage's parameters.  Activations go
forward r → r+1 and their gradients back r+1 → r as point-to-point messages
(``Communicator.isend``/``recv_``), each a small int64 shape header followed by the
payload.  The batch is split into micro-batches (GPipe schedule: all forwards, then
all backwards), so stage r+1 works on micro-batch m while stage r computes m+1.

The loss is computed on the last stage only; every criterion is a mean over rows,
so micro-batch m contributes ``criterion(...) · |m|/|B|`` and the stage gradients
accumulate to exactly the full-batch gradient.

For the local phase of APTS-IP (docs/algorithms.md §3) a gradient pass caches, per
stage, the stage's input (detached) and — except on the last stage — the gradient
of the loss w.r.t. the stage's output.

What crosses the stages is a :class:`Payload`: the activations themselves
(:class:`Activations`, for problems whose forward is the network), or for a PINN the
Taylor-mode jet of the activations (:class:`JetPayload`, :mod:`hpcopt.numerics.jets`), since
its loss differentiates the network w.r.t. its inputs and no rank holds the network.

With data parallelism on top, the P ranks form ``stages × replicas``
(:class:`PipelineLayout`): each replica is a whole pipeline, and a :class:`Pipeline`
is given the communicator of its replica's stages only.

:class:`PipelineObjective` is APTS-IP's objective: this rank's stage, its replica's
shard of the batch and the collectives over the pipeline and replica communicators.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, cast

import torch
from torch import Tensor, nn

from hpcopt.comm import Communicator, PackedBuffer, PointToPointRequest
from hpcopt.distributed.decomposition import linear_partition
from hpcopt.errors import ConfigError
from hpcopt.numerics.flat import FlatParameters
from hpcopt.numerics.jets import apply_to_jet, input_jet, scalar_jet
from hpcopt.problems.base import JetProblem, Problem

FORWARD_TAG = 11
BACKWARD_TAG = 12
_HEADER = 8  # int64 slots: ndim, then up to 7 dimensions

Criterion = Callable[[Tensor, Tensor], Tensor]
Net = Callable[[Tensor], Tensor]


class Payload(Protocol):
    """How a batch enters the first stage, crosses each stage and leaves the last one."""

    def encode(self, inputs: Tensor) -> Tensor:
        """The first stage's input tensor for input rows ``inputs`` (batch first)."""
        ...

    def apply(self, net: Net, tensor: Tensor) -> Tensor:
        """A stage's output tensor; ``net`` is the stage (or a functional stand-in for it)."""
        ...

    def decode(self, tensor: Tensor, inputs: Tensor) -> Tensor:
        """The last stage's output tensor as the problem's outputs, which the criterion scores."""
        ...


class Activations:
    """The plain pipeline: the inputs are the first activations and the last ones are the outputs."""

    def encode(self, inputs: Tensor) -> Tensor:
        return inputs

    def apply(self, net: Net, tensor: Tensor) -> Tensor:
        return net(tensor)

    def decode(self, tensor: Tensor, inputs: Tensor) -> Tensor:
        del inputs
        return tensor


class JetPayload:
    """A PINN's pipeline: jets ``(batch, 1 + 2d, width)`` of the activations cross the stages.

    The layers must act on the last dimension (``pinn-mlp``'s linear and tanh layers
    do), and the last stage's width must be 1 (the scalar ``u``).
    """

    def __init__(self, problem: JetProblem) -> None:
        self.problem = problem

    def encode(self, inputs: Tensor) -> Tensor:
        return input_jet(self.problem.jet_points(inputs))

    def apply(self, net: Net, tensor: Tensor) -> Tensor:
        return apply_to_jet(net, tensor)

    def decode(self, tensor: Tensor, inputs: Tensor) -> Tensor:
        return self.problem.outputs_from_jet(scalar_jet(tensor), inputs)


def stage_bounds(model: nn.Sequential, stages: int) -> list[int]:
    """Layer cut points ``0 = b_0 < … < b_stages = len(model)`` balanced by parameter count.

    Layers without parameters (activations, flatten) join the stage of the layer
    before them (the first stage for leading ones), so every stage owns parameters.

    Raises:
        ConfigError: fewer layers with parameters than stages.
    """
    counts = [sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in model]
    holders = [i for i, c in enumerate(counts) if c > 0]
    if len(holders) < stages:
        raise ConfigError(
            f"apts-ip: the model has {len(holders)} layers with parameters, too few for {stages} pipeline stages"
        )
    cuts = linear_partition([counts[i] for i in holders], stages)
    return [0] + [holders[c] for c in cuts[1:-1]] + [len(model)]


@dataclass(frozen=True)
class PipelineLayout:
    """Which pipeline stage and which replica each of ``world_size`` ranks is.

    Rank ``p = replica · stages + stage``: replica r is the block of consecutive ranks
    ``[r·S, (r+1)·S)``.  Consecutive ranks usually share a node, so the per-micro-batch
    activation messages stay on it, while the once-per-step replica averaging (one
    stage's parameters) is what crosses nodes *(ours)*.  Computed from the world size
    and the option alone, so it is the same on every rank without communication.

    Attributes:
        world_size: number of ranks P.
        replicas: number of pipeline replicas R (data parallelism); stages S = P / R.
    """

    world_size: int
    replicas: int

    def __post_init__(self) -> None:
        # Raised before any collective, and alike on every rank (it depends on P and R only).
        if self.replicas < 1:
            raise ConfigError(f"apts-ip: replicas must be >= 1, got {self.replicas}")
        if self.replicas > self.world_size:
            raise ConfigError(
                f"apts-ip: replicas={self.replicas} exceeds the {self.world_size} ranks "
                "(every replica needs at least one pipeline stage)"
            )
        if self.world_size % self.replicas != 0:
            raise ConfigError(
                f"apts-ip: {self.world_size} ranks cannot form replicas={self.replicas} pipelines of equal length "
                f"(stages = ranks / replicas must be a whole number; divisors of {self.world_size}: "
                f"{', '.join(str(d) for d in range(1, self.world_size + 1) if self.world_size % d == 0)})"
            )

    @property
    def stages(self) -> int:
        return self.world_size // self.replicas

    def stage_of(self, rank: int) -> int:
        return rank % self.stages

    def replica_of(self, rank: int) -> int:
        return rank // self.stages

    def rank_of(self, stage: int, replica: int) -> int:
        return replica * self.stages + stage

    def assignment(self) -> list[tuple[int, int]]:
        """``(stage, replica)`` of every rank, in rank order (recorded in the run log)."""
        return [(self.stage_of(p), self.replica_of(p)) for p in range(self.world_size)]


def _parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class Pipeline:
    """This rank's stage of ``model`` and the messages that connect it to its neighbours.

    Args:
        model: the whole model, built identically on every rank (same seed).  Only
            this rank's layers are kept; drop every other reference to ``model`` so
            that the other stages' parameters are freed.
        comm: one rank per stage, ranked by stage (the pipeline communicator of one
            replica; the whole world when there is one replica).
        micro_batches: micro-batches per pass (capped by the batch size).
        payload: what crosses the stages in :meth:`run` (default: the activations).
            :meth:`outputs` always sends plain activations: evaluation needs values only.
    """

    def __init__(
        self, model: nn.Module, comm: Communicator, micro_batches: int = 4, payload: Payload | None = None
    ) -> None:
        if not isinstance(model, nn.Sequential):
            raise ConfigError("apts-ip: the model must be an nn.Sequential to be cut into stages")
        self.comm = comm
        self.stage = comm.rank
        self.stages = comm.size
        self.first = self.stage == 0
        self.last = self.stage == self.stages - 1
        self.micro_batches = micro_batches
        self.payload: Payload = Activations() if payload is None else payload
        self.bounds = stage_bounds(model, self.stages)
        self.model_parameter_bytes = _parameter_bytes(model)
        self.model_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # Every stage's parameter count, from the whole model before it is dropped: a
        # checkpoint gathers and splits the whole flat vector without asking the other ranks.
        # (torch annotates Sequential.__getitem__ as Sequential | Module; a slice gives a Sequential.)
        self.stage_numels = [
            sum(
                p.numel()
                for layer in cast("nn.Sequential", model[start:end])
                for p in layer.parameters()
                if p.requires_grad
            )
            for start, end in zip(self.bounds[:-1], self.bounds[1:])
        ]
        layers = list(model)[self.bounds[self.stage] : self.bounds[self.stage + 1]]
        self.module = nn.Sequential(*layers)
        self.module.train(model.training)
        self.flat = FlatParameters(self.module)
        self.stage_inputs: Tensor | None = None
        self.output_grads: Tensor | None = None

    @property
    def parameter_bytes(self) -> int:
        """Bytes of the parameters this rank holds (its stage's only)."""
        return _parameter_bytes(self.module)

    # -- the whole model's coordinates (checkpoints) -------------------------------

    @property
    def model_slice(self) -> slice:
        """This stage's part of the whole model's flat parameter vector (stages in order)."""
        start = sum(self.stage_numels[: self.stage])
        return slice(start, start + self.stage_numels[self.stage])

    def _model_name(self, name: str) -> str:
        # The stage is nn.Sequential(*layers): its layer i is layer bounds[stage] + i of the model.
        index, _, rest = name.partition(".")
        return f"{self.bounds[self.stage] + int(index)}.{rest}"

    def model_buffers(self) -> dict[str, Tensor]:
        """This stage's buffers (copies, on the CPU) under their names in the whole model."""
        return {self._model_name(name): buffer.detach().cpu().clone() for name, buffer in self.module.named_buffers()}

    def load_model_buffers(self, buffers: Mapping[str, Tensor]) -> None:
        """Copy this stage's buffers out of a whole-model ``name → tensor`` mapping."""
        with torch.no_grad():
            for name, buffer in self.module.named_buffers():
                buffer.copy_(buffers[self._model_name(name)])

    # -- messages ---------------------------------------------------------------

    def isend(self, tensor: Tensor, dest: int, tag: int) -> list[PointToPointRequest]:
        """Send ``tensor`` (any shape) to the stage ``dest``; wait on the requests before reusing it."""
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[0] = tensor.dim()
        header[1 : 1 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
        payload = tensor.detach().contiguous()
        return [self.comm.isend(header, dest, tag), self.comm.isend(payload, dest, tag)]

    def recv(self, source: int, tag: int) -> Tensor:
        """Receive a tensor sent by :meth:`isend` of the stage ``source`` (its shape comes first)."""
        header = self.comm.recv_(torch.zeros(_HEADER, dtype=torch.int64), source, tag)
        shape = header[1 : 1 + int(header[0])].tolist()
        return self.comm.recv_(torch.empty(shape, dtype=self.flat.dtype, device=self.flat.device), source, tag)

    # -- passes -----------------------------------------------------------------

    def run(self, inputs: Tensor, targets: Tensor, criterion: Criterion, *, backward: bool) -> float:
        """One pass over the batch; returns the loss on the last stage (0.0 elsewhere).

        With ``backward``, ``flat.grad`` holds this stage's gradient block afterwards and
        ``stage_inputs`` / ``output_grads`` the caches of the local phase.  Without it, the
        pass is value-only (trial points) and the caches are left alone.
        """
        rows = inputs.shape[0]
        payload = self.payload
        chunks = torch.arange(rows).tensor_split(min(self.micro_batches, rows))
        pending: list[PointToPointRequest] = []
        saved: list[tuple[Tensor, Tensor]] = []
        loss_total = 0.0
        with torch.set_grad_enabled(backward):
            for chunk in chunks:
                x = payload.encode(inputs[chunk]) if self.first else self.recv(self.stage - 1, FORWARD_TAG)
                if backward and not self.first:
                    x.requires_grad_()
                out = payload.apply(self.module, x)
                if self.last:
                    out = criterion(payload.decode(out, inputs[chunk]), targets[chunk]) * (len(chunk) / rows)
                    loss_total += float(out.detach())
                else:
                    pending += self.isend(out, self.stage + 1, FORWARD_TAG)
                if backward:
                    saved.append((x, out))
        if backward:
            self.flat.zero_grad()
            grads: list[Tensor] = []
            for x, out in reversed(saved):
                if self.last:
                    out.backward()
                else:
                    grad_out = self.recv(self.stage + 1, BACKWARD_TAG)
                    out.backward(grad_out)
                    grads.append(grad_out)
                if not self.first:
                    # x is a received activation that requires grad: the backward above set x.grad.
                    pending += self.isend(cast(Tensor, x.grad), self.stage - 1, BACKWARD_TAG)
            self.stage_inputs = torch.cat([x.detach() for x, _ in saved])
            self.output_grads = None if self.last else torch.cat(grads[::-1])
        for request in pending:
            request.wait()
        return loss_total

    def outputs(self, inputs: Tensor) -> Tensor:
        """The model's outputs for ``inputs`` on every rank (evaluation; not a hot path)."""
        with torch.no_grad():
            x = inputs if self.first else self.recv(self.stage - 1, FORWARD_TAG)
            out = self.module(x)
            if not self.last:
                for request in self.isend(out, self.stage + 1, FORWARD_TAG):
                    request.wait()
        shape = self.comm.bcast_object(tuple(out.shape) if self.last else None, root=self.stages - 1)
        result = out if self.last else torch.empty(shape, dtype=self.flat.dtype, device=self.flat.device)
        return self.comm.bcast_(result.contiguous(), root=self.stages - 1)


class PipelineObjective:
    """This rank's stage, its replica's shard of the batch, and the collectives of APTS-IP.

    An :class:`~hpcopt.distributed.objective.Objective`, as the data-parallel
    :class:`~hpcopt.distributed.data_parallel.DistributedObjective` is: with one
    replica, every rank is given the whole global batch; with R replicas, the ranks of
    replica r are given its shard B_r (the same on every stage of the replica).

    Args:
        problem: the loss (``criterion``) and, for evaluation, the metrics.
        pipeline: this rank's stage, over its replica's pipeline communicator.
        world: all P ranks (the trial value is reduced over it).
        replica_comm: this stage in every replica, ranked by replica.
        layout: stages × replicas of ``world``.
    """

    def __init__(
        self,
        problem: Problem,
        pipeline: Pipeline,
        world: Communicator,
        replica_comm: Communicator,
        layout: PipelineLayout,
    ) -> None:
        self.problem = problem
        self.pipeline = pipeline
        self.comm = world
        self.replica_comm = replica_comm
        self.layout = layout
        self.flat = pipeline.flat
        self.inputs: Tensor | None = None
        self.targets: Tensor | None = None
        self.weight = 1.0
        self.step = 0
        dtype, device = self.flat.dtype, self.flat.device
        self._packed = PackedBuffer(self.flat.numel, 2, dtype=dtype, device=device)
        self._step = torch.zeros(self.flat.numel, dtype=dtype, device=device)
        # With replicas f rides in the gradient buffer (flat dtype): the trial value is
        # reduced in the same dtype, so that f(θ_k) and f(θ_k+s) are rounded alike.
        self._trial = torch.zeros(1, dtype=torch.float64 if layout.replicas == 1 else dtype, device=device)

    @property
    def numel(self) -> int:
        return self.flat.numel

    @property
    def replicated(self) -> bool:
        return self.layout.replicas > 1

    def set_batch(self, inputs: Tensor, targets: Tensor, global_size: int, noise_seed: int) -> None:
        del noise_seed  # the pipelined models have no dropout (checked at build)
        rows = inputs.shape[0]
        if not self.replicated and rows != global_size:
            raise ValueError("apts-ip: with one replica every rank must hold the whole global batch")
        if not 0 < rows <= global_size:
            raise ValueError(f"apts-ip: a shard of {rows} rows of a global batch of {global_size}")
        self.inputs, self.targets = inputs, targets
        self.weight = rows / global_size

    def run(self, *, backward: bool) -> float:
        """The shard loss on the last stage (0.0 elsewhere); see :meth:`Pipeline.run`."""
        if self.inputs is None or self.targets is None:
            raise RuntimeError("set_batch() must be called before evaluating the objective")
        return self.pipeline.run(self.inputs, self.targets, self.problem.criterion, backward=backward)

    def value_and_grad(self) -> tuple[float, Tensor]:
        """Global f (last stage; 0.0 elsewhere) and this stage's global gradient block g_s.

        ``flat.grad`` keeps the replica's own block g_{s,r} afterwards; the returned
        block is a view of an internal buffer with replicas (``flat.grad`` without).
        """
        loss_part = self.run(backward=True)
        grad = self.flat.grad
        if not self.replicated:
            return loss_part, grad
        packed = self._packed
        torch.mul(grad, self.weight, out=packed.vector)
        packed.scalars[0] = self.weight * loss_part
        packed.scalars[1] = self.weight
        self.replica_comm.allreduce_(packed.data)
        if abs(float(packed.scalars[1]) - 1.0) > 1e-5:
            # The same sum on every rank (the weights depend on the replica only): all raise.
            raise ValueError(
                f"apts-ip: the replicas' shards add up to {float(packed.scalars[1]):.6g} of the global batch, "
                "not 1: each replica must be given its own contiguous shard"
            )
        return float(packed.scalars[0]), packed.vector

    def average_step(self, step: Tensor) -> Tensor:
        """The replicas' weighted average of this stage's local steps (``step`` itself with one replica)."""
        if not self.replicated:
            return step
        torch.mul(step, self.weight, out=self._step)
        return self.replica_comm.allreduce_(self._step)

    def value(self) -> float:
        """Global f at the current parameters: one scalar allreduce over the world (trial points)."""
        self._trial[0] = self.weight * self.run(backward=False)
        self.comm.allreduce_(self._trial)
        return float(self._trial[0])
