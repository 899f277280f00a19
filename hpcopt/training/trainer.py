"""The training driver behind ``hpcopt train``.

Order of work, chosen so that bad input never hangs a job:

1. every rank validates the options, the data and the output path on its own;
2. one ``agree`` collective makes any rank's error every rank's error;
3. only then do the run log, the model and the collectives of training start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

import hpcopt
from hpcopt.comm import Communicator
from hpcopt.config import require, to_dict
from hpcopt.distributed.sharding import GlobalBatches
from hpcopt.errors import ConfigError, HpcoptError
from hpcopt.log import checkpoint
from hpcopt.log.lock import WriterLocks
from hpcopt.log.provenance import SourceRevision, source_revision
from hpcopt.log.runlog import EvaluationRecord, IterationRecord, RunLog
from hpcopt.optimizers import make_config, optimizer_class
from hpcopt.optimizers.base import Optimizer
from hpcopt.problems import make_problem
from hpcopt.problems.base import Dataset, Problem
from hpcopt.problems.custom import curvature_in_use
from hpcopt.problems.defaults import under
from hpcopt.testing import faults
from hpcopt.training.config import TrainConfig
from hpcopt.training.device import resolve_kind, select_device
from hpcopt.training.heap import set_heap
from hpcopt.training.preemption import Stop, StopSignals
from hpcopt.training.progress import Progress
from hpcopt.training.signature import check_same_on_every_rank, run_signature


@dataclass
class TrainResult:
    """What a finished run returns (rank 0's view; identical on every rank)."""

    steps: int
    epochs: int
    final_loss: float
    metrics: dict[str, float]
    wall_time: float
    parameters: torch.Tensor
    losses: list[float]
    #: The trained module; ``None`` when no rank holds all of it (APTS-IP's stages).
    model: torch.nn.Module | None = None
    #: The run log's status: ``completed``, or ``preempted``/``interrupted`` when a signal
    #: stopped the run (:mod:`hpcopt.training.preemption`; ``exit_code`` gives the exit status).
    status: str = "completed"


def _target_reached(cfg: TrainConfig, problem: Problem, metrics: dict[str, float]) -> bool:
    """Whether the metric meets ``--target`` (≥ for accuracies, ≤ for errors); False without a target."""
    value = metrics.get(problem.metric_name, math.nan)
    if cfg.target is None:
        return False
    return value >= cfg.target if problem.metric_higher_is_better else value <= cfg.target


def _stop_reason(
    cfg: TrainConfig, problem: Problem, metrics: dict[str, float], elapsed: float, comm: Communicator
) -> str:
    """Why training should stop after this evaluation ("" to go on); identical on every rank."""
    value = metrics[problem.metric_name]
    if _target_reached(cfg, problem, metrics):
        relation = ">=" if problem.metric_higher_is_better else "<="
        return f"target reached: {problem.metric_name} {value:.4g} {relation} {cfg.target:g}"
    if cfg.time_limit is not None:
        # Clocks differ between ranks: the slowest rank's decides, so all stop together.
        slowest = comm.allreduce_scalars([elapsed], op="max")[0]
        if slowest >= cfg.time_limit:
            # Say what the limit cut short, so that a run stopped early is not read as converged.
            missed = ""
            if cfg.target is not None:
                missed = f" before the target {cfg.target:g} ({problem.metric_name} {value:.4g})"
            return f"time limit {cfg.time_limit:g}s reached{missed}"
    return ""


def _report_stop(stopped: Stop, step: int, checkpointer: checkpoint.Checkpointer | None, out: str | None) -> None:
    """Rank 0's one line on stderr (even with --quiet: a batch log must say why the job ended)."""
    if checkpointer is not None:
        kept = f"checkpoint {checkpointer.path} written; resume with --resume {checkpointer.path}"
    else:
        kept = "no checkpoint (give --checkpoint PATH to keep one)"
    log = f"run log {out} closed as {stopped.status}; " if out else ""
    sys.stderr.flush()
    os.write(
        2,
        f"hpcopt: {stopped.status} by {stopped.signal_name} after step {step}: {log}{kept} "
        f"(exit {stopped.exit_code})\n".encode(),
    )


def _stopping_rule(cfg: TrainConfig, problem: Problem) -> str:
    """One line on when the run ends, because a problem's defaults may set a target and a time limit."""
    rules = [f"{cfg.epochs} epochs"]
    if cfg.max_steps is not None:
        rules.append(f"{cfg.max_steps} steps")
    if cfg.target is not None:
        relation = ">=" if problem.metric_higher_is_better else "<="
        rules.append(f"{problem.metric_name} {relation} {cfg.target:g} (--target)")
    if cfg.time_limit is not None:
        rules.append(f"{cfg.time_limit:g}s (--time-limit)")
    return f"stops at the first of: {', '.join(rules)}; evaluates every {cfg.eval_every} epoch(s)"


def _spatial_key(cfg: TrainConfig, optimizer_config: Any, problem: Problem) -> torch.Tensor | None:
    """The first coordinate of every training point when ``--set shard=spatial``, else ``None``."""
    if getattr(optimizer_config, "shard", "batch") != "spatial":
        return None
    jet_points = getattr(problem, "jet_points", None)
    require(
        jet_points is not None,
        f"{cfg.optimizer}: shard=spatial needs a PINN problem (collocation points with coordinates); "
        f"'{cfg.problem}' has none",
    )
    assert jet_points is not None  # for the type checker: require raised otherwise
    return jet_points(problem.train.inputs)[:, 0]


def _kernels_name(optimizer: Optimizer) -> str:
    """``cuda`` when the optimizer runs the fused CUDA kernels, else ``torch`` (CPU, or a GPU without CuPy)."""
    kernels = getattr(optimizer, "kernels", None)
    return "torch" if kernels is None else str(kernels.name)


def _move_data(problem: Problem, device: torch.device) -> None:
    """Put the training and validation sets on the compute device (once, before training).

    Rows read on demand (a user's ``Dataset``) stay where they are; each shard moves when read.
    """
    for name in ("train", "val"):
        data = getattr(problem, name)
        if not isinstance(data, Dataset):
            continue
        setattr(problem, name, Dataset(data.inputs.to(device), data.targets.to(device)))


def _take_rank0_model(model: torch.nn.Module, comm: Communicator) -> None:
    """Every rank takes rank 0's weights and buffers: a module the user built on each rank may differ.

    Once, at start-up, so the pickled broadcast of the state dict costs nothing that matters.
    """
    state = comm.bcast_object({k: v.detach().cpu() for k, v in model.state_dict().items()} if comm.is_root else None)
    error: HpcoptError | None = None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        error = ConfigError(
            f"the model differs between ranks, so it cannot take rank 0's weights: {' '.join(str(exc).split())}"
        )
    comm.agree(error)


def _setup(
    cfg: TrainConfig,
    optimizer_options: dict[str, Any],
    problem_options: dict[str, Any],
    comm: Communicator,
    given: Problem | None = None,
) -> tuple[Any, Problem, GlobalBatches, torch.nn.Module, dict[str, Any] | None]:
    """Everything that can fail on bad input, done before any collective; the last item is the
    checkpoint of ``--resume``, loaded (``None`` for a fresh run).

    ``given``: a problem object (``hpcopt.train``), used instead of building ``cfg.problem``.
    """
    cfg.validate()
    faults.check_environment()  # a malformed HPCOPT_FAULT fails here, before the run log exists
    # --device cuda without a GPU, or a bad HPCOPT_CUDA_AWARE, fails here on every rank.
    if resolve_kind(cfg.device) == "cuda":
        _ = comm.cuda_aware
    optimizer_config = make_config(cfg.optimizer, optimizer_options)
    if cfg.out is not None:
        RunLog.check_path(cfg.out, overwrite=cfg.overwrite)
    resume_state = None
    if cfg.resume is not None:
        checkpoint.check_distinct(cfg.out, None, cfg.resume)  # before reading it: the log may be it
        resume_state = checkpoint.load(cfg.resume)
    problem = given or make_problem(cfg.problem, data_dir=cfg.data_dir, seed=cfg.seed, options=problem_options)
    suggested = problem.default_optimizer_options(cfg.optimizer)
    if suggested:  # a user's least-squares problem: Gauss–Newton where the user chose nothing else
        optimizer_config = make_config(cfg.optimizer, under(suggested, optimizer_options))
    batch_size = problem.resolve_batch_size(cfg.batch_size)
    # A model-parallel optimizer gives all ranks of a pipeline one shard; a bad layout raises here.
    shard, shards = optimizer_class(cfg.optimizer).data_shard(optimizer_config, comm.rank, comm.size, batch_size)
    batches = GlobalBatches(
        len(problem.train), batch_size, cfg.seed, shard, shards, _spatial_key(cfg, optimizer_config, problem)
    )
    # Options counted in epochs of the data (Neumann's schedules) get the data's epoch and the run's length where unset.
    # A resumed run keeps the options fitted to its first length, also when --epochs extends it.
    optimizer_config = optimizer_class(cfg.optimizer).resolve_config(
        optimizer_config, batches.batches_per_epoch, checkpoint.run_epochs(resume_state, cfg.epochs)
    )
    torch.manual_seed(cfg.seed)  # identical initial parameters on every rank
    model = problem.build_model(cfg.model)
    # A user's problem runs its pieces once on a few rows: a broken one fails here, on every rank.
    problem.check_model(model, curvature_in_use(optimizer_config))
    return optimizer_config, problem, batches, model, resume_state


def _checkpointing(
    cfg: TrainConfig,
    optimizer_config: Any,
    problem: Problem,
    batch_size: int,
    model: Any,
    comm: Communicator,
    state: dict[str, Any] | None,
) -> tuple[dict[str, Any], str | None, dict[str, Any] | None, dict[str, Any] | None]:
    """What must match to resume, the checkpoint path, the validated resume state and the model's layout.

    ``state``: the checkpoint of ``cfg.resume``, loaded; ``None`` for a fresh run. No
    collectives.  The layout is the optimizer's ``checkpoint_layout`` (APTS-IP's stages,
    replicas and layer cuts); ``None`` for the data-parallel optimizers and when the run
    neither writes nor reads a checkpoint.
    """
    compat = checkpoint.compat_fields(
        problem=cfg.problem,
        model=cfg.model or problem.default_model,
        optimizer=cfg.optimizer,
        seed=cfg.seed,
        batch_size=batch_size,
        optimizer_config=to_dict(optimizer_config),
        problem_options=getattr(problem, "options", {}),
        num_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    path = cfg.checkpoint or (checkpoint.default_path(cfg.out) if cfg.checkpoint_every else None)
    require(not cfg.checkpoint_every or path is not None, "--checkpoint-every needs --checkpoint PATH or --out")
    checkpoint.check_distinct(cfg.out, path, None)  # the log against the resumed checkpoint: in _setup, before reading
    if path is not None:
        checkpoint.check_path(path, overwrite=cfg.overwrite, resume=cfg.resume)
    layout = None
    if path is not None or cfg.resume is not None:
        layout = optimizer_class(cfg.optimizer).checkpoint_layout(optimizer_config, model, comm.size)
    if state is not None and cfg.resume is not None:
        checkpoint.check_resumable(state, cfg.resume, compat, comm.size, layout)
        require(
            cfg.max_steps is None or state["step"] < cfg.max_steps,
            f"checkpoint {cfg.resume} is at step {state['step']}; --max-steps {cfg.max_steps} leaves nothing to do",
        )
    return compat, path, state, layout


def train(
    cfg: TrainConfig,
    optimizer_options: dict[str, Any] | None = None,
    problem_options: dict[str, Any] | None = None,
    comm: Communicator | None = None,
    problem: Problem | None = None,
) -> TrainResult:
    """Run one training job; raises :class:`HpcoptError` on bad input (on every rank).

    ``problem``: a problem object to train (``hpcopt.train``) instead of building ``cfg.problem``.
    """
    comm = comm or Communicator()
    # Rank 0 locks the files it writes (hpcopt.log.lock); they are unlocked on every way out.
    # From here on SIGTERM, SIGINT and --stop-signal only set a flag, read at step boundaries.
    with WriterLocks(enabled=comm.is_root) as locks, StopSignals(comm, cfg.stop_signal) as signals:
        return _train(cfg, optimizer_options, problem_options, comm, locks, problem, signals)


def _train(
    cfg: TrainConfig,
    optimizer_options: dict[str, Any] | None,
    problem_options: dict[str, Any] | None,
    comm: Communicator,
    locks: WriterLocks,
    given: Problem | None = None,
    signals: StopSignals | None = None,
) -> TrainResult:
    optimizer_options = dict(optimizer_options or {})
    problem_options = dict(problem_options or {})
    torch.set_num_threads(cfg.threads)
    set_heap(cfg.heap)
    error: HpcoptError | None = None
    try:
        optimizer_config, problem, batches, model, resume_state = _setup(
            cfg, optimizer_options, problem_options, comm, given
        )
        compat, checkpoint_path, resume, layout = _checkpointing(
            cfg, optimizer_config, problem, batches.batch_size, model, comm, resume_state
        )
        if resume is not None:
            checkpoint.check_not_done(resume, str(cfg.resume), cfg.epochs, batches.batches_per_epoch)
        locks.acquire(cfg.out, "run log")
        locks.acquire(checkpoint_path, "checkpoint")
    except HpcoptError as exc:
        error = exc
    comm.agree(error)
    if problem.model_from_rank0:
        _take_rank0_model(model, comm)

    device = select_device(cfg.device, comm)
    if device.device.type != "cpu":
        model.to(device.device)
        _move_data(problem, device.device)
    model.train()
    # A model-parallel optimizer keeps only this rank's part of the model (APTS-IP); the
    # whole model, identical on every rank until now, is what the cross-rank check sees.
    signature_parameters = torch.cat([p.detach().flatten() for p in model.parameters()])
    optimizer = optimizer_class(cfg.optimizer).build(problem, model, comm, optimizer_config)
    flat = optimizer.flat
    comm.collective_timeout = cfg.collective_timeout
    if resume is not None:
        # A part only some ranks read (an RNG state, an APTS-IP stage) can be damaged for them alone.
        restore_error: HpcoptError | None = None
        try:
            checkpoint.restore(resume, optimizer=optimizer, rank=comm.rank, path=str(cfg.resume))
        except HpcoptError as exc:
            restore_error = exc
        comm.agree(restore_error)
    # The run log and the cross-rank check record the batch size the run uses, not None for "the default".
    cfg = dataclasses.replace(cfg, batch_size=batches.batch_size)
    config_json = json.dumps(
        {"train": to_dict(cfg), "optimizer": to_dict(optimizer_config), "problem": problem_options}, default=str
    )
    check_same_on_every_rank(
        comm, run_signature(config_json, signature_parameters, len(problem.train), len(problem.val))
    )
    checkpointer = (
        None
        if checkpoint_path is None
        else checkpoint.Checkpointer(
            checkpoint_path,
            cfg.checkpoint_every,
            comm,
            compat,
            cfg.out,
            layout,
            run_epochs=checkpoint.run_epochs(resume, cfg.epochs),
        )
    )
    say = (lambda text: print(text, flush=True)) if comm.is_root and not cfg.quiet else (lambda text: None)

    # Only the writer asks git: a fork per rank is hundreds of processes on a large job, and some
    # MPI transports (OpenFabrics) warn about fork() after MPI_Init.
    source = source_revision() if comm.is_root and cfg.out is not None else SourceRevision("", "")
    attributes = {
        "hpcopt_version": hpcopt.__version__,
        "optimizer": cfg.optimizer,
        "problem": cfg.problem,
        "model": cfg.model or problem.default_model,
        "world_size": comm.size,
        "num_parameters": flat.numel,
        "seed": cfg.seed,
        "batch_size": batches.batch_size,
        "config_json": json.dumps(
            {"train": to_dict(cfg), "optimizer": to_dict(optimizer_config), "problem": problem_options}
        ),
        "mpi_library_version": comm.library_version(),
        "torch_version": str(torch.__version__),
        "hostnames": sorted(set(comm.hostnames())),
        "git_sha": source.sha,
        "git_status": source.status,
        "command": " ".join(sys.argv),
        # What the user asked for: a plug-in's spec is in "problem", its options here.
        "problem_options": json.dumps(problem_options, default=str),
        "resumed_from": cfg.resume or "",
        "resumed_at_step": resume["step"] if resume is not None else 0,
        # The run log of the run this one continues (a requeued job's earlier log).
        "previous_log": resume["log"]["path"] if resume is not None else "",
        "device": str(device.device),
        "gpu_model": device.gpu_model,
        "cuda_aware_mpi": comm.cuda_aware if device.device.type == "cuda" else False,
        # Which vector updates the hot paths run: the CUDA kernels of kernels/*.cu or plain torch.
        "kernels": _kernels_name(optimizer),
    }
    # Optimizer-specific facts (APTS-P's block imbalance, APTS-IP's per-rank parameter bytes).
    attributes.update(optimizer.run_attributes())
    log = RunLog(cfg.out, enabled=comm.is_root and cfg.out is not None, overwrite=cfg.overwrite)
    # A problem without a metric of its own reports val_loss, which every log has already.
    metric_names = [problem.metric_name] if problem.metric_name != "val_loss" else []
    say(
        f"hpcopt {hpcopt.__version__}: {cfg.optimizer} on {cfg.problem} ({attributes['model']}, "
        f"{flat.numel} parameters), {comm.size} rank(s), global batch {batches.batch_size}, "
        f"{batches.batches_per_epoch} steps/epoch"
    )
    say(_stopping_rule(cfg, problem))
    if device.device.type == "cuda":
        say(
            f"{device.describe(comm.size)}; MPI {'is' if comm.cuda_aware else 'is not'} CUDA-aware; "
            f"vector updates: {attributes['kernels']}"
        )
    # Enabled on rank 0 only: it shows what rank 0 already holds (the step's global loss and
    # radius), so progress adds no collective and every rank runs the same numerics.
    progress = Progress(
        enabled=comm.is_root and not cfg.quiet,
        epochs=cfg.epochs,
        every=cfg.progress_every,
        seconds=cfg.progress_seconds,
    )
    # closing(problem.train): a user's Dataset keeps its reader processes across epochs; they end here.
    with log, progress, contextlib.closing(problem.train):
        log.open(attributes, metric_names=metric_names)
        start = time.perf_counter()
        comm_seconds_at_start = comm.stats.seconds
        losses: list[float] = []
        metrics: dict[str, float] = {}
        step = resume["step"] if resume is not None else 0
        first_epoch = resume["epoch"] if resume is not None else 1
        epoch = 0
        done = False
        stopped: Stop | None = None  # set when the ranks agree that a signal stops the run
        for epoch in range(first_epoch, cfg.epochs + 1):
            epoch_losses: list[float] = []
            if resume is not None and epoch == first_epoch:
                epoch_losses = [float(x) for x in resume["epoch_losses"]]
            progress.start_epoch(epoch, batches.batches_per_epoch, done=len(epoch_losses))
            # Shards done before the checkpoint this run resumed from are skipped unread; rows
            # of a user's Dataset are read here, this rank's only (num_workers or a
            # read_ahead thread read ahead).
            indices = itertools.islice(batches.epoch(epoch - 1), len(epoch_losses), None)
            shards = problem.train.batches(indices, num_workers=cfg.num_workers, read_ahead=cfg.read_ahead)
            for batch_index, shard in enumerate(shards, start=len(epoch_losses)):
                if shard.inputs.device != flat.device:
                    shard = Dataset(shard.inputs.to(flat.device), shard.targets.to(flat.device))
                calls0, bytes0, seconds0 = comm.stats.totals()
                result = optimizer.run_step(shard.inputs, shard.targets, batches.batch_size, seed=cfg.seed, step=step)
                calls1, bytes1, seconds1 = comm.stats.totals()
                step += 1
                losses.append(result.loss)
                epoch_losses.append(result.loss)
                progress.update(result.loss, result.radius)
                log.log_iteration(
                    IterationRecord(
                        step=step,
                        epoch=(epoch - 1) + len(epoch_losses) / batches.batches_per_epoch,
                        loss=result.loss,
                        radius=result.radius,
                        step_norm=result.step_norm,
                        ratio=result.ratio,
                        accepted=result.accepted,
                        wall_time=time.perf_counter() - start,
                        comm_calls=calls1 - calls0,
                        comm_bytes=bytes1 - bytes0,
                        comm_time=seconds1 - seconds0,
                    )
                )
                stopping = cfg.max_steps is not None and step >= cfg.max_steps
                if cfg.time_limit is not None and not stopping:
                    # Checked after every step, not at the next evaluation: a method whose
                    # evaluations are far apart in time would otherwise train for longer.
                    # The slowest rank's clock decides, so every rank stops at this step.
                    elapsed = time.perf_counter() - start
                    stopping = comm.allreduce_scalars([elapsed], op="max")[0] >= cfg.time_limit
                last = stopping or (epoch == cfg.epochs and batch_index == batches.batches_per_epoch - 1)
                # Every rank, every step: one allreduce makes one rank's signal everyone's, at this
                # step.  After the last step the run simply completes.
                agreed = signals.agree() if signals is not None else None
                stopped = None if last else agreed
                if checkpointer is not None and (checkpointer.due(step, last) or stopped is not None):
                    checkpointer.save(
                        step=step,
                        epoch=epoch,
                        batch_in_epoch=len(epoch_losses),
                        epoch_losses=epoch_losses,
                        optimizer=optimizer,
                        log_rows=log.num_iterations,
                    )
                if stopping or stopped is not None:
                    done = True
                    break
            progress.close()  # the bar is cleared before the evaluation line prints
            if stopped is not None:
                break  # no evaluation: the resumed run evaluates this epoch when it ends
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs or done:
                with optimizer.evaluation_parameters():  # e.g. Neumann's w − μm, not the displaced w
                    metrics = optimizer.evaluate(problem)
                train_loss = sum(epoch_losses) / max(len(epoch_losses), 1)
                elapsed = time.perf_counter() - start
                log.log_evaluation(
                    EvaluationRecord(
                        # Fractional when a stop criterion ended the epoch early, as in `iterations/epoch`.
                        epoch=(epoch - 1) + len(epoch_losses) / batches.batches_per_epoch,
                        wall_time=elapsed,
                        train_loss=train_loss,
                        val_loss=metrics["val_loss"],
                        metrics={k: v for k, v in metrics.items() if k != "val_loss"},
                    )
                )
                # A trust-region method's radius; the others have none, and print none.
                radius = getattr(optimizer, "radius", math.nan)
                radius_text = "" if math.isnan(radius) else f"radius {radius:.3g}  "
                metric = (
                    ""
                    if problem.metric_name == "val_loss"
                    else f"{problem.metric_name} {metrics[problem.metric_name]:.4g}  "
                )
                say(
                    f"epoch {epoch:4d}/{cfg.epochs}  loss {train_loss:.4e}  val_loss {metrics['val_loss']:.4e}  "
                    f"{metric}{radius_text}time {elapsed:.1f}s"
                )
                stop = _stop_reason(cfg, problem, metrics, elapsed, comm)
                if stop:
                    say(f"stopping after epoch {epoch} (step {step}): {stop}")
                    done = True
            if done:
                break
        wall = time.perf_counter() - start
        comm_seconds = comm.stats.seconds - comm_seconds_at_start
        times = comm.allgather_object((wall - comm_seconds, comm_seconds))
        log.set_rank_times([t[0] for t in times], [t[1] for t in times])
        if stopped is not None:
            log.close(stopped.status)
    if stopped is not None:
        if comm.is_root:
            _report_stop(stopped, step, checkpointer, cfg.out)
        # No rank may exit (non-zero) before rank 0 has closed its files: mpiexec kills
        # the remaining ranks at once when one of them exits with an error status.
        comm.barrier()

    nbytes = comm.stats.bytes - (signals.bytes if signals is not None else 0)
    say(
        f"done: {step} steps, {epoch} epochs in {wall:.1f}s; final {problem.metric_name} "
        f"{metrics.get(problem.metric_name, math.nan):.4g}"
        + (
            ""
            if cfg.target is None
            else f" (target {cfg.target:g} {'reached' if _target_reached(cfg, problem, metrics) else 'NOT reached'})"
        )
        + f", val_loss {metrics.get('val_loss', math.nan):.4e}; "
        f"{nbytes / max(step, 1) / 4 / flat.numel:.2f}n floats/step moved by rank 0"
        + (f"; run log {cfg.out}" if cfg.out else "")
    )
    with optimizer.evaluation_parameters():
        final_parameters = flat.clone()
    return TrainResult(
        steps=step,
        epochs=epoch,
        final_loss=losses[-1] if losses else math.nan,
        metrics=metrics,
        wall_time=wall,
        parameters=final_parameters,
        losses=losses,
        model=model if flat.model is model else None,
        status=stopped.status if stopped is not None else "completed",
    )
