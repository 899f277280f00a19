"""APTS-IP: layer (pipeline) decomposition with the model split across ranks (ALGORITHMS.md §3).

Rank r holds pipeline stage r only (:class:`~hpcopt.pipeline.Pipeline`).  One outer
iteration on the batch B (every rank sees the whole batch: this is model, not data,
parallelism):

1. Pipelined forward/backward: f on the last stage, the gradient block g_r on each
   stage, and the caches: stage input X_r and, except on the last stage, the output
   gradient G_r = ∂f/∂(stage output).
2. Local phase, no communication: L trust-region iterations (radius Δ/√P, so that
   ‖s‖ ≤ Δ over the disjoint stages) on the stage's own parameters, from the cached
   input, on
   * the last stage: the true loss ``f(stage(X_r; θ_r))``;
   * other stages: the linearised downstream loss ``⟨G_r, stage(X_r; θ_r)⟩``, whose
     gradient at θ_k is g_r exactly.
3. One allreduce of three scalars ``[f, −g_rᵀs_r, ‖s_r‖²]`` (f is nonzero on the last
   stage only): every rank gets f, the first-order pred = −gᵀs, and ‖s‖.
4. Trial point θ_k + s through the pipeline (value only), one scalar allreduce of
   f(θ_k + s), ratio and radius as in §0 — every rank decides alike from the same
   scalars.

Data parallelism on top (replicas of the pipeline averaging their steps) is not
implemented.  The problem's forward must be the network itself (``forward(net, x)
== net(x)``): a PINN's forward differentiates the network w.r.t. its inputs, which
would need forward-mode tangents sent through the pipeline as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from hpcopt.comm import Communicator
from hpcopt.config import require
from hpcopt.curvature import LocalObjective, parse_curvature
from hpcopt.errors import ConfigError, NonFiniteError
from hpcopt.optimizers.apts_options import APTSOptions
from hpcopt.optimizers.base import Optimizer, StepResult
from hpcopt.optimizers.local_tr import LocalModel, local_trust_region
from hpcopt.pipeline import Pipeline
from hpcopt.problems.base import Problem
from hpcopt.trust_region import decide, make_subproblem_solver


@dataclass
class APTSIPConfig(APTSOptions):
    """Options of ``--optimizer apts-ip``: those of :class:`APTSOptions` and

    Attributes:
        micro_batches: micro-batches per pipelined pass (4).

    ``curvature=ggn`` is of little use here: the linearised loss of inner stages
    has no Gauss–Newton curvature.
    """

    option_prefix: ClassVar[str] = "apts-ip"

    micro_batches: int = 4

    def validate(self) -> None:
        super().validate()
        name = self.option_prefix
        require(self.local_iterations >= 1, f"{name}: local_iterations must be >= 1, got {self.local_iterations}")
        require(self.micro_batches >= 1, f"{name}: micro_batches must be >= 1, got {self.micro_batches}")


class PipelineObjective:
    """The batch and the stage of one rank: what APTS-IP iterates on.

    ``set_batch`` has the signature of :class:`~hpcopt.objective.DistributedObjective`'s;
    every rank must be given the whole global batch (the pipeline is not data-parallel).
    """

    def __init__(self, problem: Problem, pipeline: Pipeline, comm: Communicator) -> None:
        self.problem = problem
        self.pipeline = pipeline
        self.comm = comm
        self.flat = pipeline.flat
        self.inputs: Tensor | None = None
        self.targets: Tensor | None = None
        self.step = 0

    @property
    def numel(self) -> int:
        return self.flat.numel

    def set_batch(self, inputs: Tensor, targets: Tensor, global_size: int, noise_seed: int) -> None:
        del noise_seed  # the pipelined models have no dropout (checked at build)
        if inputs.shape[0] != global_size:
            raise ValueError("apts-ip: every rank must hold the whole global batch")
        self.inputs, self.targets = inputs, targets

    def run(self, *, backward: bool) -> float:
        if self.inputs is None or self.targets is None:
            raise RuntimeError("set_batch() must be called before evaluating the objective")
        return self.pipeline.run(self.inputs, self.targets, self.problem.criterion, backward=backward)


def _linearised_loss(outputs: Tensor, output_grads: Tensor) -> Tensor:
    # ⟨G, out⟩: the first-order model of the loss downstream of an inner stage.
    return (outputs * output_grads).sum()


def _network(net: Any, inputs: Tensor) -> Tensor:
    return net(inputs)


class APTSIP(Optimizer):
    name = "apts-ip"
    config_class = APTSIPConfig
    #: Built by :meth:`build` from the whole model; each rank keeps one stage.
    model_parallel: ClassVar[bool] = True

    @classmethod
    def build(cls, problem: Problem, model: nn.Module, comm: Communicator, config: APTSIPConfig) -> APTSIP:
        """Cut ``model`` (identical on every rank) into ``comm.size`` stages and keep this rank's.

        Raises:
            ConfigError: on every rank alike — not a Sequential, too few layers, dropout,
                or a problem whose forward is not the network itself.
        """
        if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
            raise ConfigError("apts-ip: models with dropout are not supported")
        probe = problem.train.subset(slice(0, 2))
        try:
            with torch.no_grad():
                plain = torch.allclose(problem.forward(model, probe.inputs), model(probe.inputs))
        except (RuntimeError, ValueError, TypeError):
            plain = False
        if not plain:
            raise ConfigError(
                f"apts-ip: problem '{problem.name}' transforms the network's output (e.g. a PINN residual); "
                "the pipeline needs forward(net, x) == net(x)"
            )
        pipeline = Pipeline(model, comm, config.micro_batches)
        return cls(PipelineObjective(problem, pipeline, comm), config)

    def __init__(self, objective: PipelineObjective, config: APTSIPConfig) -> None:
        if not isinstance(objective, PipelineObjective):
            raise ConfigError("apts-ip holds one pipeline stage per rank: build it with APTSIP.build(...)")
        super().__init__(objective, config)  # type: ignore[arg-type]
        self.pipeline = objective.pipeline
        self.comm = objective.comm
        self.radius = config.radius
        self.policy = config.global_policy()
        self.curvature = parse_curvature(config.curvature)
        self.local_solver = make_subproblem_solver(
            config.local_solver, memory=config.memory, max_iter=config.max_cg_iterations
        )
        self._scalars = torch.zeros(3, dtype=torch.float64)
        self._trial = torch.zeros(1, dtype=torch.float64)

    def run_attributes(self) -> dict[str, object]:
        """Run-log attributes: the stages and the parameter memory of every rank."""
        return {
            "num_parameters": self.pipeline.model_numel,
            "apts_ip_stage_bounds": self.pipeline.bounds,
            "apts_ip_parameter_bytes": self.comm.allgather_object(self.pipeline.parameter_bytes),
            "apts_ip_model_parameter_bytes": self.pipeline.model_parameter_bytes,
        }

    def evaluate(self, problem: Problem) -> dict[str, float]:
        """Validation metrics through the pipeline (outputs broadcast from the last stage)."""
        sums = problem.eval_sums(self.pipeline.outputs, problem.val).to(torch.float64)
        return problem.eval_metrics(sums)

    def _local_objective(self) -> LocalObjective:
        pipeline = self.pipeline
        objective: PipelineObjective = self.objective  # type: ignore[assignment]
        assert pipeline.stage_inputs is not None and objective.targets is not None
        if pipeline.last:
            return LocalObjective(
                self.flat, _network, objective.problem.criterion, pipeline.stage_inputs, objective.targets
            )
        assert pipeline.output_grads is not None
        return LocalObjective(self.flat, _network, _linearised_loss, pipeline.stage_inputs, pipeline.output_grads)

    def _local_phase(self, theta_k: Tensor, grad: Tensor) -> tuple[Tensor, dict[str, int]]:
        cfg = self.config
        flat = self.flat
        local = self._local_objective()
        ball = self.radius / math.sqrt(self.comm.size)

        def value(step: Tensor) -> float:
            return local.value(theta_k + step)

        def value_and_grad(step: Tensor) -> tuple[float, Tensor]:
            flat.copy_(theta_k + step)
            loss, local_grad = local.value_and_grad()
            return loss, local_grad.clone()

        def curvature(step: Tensor) -> Any:
            flat.copy_(theta_k + step)
            return local.curvature(self.curvature)

        result = local_trust_region(
            LocalModel(value, value_and_grad, curvature),
            self.local_solver,
            cfg.local_policy(ball),
            ball=ball,
            iterations=cfg.local_iterations,
            value0=local.value(theta_k),
            grad0=grad,
        )
        flat.copy_(theta_k)
        return result.step, {"local_accepted": result.accepted, "local_rejected": result.rejected}

    def step(self) -> StepResult:
        objective: PipelineObjective = self.objective  # type: ignore[assignment]
        radius_before = self.radius
        theta_k = self.flat.clone()
        loss_part = objective.run(backward=True)
        grad = self.flat.grad.clone()
        step_r, counts = self._local_phase(theta_k, grad)

        scalars = self._scalars
        scalars[0] = loss_part
        scalars[1] = -float(grad.double().dot(step_r.double()))
        scalars[2] = float(step_r.double().dot(step_r.double()))
        self.comm.allreduce_(scalars)
        loss, pred, step_norm = float(scalars[0]), float(scalars[1]), math.sqrt(float(scalars[2]))
        if not math.isfinite(loss):
            raise NonFiniteError(f"apts-ip: the loss at the current parameters is {loss} (step {self.steps})")

        self.flat.copy_(theta_k + step_r)
        self._trial[0] = objective.run(backward=False)
        self.comm.allreduce_(self._trial)
        trial_loss = float(self._trial[0])
        decision = decide(self.policy, self.radius, loss, trial_loss, pred, step_norm)
        self.radius = decision.radius
        if not decision.accepted:
            self.flat.copy_(theta_k)
        self.steps += 1
        return StepResult(
            loss=loss,
            radius=radius_before,
            step_norm=step_norm,
            ratio=decision.ratio,
            accepted=decision.accepted,
            extras={"pred": pred, "trial_loss": trial_loss, "reason": decision.reason, **counts},
        )
