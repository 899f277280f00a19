"""The whole network's Gauss–Newton product over a pipeline, one stage's block per rank.

``G v = Jᵀ H_L J v`` (docs/algorithms.md §7) with ``J`` the Jacobian of the problem's
outputs w.r.t. *all* parameters, although no rank holds them all: stage s holds
``θ_s`` and the block ``v_s``, and

* a *tangent sweep* forward carries ``J v`` through the stages: stage s receives its
  input's tangent ``ẋ`` and sends ``J_θ v_s + J_x ẋ`` on (the first stage's input does
  not depend on θ, so its ``ẋ`` is 0); the last stage applies ``H_L``, the Hessian of
  the criterion in output space;
* a *cotangent sweep* backward carries ``H_L J v`` back: stage s receives its output's
  cotangent ``w`` and keeps ``J_θᵀ w`` — its block of ``G v`` — and sends ``J_xᵀ w`` on.

Both sweeps reuse one stored forward per micro-batch, as the single-process product
(:mod:`hpcopt.numerics.curvature`) does: ``J_θ v_s + J_x ẋ`` comes from the double-vjp
trick (``a = (J_θᵀu, J_xᵀu)`` is built once with ``create_graph`` and is linear in a
dummy ``u``, so ``∂⟨a, (v_s, ẋ)⟩/∂u`` is the tangent), ``J_θᵀ w`` and ``J_xᵀ w`` from an
ordinary backward through the stored forward.  A product costs one message per
micro-batch each way, like a gradient pass, and no collective; what crosses the
stages is the payload's shape (activations or, for a PINN, their jets).

Used by APTS-IP's global pass (:mod:`hpcopt.optimizers.apts.apts_ip`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hpcopt.comm import PointToPointRequest
from hpcopt.distributed.pipeline import Criterion, Pipeline, PipelineObjective
from hpcopt.numerics.curvature import CurvatureKind, CurvatureOperator
from hpcopt.numerics.krylov.cg import Dot

TANGENT_TAG = 13
COTANGENT_TAG = 14


@dataclass
class _MicroBatch:
    """The stored forward of one micro-batch on this stage."""

    inputs: Tensor | None  # the received input (requires grad); None on the first stage
    outputs: Tensor  # the stage's output; on the last stage the problem's outputs z
    dummy: Tensor  # u, shaped like ``outputs``
    transposed: list[Tensor]  # J_θᵀu (and J_xᵀu), those that depend on u
    tangents: list[int]  # which of (v_s, ẋ) pairs with each entry of ``transposed``
    outputs_leaf: Tensor | None = None  # last stage: z cut from the model
    loss_gradient: Tensor | None = None  # last stage: ∂L_m/∂z with its graph (for H_L)


class PipelineGaussNewton(CurvatureOperator):
    """``v_s ↦ (G v)_s`` on this rank's stage, for this pipeline's batch at the current θ.

    Building it is a forward over the micro-batches with point-to-point messages, so
    every stage of the pipeline must build it together, and every product is
    likewise taken by all stages at once with their own blocks of one vector.

    Args:
        pipeline: this rank's stage.
        inputs, targets: the batch this pipeline (replica) trains on.
        criterion: the problem's mean loss of outputs and targets.
    """

    def __init__(self, pipeline: Pipeline, inputs: Tensor, targets: Tensor, criterion: Criterion) -> None:
        flat = pipeline.flat
        super().__init__(CurvatureKind.GGN, flat.numel, 0.0, flat.dtype)
        self.pipeline = pipeline
        # A clone: the operator stays linearised here while the optimizer moves flat.data.
        self._theta = flat.data.detach().clone().requires_grad_()
        self._micro_batches: list[_MicroBatch] = []
        # Private copies of the buffers: this forward must not update batch-norm running
        # statistics, which the gradient pass of the same batch already did.
        net = flat.functional(self._theta, flat.buffer_snapshot())
        payload = pipeline.payload
        rows = inputs.shape[0]
        pending: list[PointToPointRequest] = []
        with torch.enable_grad():
            for chunk in torch.arange(rows).tensor_split(min(pipeline.micro_batches, rows)):
                received = None if pipeline.first else pipeline.recv(pipeline.stage - 1, TANGENT_TAG)
                x = payload.encode(inputs[chunk]) if received is None else received.requires_grad_()
                outputs = payload.apply(net, x)
                record_leaf = record_gradient = None
                if pipeline.last:
                    outputs = payload.decode(outputs, inputs[chunk])
                    # The criterion is cut from the model at z: H_L is then a double backward
                    # of the criterion alone.  Micro-batch m's loss weighs |m|/|B|, as in a pass.
                    record_leaf = outputs.detach().requires_grad_()
                    loss = criterion(record_leaf, targets[chunk]) * (len(chunk) / rows)
                    (record_gradient,) = torch.autograd.grad(loss, record_leaf, create_graph=True)
                else:
                    pending += pipeline.isend(outputs, pipeline.stage + 1, TANGENT_TAG)
                dummy = torch.zeros_like(outputs, requires_grad=True)
                wrt = [self._theta] if received is None else [self._theta, received]
                transposed = torch.autograd.grad(outputs, wrt, dummy, create_graph=True, allow_unused=True)
                # An entry that does not depend on u (a part of θ the outputs ignore) adds nothing to J v.
                kept = [i for i, t in enumerate(transposed) if t is not None and t.requires_grad]
                self._micro_batches.append(
                    _MicroBatch(
                        received,
                        outputs,
                        dummy,
                        [transposed[i] for i in kept],
                        kept,
                        record_leaf,
                        record_gradient,
                    )
                )
        for request in pending:
            request.wait()

    def _product(self, v: Tensor) -> Tensor:
        pipeline = self.pipeline
        pending: list[PointToPointRequest] = []
        cotangents: list[Tensor] = []
        # Tangent sweep: J v, stage by stage; H_L J v on the last stage.
        for batch in self._micro_batches:
            incoming = None if pipeline.first else pipeline.recv(pipeline.stage - 1, TANGENT_TAG)
            vectors = [v if i == 0 else incoming for i in batch.tangents]
            tangent = None
            if batch.transposed:
                (tangent,) = torch.autograd.grad(
                    batch.transposed, batch.dummy, vectors, retain_graph=True, allow_unused=True
                )
            if tangent is None:
                tangent = torch.zeros_like(batch.outputs)
            if pipeline.last:
                assert batch.loss_gradient is not None and batch.outputs_leaf is not None
                (curved,) = torch.autograd.grad(
                    batch.loss_gradient, batch.outputs_leaf, tangent, retain_graph=True, allow_unused=True
                )
                cotangents.append(torch.zeros_like(tangent) if curved is None else curved)
            else:
                pending += pipeline.isend(tangent.detach(), pipeline.stage + 1, TANGENT_TAG)
        # Cotangent sweep: Jᵀ (H_L J v), this stage's block kept, the input's passed back.
        product = torch.zeros_like(v)
        for index in reversed(range(len(self._micro_batches))):
            batch = self._micro_batches[index]
            cotangent = cotangents[index] if pipeline.last else pipeline.recv(pipeline.stage + 1, COTANGENT_TAG)
            wrt = [self._theta] if batch.inputs is None else [self._theta, batch.inputs]
            grads = torch.autograd.grad(batch.outputs, wrt, cotangent, retain_graph=True, allow_unused=True)
            if grads[0] is not None:
                product += grads[0]
            if batch.inputs is not None:
                back = grads[1] if grads[1] is not None else torch.zeros_like(batch.inputs)
                pending += pipeline.isend(back.detach(), pipeline.stage - 1, COTANGENT_TAG)
        for request in pending:
            request.wait()
        return product


def gauss_newton_matvec(objective: PipelineObjective) -> Callable[[Tensor], Tensor]:
    """``v_s ↦ (G v)_s`` for the objective's global batch, at the current θ (collective, see above).

    With one replica that is the pipeline's own product.  With R replicas each pipeline
    multiplies by the Gauss–Newton matrix of its shard and one allreduce over the replica
    communicator per product gives ``Σ_r w_r G_r v`` — the global batch's, identical on
    every replica of the stage.
    """
    if objective.inputs is None or objective.targets is None:
        raise RuntimeError("set_batch() must be called before taking curvature products")
    operator = PipelineGaussNewton(objective.pipeline, objective.inputs, objective.targets, objective.problem.criterion)
    if not objective.replicated:
        return operator

    def product(v: Tensor) -> Tensor:
        return objective.replica_comm.allreduce_(operator(v).mul_(objective.weight), reuse=False)

    return product


def pipeline_dot(pipeline: Pipeline) -> Dot:
    """The inner product of two whole-model vectors of which each stage holds its block.

    One scalar allreduce over the pipeline communicator per call, summed in float64:
    every stage (and every replica, whose blocks are identical) gets the same value.
    """

    def dot(a: Tensor, b: Tensor) -> float:
        return pipeline.comm.allreduce_scalars([float(torch.dot(a.double(), b.double()))])[0]

    return dot
