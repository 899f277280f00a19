"""APTS-IP: layer (pipeline) decomposition with the model split across ranks (docs/algorithms.md §3).

The P ranks form ``S stages × R replicas`` (:class:`~hpcopt.distributed.pipeline.PipelineLayout`,
``--set replicas=R``, default 1: pure model parallelism).  Each replica is a whole
pipeline of S ranks (:class:`~hpcopt.distributed.pipeline.Pipeline`; rank ``replica·S + stage``)
and takes the ``replica``-th contiguous shard B_r of every global batch B — the
sharding rule of the data-parallel optimizers, so the sequence of global batches
does not depend on the rank count.  Two sub-communicators are split from the world:
the *pipeline* communicator of a replica (its S stages) and the *replica*
communicator of a stage (that stage in all R replicas).  With w_r = |B_r|/|B|, one
outer iteration is:

1. Pipelined forward/backward on B_r: f_r on the last stage, the block g_{s,r} on each
   stage, and the caches: stage input X_r and, except on the last stage, the output
   gradient G_r = ∂f_r/∂(stage output).  With R > 1, one allreduce per stage over the
   replica communicator of ``[w_r·g_{s,r} ; w_r·f_r ; w_r]`` gives the global block
   g_s, f (last stage) and Σ w_r, which must be 1 (a check that the replicas were
   given the shards of one batch).
2. Local phase, no communication: L trust-region iterations (radius Δ/√S, so that
   ‖s‖ ≤ Δ over the disjoint stages) on the stage's own parameters, from the cached
   input, on
   * the last stage: the shard loss ``f_r(stage(X_r; θ_s))``;
   * other stages: the linearised downstream loss ``⟨G_r, stage(X_r; θ_s)⟩``;
   plus, with R > 1, the first-order-consistency term ``(g_s − g_{s,r})ᵀ(θ − θ_k)`` of
   APTS-D, so that every replica's local model has the global gradient g_s at θ_k.
3. With R > 1, one allreduce per stage over the replica communicator of w_r·s_{s,r}:
   the stage step s_s is the replicas' weighted average (still ‖s_s‖ ≤ Δ/√S, the ball
   being convex), identical on every replica of the stage.
4. One allreduce over the pipeline communicator of ``[f, −g_sᵀs_s, ‖s_s‖²]`` (f is
   nonzero on the last stage only): every rank gets f, the first-order pred = −gᵀs,
   and ‖s‖ — the same on every replica, whose inputs are identical.
5. Trial point θ_k + s through every replica's pipeline on its shard (value only), one
   scalar allreduce over the world of w_r·f_r(θ_k + s), ratio and radius as in §0 —
   every rank decides alike from the same scalars, so the replicas of a stage keep
   identical parameters.

6. Optional global passes (``global_passes=G``): G trust-region iterations on the whole
   f, each a Steihaug solve whose curvature products are the whole network's
   Gauss–Newton products taken through the pipeline
   (:mod:`hpcopt.distributed.pipeline_curvature`: one tangent sweep forward and one
   cotangent sweep back per product, one allreduce over the replicas with R > 1) and
   whose inner products are summed over the stages.  This is APTS-D's Gauss–Newton
   global pass without any rank holding the whole model.

The problem's forward must be the network itself (``forward(net, x) == net(x)``), or
the problem must be a :class:`~hpcopt.problems.base.JetProblem` (the PINNs): its
forward differentiates the network w.r.t. its inputs, so the stages pass Taylor-mode
jets of the activations (:class:`~hpcopt.distributed.pipeline.JetPayload`) — ``1 + 2d`` times an
activation for inputs in ``R^d`` — and the last stage turns the jet of ``u`` into the
PDE residuals.  The local phase maps the cached stage inputs through the same payload.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch
from torch import Tensor, nn

from hpcopt.comm import Communicator
from hpcopt.config import require
from hpcopt.distributed.pipeline import (
    JetPayload,
    Payload,
    Pipeline,
    PipelineLayout,
    PipelineObjective,
    stage_bounds,
)
from hpcopt.distributed.pipeline_curvature import gauss_newton_matvec, pipeline_dot
from hpcopt.distributed.sharding import contiguous_slice
from hpcopt.errors import ConfigError, NonFiniteError
from hpcopt.numerics.curvature import LocalObjective, parse_curvature
from hpcopt.numerics.krylov.cg import MatVec
from hpcopt.numerics.trust_region import ReferenceWindow, decide, make_subproblem_solver
from hpcopt.optimizers.apts.local_phase import first_order_consistent, local_phase
from hpcopt.optimizers.apts.options import APTSOptions
from hpcopt.optimizers.apts.outcome import outer_step_result
from hpcopt.optimizers.base import Optimizer, StepResult
from hpcopt.problems.base import JetProblem, Problem


@dataclass
class APTSIPConfig(APTSOptions):
    """Options of ``--optimizer apts-ip``: those of :class:`APTSOptions` and

    Attributes:
        micro_batches: micro-batches per pipelined pass (4).
        replicas: R, pipeline replicas for data parallelism on top (1).  The P ranks
            form P/R stages × R replicas (:class:`~hpcopt.distributed.pipeline.PipelineLayout`);
            replica r takes the r-th contiguous shard of every global batch, and the
            replicas of a stage average their gradients and steps, so they keep
            identical parameters.  P must be divisible by R, the global batch size
            too, and the model must have at least P/R layers with parameters.
        global_passes: G, trust-region iterations on the whole f after the combination,
            each a Steihaug solve on the whole network's Gauss–Newton products taken
            through the pipeline (0; the PINNs' defaults: 2) *(ours)*.

    ``curvature`` applies to the local phase, where ``ggn`` is of little use: the
    linearised loss of inner stages has no Gauss–Newton curvature.  The global passes
    always use Gauss–Newton products of the whole network.
    """

    option_prefix: ClassVar[str] = "apts-ip"

    micro_batches: int = 4
    replicas: int = 1
    global_passes: int = 0

    def validate(self) -> None:
        super().validate()
        name = self.option_prefix
        require(self.local_iterations >= 1, f"{name}: local_iterations must be >= 1, got {self.local_iterations}")
        require(self.global_passes >= 0, f"{name}: global_passes must be >= 0, got {self.global_passes}")
        require(self.micro_batches >= 1, f"{name}: micro_batches must be >= 1, got {self.micro_batches}")
        require(self.replicas >= 1, f"{name}: replicas must be >= 1, got {self.replicas}")


def _linearised_loss(outputs: Tensor, output_grads: Tensor) -> Tensor:
    # ⟨G, out⟩: the first-order model of the loss downstream of an inner stage.
    return (outputs * output_grads).sum()


def _stage_forward(payload: Payload, rows: Tensor | None) -> Callable[[Any, Tensor], Tensor]:
    """The local phase's forward of a stage: the payload's map, decoded on the last stage (``rows``)."""

    def forward(net: Any, stage_inputs: Tensor) -> Tensor:
        out = payload.apply(net, stage_inputs)
        return out if rows is None else payload.decode(out, rows)

    return forward


class APTSIP(Optimizer):
    name = "apts-ip"
    config_class = APTSIPConfig
    #: This rank's stage, cut by :meth:`build` from the whole model.
    objective: PipelineObjective
    # The radius (and the non-monotone window) is all that an outer iteration hands to the
    # next: the local solver is reset at the start of every local phase, and the pipeline's
    # caches (stage inputs, output gradients) are rebuilt by each step's gradient pass.
    state_attributes: ClassVar[tuple[str, ...]] = ("radius",)

    @classmethod
    def pipeline_layout(cls, config: APTSIPConfig, world_size: int) -> PipelineLayout:
        """The stages × replicas of ``world_size`` ranks (no communication).

        Raises:
            ConfigError: ``world_size`` is not divisible by ``config.replicas``.
        """
        return PipelineLayout(world_size, config.replicas)

    @classmethod
    def data_shard(cls, config: APTSIPConfig, rank: int, world_size: int, batch_size: int) -> tuple[int, int]:
        """``(shard, shards)`` of the global batch that ``rank`` is given: its replica's.

        All stages of a pipeline replica share the replica's shard (the whole batch with
        one replica).

        Raises:
            ConfigError: as :meth:`pipeline_layout`, or ``batch_size`` is not divisible by
                the replicas (the training driver calls this before any collective).
        """
        layout = cls.pipeline_layout(config, world_size)
        require(
            batch_size % layout.replicas == 0,
            f"{cls.name}: --batch-size {batch_size} is not divisible by replicas={layout.replicas} "
            "(each pipeline replica takes an equal shard)",
        )
        return layout.replica_of(rank), layout.replicas

    @classmethod
    def checkpoint_layout(cls, config: APTSIPConfig, model: nn.Module, world_size: int) -> dict[str, Any]:
        """What a checkpoint records of the layout and a resumed run must match (no communication).

        ``stages``, ``replicas`` and ``stage_bounds`` (the layer cuts), computed from the
        whole model as :meth:`build` will cut it.

        Raises:
            ConfigError: as :meth:`build` for a bad layout, a model that is not an
                ``nn.Sequential`` or one with too few layers.
        """
        layout = cls.pipeline_layout(config, world_size)
        if not isinstance(model, nn.Sequential):
            raise ConfigError("apts-ip: the model must be an nn.Sequential to be cut into stages")
        return {
            "stages": layout.stages,
            "replicas": layout.replicas,
            "stage_bounds": stage_bounds(model, layout.stages),
        }

    @classmethod
    def build(cls, problem: Problem, model: nn.Module, comm: Communicator, config: APTSIPConfig) -> Self:
        """Cut ``model`` (identical on every rank) into P/R stages and keep this rank's.

        Splits ``comm`` into this rank's pipeline and replica communicators (collective:
        every rank of ``comm`` must call this).

        Raises:
            ConfigError: on every rank alike and before any collective — a bad layout, not
                a Sequential, too few layers for the stages, dropout, or a problem whose
                forward is not the network itself and that is no ``JetProblem``.
        """
        layout = cls.pipeline_layout(config, comm.size)
        if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
            raise ConfigError("apts-ip: models with dropout are not supported")
        payload: Payload | None = None
        if isinstance(problem, JetProblem):
            payload = JetPayload(problem)
        else:
            probe = problem.train.subset(slice(0, 2))
            try:
                with torch.no_grad():
                    plain = torch.allclose(problem.forward(model, probe.inputs), model(probe.inputs))
            except (RuntimeError, ValueError, TypeError):
                plain = False
            if not plain:
                raise ConfigError(
                    f"apts-ip: problem '{problem.name}' transforms the network's output and offers no jet "
                    "(outputs_from_jet); the pipeline needs forward(net, x) == net(x)"
                )
        if not isinstance(model, nn.Sequential):
            raise ConfigError("apts-ip: the model must be an nn.Sequential to be cut into stages")
        stage_bounds(model, layout.stages)  # too few layers: raise here, before the splits
        stage, replica = layout.stage_of(comm.rank), layout.replica_of(comm.rank)
        pipeline_comm = comm.split(replica, key=stage)
        replica_comm = comm.split(stage, key=replica)
        pipeline = Pipeline(model, pipeline_comm, config.micro_batches, payload)
        return cls(PipelineObjective(problem, pipeline, comm, replica_comm, layout), config)

    def __init__(self, objective: PipelineObjective, config: APTSIPConfig) -> None:
        if not isinstance(objective, PipelineObjective):
            raise ConfigError("apts-ip holds one pipeline stage per rank: build it with APTSIP.build(...)")
        super().__init__(objective, config)
        self.pipeline = objective.pipeline
        self.comm = objective.comm
        self.layout = objective.layout
        self.radius = config.radius
        self.window = ReferenceWindow(config.nonmonotone)
        self.policy = config.global_policy()
        self.curvature = parse_curvature(config.curvature)
        # The local solve works on this stage's block only (rank-private vectors), so the
        # fused kernels' local sums are the sums it needs.
        self.local_solver = make_subproblem_solver(
            config.local_solver,
            memory=config.memory,
            max_iter=config.max_cg_iterations,
            kernels=self.kernels,
            subspace_steps=config.subspace_steps,
            rtol=config.cg_rtol,
        )
        self._scalars = torch.zeros(3, dtype=torch.float64)
        # The global pass works on whole-model vectors held as one block per stage: its
        # inner products are summed over the pipeline (no fused kernels: their sums are local).
        self.dot = pipeline_dot(self.pipeline)
        self.global_solver = make_subproblem_solver(
            "steihaug", dot=self.dot, max_iter=config.max_cg_iterations, rtol=config.cg_rtol
        )

    def run_attributes(self) -> dict[str, object]:
        """Run-log attributes: the layout, the stages and the parameter memory of every rank."""
        return {
            "num_parameters": self.pipeline.model_numel,
            "apts_ip_stages": self.layout.stages,
            "apts_ip_replicas": self.layout.replicas,
            "apts_ip_layout": [list(item) for item in self.layout.assignment()],
            "apts_ip_stage_bounds": self.pipeline.bounds,
            "apts_ip_parameter_bytes": self.comm.allgather_object(self.pipeline.parameter_bytes),
            "apts_ip_model_parameter_bytes": self.pipeline.model_parameter_bytes,
        }

    def gather_model(self) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """Collective over the world: the whole model's flat parameters and every replica's buffers.

        Returns, on every rank, the flat vector in the whole model's parameter order and,
        per replica, a ``name → tensor`` dict of the whole model's buffers (names as in
        the unsplit model).  Not a hot path: it runs once per checkpoint.
        """
        layout, world, pipeline = self.layout, self.comm, self.pipeline
        # The replicas of a stage hold bit-identical parameters (every decision is taken
        # from the same allreduced scalars), so replica 0's stages — ranks 0 … S−1, in
        # stage order — make up the whole vector; the other replicas send nothing.
        counts = [
            pipeline.stage_numels[layout.stage_of(rank)] if layout.replica_of(rank) == 0 else 0
            for rank in range(world.size)
        ]
        mine = self.flat.data if layout.replica_of(world.rank) == 0 else self.flat.data[:0]
        parameters = world.allgatherv(mine, counts)
        # Buffers (batch-norm statistics) are computed from each replica's own shard and may
        # differ between replicas, so every replica's are kept; they are small.
        per_rank = world.allgather_object(pipeline.model_buffers())
        buffers: list[dict[str, Tensor]] = [{} for _ in range(layout.replicas)]
        for rank, stage_buffers in enumerate(per_rank):
            buffers[layout.replica_of(rank)].update(stage_buffers)
        return parameters, buffers

    def load_model(self, parameters: Tensor, buffers: Sequence[Mapping[str, Tensor]]) -> None:
        """Take this rank's stage out of :meth:`gather_model`'s result (no communication).

        Raises:
            ConfigError: the vector or the buffer list does not fit this layout.
        """
        expected = sum(self.pipeline.stage_numels)
        if parameters.numel() != expected or len(buffers) != self.layout.replicas:
            raise ConfigError(
                f"apts-ip: a checkpoint of {parameters.numel()} parameters and {len(buffers)} replicas' buffers "
                f"does not fit this model of {expected} parameters in {self.layout.replicas} replicas"
            )
        self.flat.copy_(parameters[self.pipeline.model_slice])
        self.pipeline.load_model_buffers(buffers[self.layout.replica_of(self.comm.rank)])

    def evaluate(self, problem: Problem) -> dict[str, float]:
        """Validation metrics through the pipeline (outputs broadcast from the last stage).

        With replicas, each replica evaluates its contiguous part of the validation set
        and the sums are reduced over the replica communicator.
        """
        objective = self.objective
        layout, data = self.layout, problem.val
        if layout.replicas == 1 or len(data) < layout.replicas:
            return problem.eval_metrics(problem.eval_sums(self.pipeline.outputs, data).to(torch.float64))
        part = data.subset(contiguous_slice(len(data), layout.replica_of(self.comm.rank), layout.replicas))
        sums = problem.eval_sums(self.pipeline.outputs, part).to(torch.float64)
        objective.replica_comm.allreduce_(sums, reuse=False)
        return problem.eval_metrics(sums)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "window": self.window.state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.window.load(list(state.get("window", [])))

    def _local_objective(self) -> LocalObjective:
        pipeline = self.pipeline
        objective = self.objective
        assert pipeline.stage_inputs is not None and objective.targets is not None
        if pipeline.last:
            # The cached stage inputs are the micro-batches in order, i.e. the rows of objective.inputs.
            forward = _stage_forward(pipeline.payload, objective.inputs)
            return LocalObjective(
                self.flat, forward, objective.problem.criterion, pipeline.stage_inputs, objective.targets
            )
        assert pipeline.output_grads is not None
        forward = _stage_forward(pipeline.payload, None)
        return LocalObjective(self.flat, forward, _linearised_loss, pipeline.stage_inputs, pipeline.output_grads)

    def _local_phase(self, theta_k: Tensor, grad: Tensor, correction: Tensor | None) -> tuple[Tensor, dict[str, int]]:
        """L local iterations from θ_k; ``correction = g_s − g_{s,r}`` is the FOC term (None: no replicas)."""
        cfg = self.config
        flat = self.flat
        local = self._local_objective()
        ball = self.radius / math.sqrt(self.pipeline.stages)

        def value(step: Tensor) -> float:
            return local.value(theta_k + step)

        def value_and_grad(step: Tensor) -> tuple[float, Tensor]:
            flat.copy_(theta_k + step)
            return local.value_and_grad()

        def curvature(step: Tensor) -> MatVec:
            flat.copy_(theta_k + step)
            return local.curvature(self.curvature)

        model = first_order_consistent(value, value_and_grad, curvature, correction)
        phase = local_phase(model, self.local_solver, cfg, ball=ball, value0=local.value(theta_k), grad0=grad)
        flat.copy_(theta_k)
        return phase.step, phase.counts

    def step(self) -> StepResult:
        objective = self.objective
        radius_before = self.radius
        theta_k = self.flat.clone()
        loss_part, global_grad = objective.value_and_grad()
        grad = global_grad.clone()
        # flat.grad is this replica's own block; the difference makes its local model first-order consistent.
        correction = grad - self.flat.grad if objective.replicated else None
        local_step, counts = self._local_phase(theta_k, grad, correction)
        step = objective.average_step(local_step)

        scalars = self._scalars
        scalars[0] = loss_part
        scalars[1] = -float(grad.double().dot(step.double()))
        scalars[2] = float(step.double().dot(step.double()))
        self.pipeline.comm.allreduce_(scalars)
        loss, pred, step_norm = float(scalars[0]), float(scalars[1]), math.sqrt(float(scalars[2]))
        if not math.isfinite(loss):
            raise NonFiniteError(f"apts-ip: the loss at the current parameters is {loss} (step {self.steps + 1})")

        self.flat.copy_(theta_k + step)
        trial_loss = objective.value()
        reference = self.window.reference(loss)
        self.window.record(loss)
        decision = decide(self.policy, self.radius, loss, trial_loss, pred, step_norm, reference)
        self.radius = decision.radius
        if not decision.accepted:
            self.flat.copy_(theta_k)
        global_accepted = 0
        if self.config.global_passes > 0:
            current = (trial_loss, None) if decision.accepted else (loss, grad)
            global_accepted = self._global_passes(*current)
        self.steps += 1
        extras = {
            "stages": self.layout.stages,
            "replicas": self.layout.replicas,
            **counts,
            "global_accepted": global_accepted,
        }
        return outer_step_result(loss, radius_before, step_norm, decision, pred, trial_loss, extras)

    def _global_passes(self, loss: float, grad: Tensor | None) -> int:
        """G Gauss–Newton trust-region iterations on the whole f from the current θ; returns how many were accepted.

        ``loss`` is f at the current θ (allreduced) and ``grad`` this stage's block of its
        gradient, or None when it is still to be computed.  A rejected pass keeps the
        gradient and the operator for the next one, with the shrunk radius.  Every
        decision comes from allreduced scalars, so all ranks take the same branches.
        """
        objective = self.objective
        matvec = None
        accepted = 0
        for _ in range(self.config.global_passes):
            if grad is None:
                _, grad_view = objective.value_and_grad()
                grad, matvec = grad_view.clone(), None
            if matvec is None:
                matvec = gauss_newton_matvec(objective)
            result = self.global_solver.solve(grad, self.radius, matvec)
            if not (result.pred > 0 and math.isfinite(result.pred)):
                break
            theta = self.flat.clone()
            self.flat.copy_(theta + result.step)
            trial_loss = objective.value()
            step_norm = math.sqrt(max(self.dot(result.step, result.step), 0.0))
            decision = decide(self.policy, self.radius, loss, trial_loss, result.pred, step_norm)
            self.radius = decision.radius
            if decision.accepted:
                accepted += 1
                loss, grad = trial_loss, None
            else:
                self.flat.copy_(theta)
        return accepted
