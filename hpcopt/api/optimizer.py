"""``hpcopt.optimizer``: any hpcopt optimizer inside a training loop of your own.

The user keeps the loop, the data loader and the logging; hpcopt takes one outer
iteration per call::

    opt = hpcopt.optimizer("apts-d", model, torch.nn.functional.cross_entropy)
    for inputs, targets in loader:            # this rank's shard of each global batch
        loss = opt.step(inputs, targets)      # the global batch loss before the step

Designed after what users of the field know (read, not copied): ``torch.optim`` is
built from the parameters and stepped inside the user's loop, but its
``step(closure)`` hands the optimizer a closure that calls ``backward``; the
second-order and trust-region methods here evaluate the loss, gradient and curvature
at points of their own choosing, so, as DD4ML's APTS does, ``step`` takes the batch
itself and the optimizer owns every evaluation.  As in kfac-pytorch the optimizer is
built from the model (it rebinds the parameters to one flat buffer, which the
model keeps seeing), and as in Distributed Shampoo the options are a typed config,
checked when the optimizer is built.

Each call feeds the same machinery as ``hpcopt train`` (:meth:`Optimizer.run_step
<hpcopt.optimizers.base.Optimizer.run_step>`): the same objective, the same dropout
seeds, so the same batches give the same trajectory.  The internal optimizer is built
at the first step, when a batch exists to check the model and the loss on (and, for
APTS-IP, to check that the forward map is the network itself).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from hpcopt.comm import Communicator
from hpcopt.config import to_dict
from hpcopt.distributed.sharding import ShardBatchSampler
from hpcopt.errors import ConfigError, HpcoptError
from hpcopt.optimizers import make_config, optimizer_class
from hpcopt.optimizers.base import Optimizer as InternalOptimizer
from hpcopt.optimizers.base import StepResult
from hpcopt.problems.custom import PROBE_ROWS, CustomProblem, Forward, Loss, curvature_in_use

STATE_FORMAT = "hpcopt-optimizer"
STATE_VERSION = 1


def _communicator(comm: Any) -> Communicator:
    """An hpcopt :class:`Communicator` over ``comm``: an mpi4py communicator, one already wrapped, or ``None``."""
    if comm is None:
        return Communicator()
    if isinstance(comm, Communicator):
        return comm
    if not all(hasattr(comm, name) for name in ("Get_rank", "Get_size", "Allreduce")):
        raise ConfigError(f"hpcopt.optimizer: comm must be an mpi4py communicator, got {type(comm).__name__}")
    return Communicator(comm)


class Optimizer:
    """One hpcopt optimizer for a training loop of your own; build it with :func:`optimizer`.

    Every rank of ``comm`` holds the whole model, built identically, and calls every
    method below at the same point of its loop (they are collective).

    Attributes:
        name: the optimizer's name (``apts-d``, ``hf``, …, as ``hpcopt train --optimizer``).
        config: its typed options (``hpcopt options NAME``).
        model: the user's model.  Its parameters are views into the optimizer's flat
            buffer, so it holds the current parameters between steps; for APTS-IP each
            rank keeps only its pipeline stage's, and Neumann's iterate is displaced:
            evaluate inside :meth:`evaluation_parameters`.
        comm: the hpcopt communicator over the ranks.
        seed: seeds the dropout masks of each batch, as ``hpcopt train --seed``.
        shard, shards: this rank passes shard ``shard`` of ``shards`` equal shards of
            every global batch: its rank of the world for the data-parallel optimizers;
            for APTS-IP, its pipeline replica's (with one replica, every rank passes the
            whole batch).  :meth:`sampler` gives the matching batch sampler.
        steps: steps taken (restored by :meth:`load_state_dict`).
        last: what the last step recorded (loss, radius, step norm, ratio, accepted), or ``None``.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        loss: Loss,
        *,
        forward: Forward | None = None,
        comm: Any = None,
        seed: int = 0,
        **options: Any,
    ) -> None:
        self.comm = _communicator(comm)
        error: HpcoptError | None = None
        try:
            self.name = name
            self._class = optimizer_class(name)
            # The loop is the user's, so an option counted in epochs of the data must be given.
            self.config = self._class.resolve_config(make_config(name, options), None)
            if not isinstance(model, nn.Module):
                raise ConfigError(f"hpcopt.optimizer: model must be a torch.nn.Module, got {type(model).__name__}")
            if not callable(loss):
                raise ConfigError("hpcopt.optimizer: loss must be callable as loss(outputs, targets)")
            if forward is not None and not callable(forward):
                raise ConfigError("hpcopt.optimizer: forward must be callable as forward(model, inputs)")
            parameters = [p for p in model.parameters() if p.requires_grad]
            if not parameters:
                raise ConfigError("hpcopt.optimizer: the model has no trainable parameters")
            if len({(p.dtype, p.device) for p in parameters}) != 1:
                raise ConfigError("hpcopt.optimizer: the model's parameters must share one dtype and one device")
            # A layout the ranks cannot form (APTS-IP: not a Sequential, too few layers) fails here.
            self._class.checkpoint_layout(self.config, model, self.comm.size)
            # Any batch size the shards divide will do to ask which shard this rank takes.
            self.shard, self.shards = self._class.data_shard(
                self.config, self.comm.rank, self.comm.size, self.comm.size
            )
        except HpcoptError as exc:
            error = exc
        self.comm.agree(error)
        self.model = model
        self.seed = seed
        self.steps = 0
        self.last: StepResult | None = None
        self.num_parameters = sum(p.numel() for p in parameters)
        self._loss = loss
        self._forward = forward
        self._problem: CustomProblem | None = None  # made from the first batch
        self._inner: InternalOptimizer | None = None
        self._pending: dict[str, Any] | None = None

    # -- the loop -------------------------------------------------------------------

    def sampler(self, num_samples: int, batch_size: int, seed: int | None = None) -> ShardBatchSampler:
        """This rank's batch sampler: its shard of every global batch of ``batch_size`` rows.

        The global batches are those of ``hpcopt train --seed SEED --batch-size
        BATCH_SIZE`` (default seed: :attr:`seed`); use it as
        ``DataLoader(dataset, batch_sampler=opt.sampler(len(dataset), 1000))`` and call
        its ``set_epoch(e)`` before each epoch.
        """
        return ShardBatchSampler(num_samples, batch_size, self.seed if seed is None else seed, self.shard, self.shards)

    def step(self, inputs: Tensor, targets: Tensor) -> float:
        """One outer iteration on the global batch whose shard this rank passes; returns its loss before the step.

        Collective.  Every rank passes its shard (:attr:`shard`), all of the same
        number of rows; the global batch is their union, and the loss returned (the same
        on every rank) is its mean loss at the parameters the step started from.

        Raises:
            ConfigError: on every rank, when any rank's shard is malformed (not
                tensors, rows of inputs and targets differ, no rows), the shards differ in
                size, or (checked at the first step, on a few of this rank's rows) the
                forward, the loss, its gradient or the optimizer's curvature products fail,
                or the loss is not a scalar.
        """
        rows = self._check_batch(inputs, targets)
        if self._inner is None:
            self._build()
        assert self._inner is not None
        result = self._inner.run_step(inputs, targets, rows * self.shards, seed=self.seed, step=self.steps)
        self.steps += 1
        self.last = result
        return result.loss

    def _check_batch(self, inputs: Tensor, targets: Tensor) -> int:
        """This rank's rows, once every rank's shard is known to be sound and of one size (one allreduce)."""
        error: HpcoptError | None = None
        rows = 0
        try:
            if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
                raise ConfigError(
                    f"hpcopt.optimizer: step(inputs, targets) takes tensors, got "
                    f"{type(inputs).__name__} and {type(targets).__name__}"
                )
            if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
                raise ConfigError(
                    f"hpcopt.optimizer: inputs and targets need one row per sample, got shapes "
                    f"{tuple(inputs.shape)} and {tuple(targets.shape)}"
                )
            rows = int(inputs.shape[0])
            if rows == 0:
                raise ConfigError("hpcopt.optimizer: this rank's shard of the batch has no rows")
            if self._inner is None:
                # The pieces run once on a few of this rank's rows (forward, loss, gradient,
                # the curvature products the optimizer takes), before any collective.
                probe = (inputs[:PROBE_ROWS], targets[:PROBE_ROWS])
                problem = CustomProblem(self.model, self._loss, probe, forward=self._forward, name="own-loop")
                problem.check_model(self.model, curvature_in_use(self.config))
                self._problem = problem
        except HpcoptError as exc:
            error = exc
        most, neg_least, failed = self.comm.allreduce_scalars([rows, -rows, error is not None], op="max")
        if failed:
            self.comm.agree(error)  # the rare path: every rank raises, with the failing rank's message
        if most != -neg_least:
            raise ConfigError(
                f"hpcopt.optimizer: the ranks' shards of the batch differ in size ({int(-neg_least)} to "
                f"{int(most)} rows); every rank must pass an equal share (drop a last partial batch, as "
                "ShardBatchSampler does)"
            )
        if self._inner is None and self.shards < self.comm.size:
            self._check_replica_batches(inputs, targets)
        return rows

    def _check_replica_batches(self, inputs: Tensor, targets: Tensor) -> None:
        """The ranks of one pipeline replica (APTS-IP) pass the same rows; checked once, at the first step.

        A per-rank shard given to a pipeline would train on mismatched inputs and
        targets without a visible error, so the first batch's sums are compared.
        """
        fingerprint = (self.shard, repr(float(inputs.double().sum())), repr(float(targets.double().sum())))
        seen: dict[int, tuple[str, str]] = {}
        for shard, *sums in self.comm.allgather_object(fingerprint):
            if seen.setdefault(shard, (sums[0], sums[1])) != (sums[0], sums[1]):
                raise ConfigError(
                    f"hpcopt.optimizer: {self.name} gives all ranks of a pipeline one shard of the batch, but "
                    f"the ranks of shard {shard} passed different rows: pass opt.shard of opt.shards equal "
                    "shards (opt.sampler does)"
                )

    def _build(self) -> None:
        """Build the internal optimizer (collective); rank 0's parameters are every rank's, as in DDP."""
        whole = torch.cat([p.detach().flatten() for p in self.model.parameters() if p.requires_grad])
        self.comm.bcast_(whole)
        _copy_into(self.model, whole)
        assert self._problem is not None  # made by the first _check_batch
        self._inner = self._class.build(self._problem, self.model, self.comm, self.config)
        if self._pending is not None:
            self._inner.load_model(self._pending["parameters"], self._pending["buffers"])
            if self._pending["optimizer"] is not None:
                self._inner.load_state_dict(self._pending["optimizer"])
            self._pending = None

    # -- evaluation and restart -----------------------------------------------------

    @contextlib.contextmanager
    def evaluation_parameters(self) -> Iterator[nn.Module]:
        """Collective: the model, holding the parameters the method stands for, for the ``with`` block.

        For most methods the model already does; Neumann's iterate is displaced (the
        parameters are w − μm inside), and with APTS-IP every rank holds one stage, so
        the whole model is gathered into every rank's model.
        """
        if self._inner is None:
            yield self.model
            return
        with self._inner.evaluation_parameters():
            parameters, buffers = self._inner.gather_model()
            _copy_into(self.model, parameters, self._replica_buffers(buffers))
            yield self.model

    def state_dict(self) -> dict[str, Any]:
        """Collective: everything a restart needs, the same on every rank (save it from rank 0).

        The whole model's parameters and buffers, the optimizer's state, the step count
        and every rank's torch CPU random number generator state (dropout masks are drawn
        from it), as ``hpcopt train``'s checkpoints hold them.  Tensors are copies on the
        CPU; ``torch.load(..., weights_only=True)`` reads a saved state back.
        """
        rng = self.comm.allgather_object(torch.get_rng_state())
        if self._inner is None and self._pending is not None:
            return {**copy.deepcopy(self._pending), "steps": self.steps, "rng": rng}
        if self._inner is None:
            parameters = torch.cat([p.detach().flatten() for p in self.model.parameters() if p.requires_grad])
            buffers = [dict(self.model.named_buffers())]
            optimizer_state: dict[str, Any] | None = None
        else:
            parameters, buffers = self._inner.gather_model()
            optimizer_state = self._inner.state_dict()
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "optimizer_name": self.name,
            "config": to_dict(self.config),
            "world_size": self.comm.size,
            "steps": self.steps,
            "parameters": parameters.detach().cpu().clone(),
            "buffers": [{key: value.detach().cpu().clone() for key, value in group.items()} for group in buffers],
            "optimizer": optimizer_state,
            "rng": rng,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s result, bit for bit (no communication).

        Raises:
            ConfigError: the state is not an optimizer state, or was saved by another
                optimizer, for another model size or at another rank count.
        """
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ConfigError("hpcopt.optimizer: load_state_dict() needs what Optimizer.state_dict() returned")
        if state["optimizer_name"] != self.name:
            raise ConfigError(f"hpcopt.optimizer: a state of {state['optimizer_name']} cannot restart {self.name}")
        numel = int(state["parameters"].numel())
        if numel != self.num_parameters:
            raise ConfigError(
                f"hpcopt.optimizer: the state holds {numel} parameters, the model has {self.num_parameters}"
            )
        if state["world_size"] != self.comm.size:
            # As hpcopt train --resume: the shards and the local models depend on the rank count.
            raise ConfigError(
                f"hpcopt.optimizer: the state was saved at {state['world_size']} rank(s); this run has "
                f"{self.comm.size} (a restart needs the same rank count)"
            )
        self.steps = int(state["steps"])
        torch.set_rng_state(state["rng"][self.comm.rank])
        if self._inner is None:
            # Applied when the first step builds the optimizer; the model shows it from now on.
            self._pending = {key: value for key, value in state.items() if key not in ("steps", "rng")}
            _copy_into(self.model, state["parameters"], self._replica_buffers(state["buffers"]))
            return
        self._inner.load_model(state["parameters"], state["buffers"])
        if state["optimizer"] is not None:
            self._inner.load_state_dict(state["optimizer"])

    def _replica_buffers(self, buffers: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """This rank's buffers out of a per-replica list: its pipeline replica's (APTS-IP), else the one entry."""
        return buffers[self.shard] if len(buffers) == self.shards else buffers[0]


def _copy_into(model: nn.Module, parameters: Tensor, buffers: Mapping[str, Tensor] | None = None) -> None:
    """Set the whole ``model`` to a flat parameter vector (its order) and a ``name → tensor`` buffer dict."""
    with torch.no_grad():
        start = 0
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(parameters[start : start + p.numel()].view_as(p))
                start += p.numel()
        if buffers:
            own = dict(model.named_buffers())
            for key, value in buffers.items():
                own[key].copy_(value)


def optimizer(
    name: str,
    model: nn.Module,
    loss: Loss,
    *,
    forward: Forward | None = None,
    comm: Any = None,
    seed: int = 0,
    **options: Any,
) -> Optimizer:
    """An hpcopt optimizer for a training loop of your own (collective: every rank calls it).

    Args:
        name: ``apts-d``, ``apts-p``, ``apts-ip``, ``hf``, ``nlcg``, ``neumann``, ``sgd``
            or ``adam`` (``hpcopt options``).  APTS-IP cuts the model into pipeline
            stages: it needs an ``nn.Sequential`` with at least as many layers with
            parameters as stages, and ``forward=None``.
        model: the whole model, identical on every rank (rank 0's parameters are
            broadcast at the first step, as DDP does).
        loss: ``loss(outputs, targets)``, the **mean** loss over the batch's rows (a
            scalar tensor), e.g. ``torch.nn.functional.cross_entropy``.
        forward: ``forward(model, inputs)``, the outputs that ``loss`` scores (default
            ``model(inputs)``); it must compose with ``torch.func`` and double backward.
        comm: an mpi4py communicator (default ``MPI.COMM_WORLD``).
        seed: seeds each batch's dropout masks, as ``hpcopt train --seed``.
        **options: the optimizer's options, as ``--set KEY=VALUE`` (same names, types and checks).

    Raises:
        ConfigError: on every rank: an unknown name or option, a bad value, a model
            without trainable parameters, or a layout the ranks cannot form.
    """
    return Optimizer(name, model, loss, forward=forward, comm=comm, seed=seed, **options)


__all__ = ["Forward", "Loss", "Optimizer", "optimizer"]
