"""Checkpoint and restart of ``hpcopt train``: everything that makes k + m steps bit-exact.

A checkpoint is one ``torch.save`` of a dict holding only tensors, numbers, strings
and lists/dicts of them, so it loads with ``torch.load(..., weights_only=True)``:

* ``format``, ``version``, ``world_size`` and ``compat`` — what must match to resume
  (problem, model, optimizer, seed, global batch size, optimizer and problem
  options, parameter count);
* ``step`` (global steps done), ``epoch`` (1-based epoch of the last step),
  ``batch_in_epoch`` (batches of that epoch done) and ``epoch_losses`` (their losses,
  for the epoch's mean train loss): the data-loader position.  Batches depend only
  on ``(seed, epoch)``, so skipping ``batch_in_epoch`` batches restores the order;
* ``parameters`` (the flat vector) and ``buffers`` (batch-norm statistics);
* ``optimizer``: :meth:`hpcopt.optimizers.base.Optimizer.state_dict`;
* ``rng``: every rank's torch CPU generator state, gathered to rank 0 (rank r
  restores entry r);
* ``log``: the run log path and how many iteration rows it held.  A resumed run
  writes a *new* run log (``--out``) whose ``step`` column continues at
  ``step + 1``; its attributes ``resumed_from`` and ``resumed_at_step`` link it to
  the first;
* ``run_epochs``: the run length in epochs that the optimizer's length-scaled options
  were fitted to where unset (Neumann's burn-in and first reset period): the first run's
  ``--epochs``, kept by every resumed run, so that extending a run with a larger
  ``--epochs`` keeps them (:func:`run_epochs`; absent in older checkpoints: the resumed
  run's ``--epochs`` then);
* ``pipeline`` (APTS-IP only, where each rank holds one stage): ``stages``,
  ``replicas``, ``stage_bounds`` (the layer cuts) and ``buffers`` (one whole-model
  dict per replica).  ``parameters`` is then the *whole* model's vector, gathered
  from the stages of replica 0 (the replicas of a stage are bit-identical), and
  ``buffers`` is replica 0's; on resume every rank takes its stage's slice.

The optimizer moves the model in and out (:class:`Checkpointable`: its
``gather_model`` and ``load_model``) and the trainer passes the layout a model-parallel
optimizer reports, so nothing here depends on how the model is spread over the ranks.

Writing is atomic: rank 0 saves to ``<path>.tmp-<pid>``, fsyncs, and renames onto
``path`` with ``os.replace``, so a crash at any moment leaves either the previous
checkpoint or the new one, never a torn file.  A write error on rank 0 becomes every
rank's error through ``comm.agree``.

A leftover ``<path>.tmp-<pid>`` of a job killed between write and rename is removed by
the next job that writes ``path`` (:mod:`hpcopt.log.lock`, whose lock file also keeps
two jobs from writing one checkpoint).

Loading trusts nothing: the file is unpickled with ``weights_only=True`` (a hostile
file cannot run code; the error never suggests ``weights_only=False``), then every
entry is checked for presence, type and shape against this run (:func:`load`,
:func:`check_resumable`, :func:`restore`), so a damaged or crafted file is a one-line
:class:`~hpcopt.errors.ConfigError` on every rank instead of a traceback on some.

Resuming needs the rank count the checkpoint was written with: the data shards,
the per-rank RNG states and APTS-D's local models (radius Δ/P) all depend on it.
A different count is refused with a clear message rather than re-sharded silently;
so is, for APTS-IP, a different stages × replicas layout at the same count.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from hpcopt.comm import Communicator
from hpcopt.errors import ConfigError, HpcoptError, OutputError
from hpcopt.log.lock import same_file
from hpcopt.testing import faults

FORMAT = "hpcopt-checkpoint"
VERSION = 1


class Checkpointable(Protocol):
    """What a checkpoint needs of an optimizer (:class:`hpcopt.optimizers.base.Optimizer` has it)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def gather_model(self) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Collective: the whole model's flat parameters and each replica's buffers (maybe live tensors)."""
        ...

    def load_model(self, parameters: torch.Tensor, buffers: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Take this rank's part of the whole model back (no communication)."""
        ...


def default_path(out: str | None) -> str | None:
    """The checkpoint beside the run log: ``<out>.ckpt`` (``None`` without a log)."""
    return None if out is None else f"{out}.ckpt"


def check_distinct(out: str | None, path: str | None, resume: str | None) -> None:
    """Refuse a run log that is also the checkpoint written or resumed (links resolved).

    The checkpoint may be the one resumed: continuing a run replaces its own checkpoint.
    """
    if out is not None and path is not None and same_file(out, path):
        raise ConfigError(
            f"the run log and the checkpoint are one file, {out}: the checkpoint would replace the log; "
            "give --checkpoint another path"
        )
    if out is not None and resume is not None and same_file(out, resume):
        raise ConfigError(
            f"--out {out} is the checkpoint being resumed: the run log would destroy it; give --out another path"
        )


def check_path(path: str, *, overwrite: bool, resume: str | None) -> None:
    """Raise :class:`OutputError` unless a checkpoint can be written at ``path``.

    An existing file is refused unless ``overwrite`` is set or it is the checkpoint
    being resumed (continuing a run keeps replacing its own checkpoint).
    """
    if not path:
        raise OutputError("checkpoint path is empty")
    if os.path.isdir(path):
        raise OutputError(f"checkpoint path {path} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputError(f"cannot write checkpoint {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write checkpoint {path}: directory {parent} is not writable")
    same_as_resume = resume is not None and os.path.abspath(resume) == os.path.abspath(path)
    if os.path.lexists(path) and not overwrite and not same_as_resume:
        raise OutputError(f"checkpoint {path} already exists; choose another path or allow overwriting it")


def atomic_save(state: Mapping[str, Any], path: str, *, step: int = 0) -> None:
    """``torch.save(state)`` to a temporary file, fsync, then ``os.replace`` onto ``path``."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            torch.save(dict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        faults.inject("checkpoint", 0, step)  # tests: a crash between write and rename
        os.replace(temporary, path)
    except BaseException:
        # Whatever happened, the previous checkpoint at `path` is untouched.
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    try:
        directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)  # make the rename itself durable
    except OSError:
        pass
    finally:
        os.close(directory)


#: Top-level entries of a checkpoint and the types they must have.
_ENTRIES: dict[str, type | tuple[type, ...]] = {
    "world_size": int,
    "compat": dict,
    "step": int,
    "epoch": int,
    "batch_in_epoch": int,
    "epoch_losses": list,
    "parameters": torch.Tensor,
    "buffers": dict,
    "optimizer": dict,
    "rng": list,
    "log": dict,
}


def load(path: str) -> dict[str, Any]:
    """Read a checkpoint (weights-only unpickling); any problem is a one-line :class:`ConfigError`."""
    if os.path.isdir(path):
        raise ConfigError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a torn or foreign file
        text = str(error)
        if "weights_only" in text or "Unsupported global" in text:
            # torch's message goes on to advise weights_only=False, which would run a hostile file's code.
            raise ConfigError(
                f"checkpoint {path} holds objects other than tensors, numbers and strings, so it was not "
                "written by hpcopt; it is not loaded (unpickling it could run code)"
            ) from None
        first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        raise ConfigError(f"checkpoint {path} cannot be read (truncated or not a checkpoint): {first_line}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{path} is not an hpcopt checkpoint")
    if state.get("version") != VERSION:
        raise ConfigError(f"checkpoint {path} has format version {state.get('version')}; this hpcopt reads {VERSION}")
    for key, kind in _ENTRIES.items():
        if key not in state:
            raise ConfigError(f"checkpoint {path} is damaged: it has no '{key}' entry")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise ConfigError(f"checkpoint {path} is damaged: its '{key}' entry is a {type(state[key]).__name__}")
    rng = state["rng"]
    if len(rng) != state["world_size"] or not all(isinstance(item, torch.Tensor) for item in rng):
        raise ConfigError(
            f"checkpoint {path} is damaged: it holds {len(rng)} RNG states for {state['world_size']} ranks"
        )
    return state


def check_not_done(state: Mapping[str, Any], path: str, epochs: int, batches_per_epoch: int) -> None:
    """Refuse to resume a run whose ``--epochs`` are all done already (it would log nothing)."""
    if state["epoch"] > epochs or (state["epoch"] == epochs and state["batch_in_epoch"] >= batches_per_epoch):
        raise ConfigError(
            f"checkpoint {path} is at step {state['step']}, the end of epoch {state['epoch']}; "
            f"--epochs {epochs} leaves nothing to do (--epochs counts from the start of the original run)"
        )


#: The entries of :func:`compat_fields` that hold a set of options, as JSON text.
OPTION_FIELDS = ("optimizer_config", "problem_options")


def compat_fields(
    *,
    problem: str,
    model: str,
    optimizer: str,
    seed: int,
    batch_size: int,
    optimizer_config: Mapping[str, Any],
    problem_options: Mapping[str, Any],
    num_parameters: int,
) -> dict[str, Any]:
    """What a resumed run must share with the checkpointed one (options as JSON text)."""
    return {
        "problem": problem,
        "model": model,
        "optimizer": optimizer,
        "seed": seed,
        "batch_size": batch_size,
        # the two OPTION_FIELDS: sets of options as JSON text, which a mismatch message decodes
        "optimizer_config": json.dumps(dict(optimizer_config), sort_keys=True),
        "problem_options": json.dumps(dict(problem_options), sort_keys=True, default=str),
        "num_parameters": num_parameters,
    }


#: The entries of a checkpoint's ``pipeline`` that a resumed APTS-IP run must match.
LAYOUT_KEYS = ("stages", "replicas", "stage_bounds")


def _describe_layout(layout: Mapping[str, Any]) -> str:
    return f"{layout['stages']} stages x {layout['replicas']} replicas (layer cuts {list(layout['stage_bounds'])})"


def run_epochs(state: Mapping[str, Any] | None, epochs: int) -> int:
    """The run length a run's length-scaled options were fitted to: a checkpoint's, else ``epochs``.

    A checkpoint written before the entry existed (or by a run without one) gives ``epochs``.
    """
    saved = None if state is None else state.get("run_epochs")
    return saved if isinstance(saved, int) and not isinstance(saved, bool) and saved > 0 else epochs


def check_resumable(
    state: Mapping[str, Any],
    path: str,
    compat: Mapping[str, Any],
    world_size: int,
    layout: Mapping[str, Any] | None = None,
) -> None:
    """Refuse a checkpoint written by another rank count, pipeline layout or configuration.

    ``layout`` is this run's APTS-IP layout (:data:`LAYOUT_KEYS`; ``None`` for the
    data-parallel optimizers, whose checkpoints have no ``pipeline`` entry).
    """
    saved_layout = state.get("pipeline")
    if state["world_size"] != world_size:
        replicas = f" --set replicas={saved_layout['replicas']}" if saved_layout is not None else ""
        raise ConfigError(
            f"checkpoint {path} was written by {state['world_size']} ranks; this run has {world_size}. "
            f"Resume with mpiexec -n {state['world_size']}{replicas} (data shards, per-rank RNG states and the "
            "local trust regions depend on the rank count)"
        )
    # Checked before the options, whose difference (replicas) would only show as JSON text.
    if layout is not None and saved_layout is not None:
        if any(saved_layout[key] != layout[key] for key in LAYOUT_KEYS):
            raise ConfigError(
                f"checkpoint {path} was written by a pipeline of {_describe_layout(saved_layout)}; this run has "
                f"{_describe_layout(layout)}. Resume with --set replicas={saved_layout['replicas']} "
                "(each rank restores its own stage's parameters, buffers and RNG state)"
            )
    for key, value in compat.items():
        saved = state["compat"].get(key)
        if saved != value:
            raise ConfigError(f"checkpoint {path} was written with {_difference(key, saved, value)}")
    parameters, expected = state.get("parameters"), compat.get("num_parameters")
    if isinstance(parameters, torch.Tensor) and expected is not None and parameters.shape != (expected,):
        raise ConfigError(
            f"checkpoint {path} is damaged: its parameters have shape {tuple(parameters.shape)}; "
            f"the model has {expected}"
        )


def _difference(key: str, saved: Any, value: Any) -> str:
    """``key=saved; this run has key=value``, or, for two sets of options, only the options that differ."""
    if key in OPTION_FIELDS:
        saved, value = _options(saved), _options(value)
    if not (isinstance(saved, dict) and isinstance(value, dict)):
        return f"{key}={saved}; this run has {key}={value}"
    names = sorted(name for name in saved.keys() | value.keys() if saved.get(name) != value.get(name))
    return (
        f"{key} {', '.join(f'{name}={saved.get(name)}' for name in names)}; "
        f"this run has {', '.join(f'{name}={value.get(name)}' for name in names)}"
    )


def _options(value: Any) -> Any:
    """A compat entry of :data:`OPTION_FIELDS` as a dict; as it is where it is not such JSON (a damaged file)."""
    try:
        options = json.loads(value)
    except (TypeError, ValueError):
        return value
    return options if isinstance(options, dict) else value


class Checkpointer:
    """Writes the training state every ``every`` steps (and at the last step) to ``path``.

    Args:
        path: checkpoint file (replaced atomically each time).
        every: steps between checkpoints (0: only when the run stops at ``max_steps``
            or at the end of its last epoch).
        comm: the training communicator.
        compat: :func:`compat_fields` of this run.
        log_path: the run log, recorded for provenance.
        layout: the optimizer's ``checkpoint_layout`` (APTS-IP's :data:`LAYOUT_KEYS`;
            ``None``: the parameters are whole on every rank).
        run_epochs: the run length the optimizer's options were fitted to, saved as
            ``run_epochs`` (``None``: not saved).
    """

    def __init__(
        self,
        path: str,
        every: int,
        comm: Communicator,
        compat: Mapping[str, Any],
        log_path: str | None,
        layout: Mapping[str, Any] | None = None,
        run_epochs: int | None = None,
    ) -> None:
        self.path = path
        self.run_epochs = run_epochs
        self.every = every
        self.comm = comm
        self.compat = dict(compat)
        self.log_path = log_path or ""
        self.layout = None if layout is None else {key: layout[key] for key in LAYOUT_KEYS}
        self.seconds = 0.0
        self.written = 0

    def due(self, step: int, last: bool) -> bool:
        return last or (self.every > 0 and step % self.every == 0)

    def save(
        self,
        *,
        step: int,
        epoch: int,
        batch_in_epoch: int,
        epoch_losses: list[float],
        optimizer: Checkpointable,
        log_rows: int,
    ) -> None:
        """Collective: gather the RNG states and the whole model, write on rank 0, agree on success."""
        start = time.perf_counter()
        rng_states = self.comm.allgather_object(torch.get_rng_state())
        gathered_parameters, gathered_buffers = optimizer.gather_model()
        error: HpcoptError | None = None
        if self.comm.is_root:
            # The gathered tensors may be the live ones, or views whose whole storage torch.save would write.
            parameters = gathered_parameters.detach().clone()
            replica_buffers = [
                {name: buffer.detach().clone() for name, buffer in buffers.items()} for buffers in gathered_buffers
            ]
            state = {
                "format": FORMAT,
                "version": VERSION,
                "world_size": self.comm.size,
                "compat": self.compat,
                "step": step,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "epoch_losses": list(epoch_losses),
                "parameters": parameters,
                "buffers": replica_buffers[0],
                "optimizer": optimizer.state_dict(),
                "rng": rng_states,
                "log": {"path": self.log_path, "iterations": log_rows},
            }
            if self.layout is not None:
                state["pipeline"] = {**self.layout, "buffers": replica_buffers}
            if self.run_epochs is not None:
                state["run_epochs"] = self.run_epochs
            try:
                atomic_save(state, self.path, step=step)
            except OSError as exc:
                error = OutputError(f"cannot write checkpoint {self.path}: {exc.strerror or exc}")
        self.comm.agree(error)
        self.written += 1
        self.seconds += time.perf_counter() - start


def _mismatch(saved: Any, fresh: Any, where: str) -> str:
    """Where ``saved`` cannot stand in for ``fresh``; "" if it can.

    Lenient where a state legitimately changes while training (lists grow, ``None``
    becomes a tensor, a zero-size buffer fills): what is checked is that no entry of
    the fresh state is missing and that a non-empty tensor keeps its shape and dtype.
    """
    if isinstance(fresh, torch.Tensor):
        if isinstance(saved, torch.Tensor) and fresh.numel() and saved.numel():
            if saved.shape != fresh.shape or saved.dtype != fresh.dtype:
                return (
                    f"{where} has shape {tuple(saved.shape)} ({saved.dtype}); "
                    f"this run has {tuple(fresh.shape)} ({fresh.dtype})"
                )
        return ""
    if isinstance(fresh, Mapping):
        if not isinstance(saved, Mapping):
            return f"{where} is a {type(saved).__name__}, not a dict"
        missing = [str(key) for key in fresh if key not in saved]
        if missing:
            return f"{where} has no entry {', '.join(missing)}"
        for key in fresh:
            found = _mismatch(saved[key], fresh[key], f"{where}.{key}")
            if found:
                return found
    return ""


def restore(state: Mapping[str, Any], *, optimizer: Checkpointable, rank: int, path: str = "") -> None:
    """Put parameters, buffers, optimizer state and this rank's RNG state back (no communication).

    The optimizer takes its part of the whole model: all of it, or for APTS-IP (a
    ``pipeline`` entry, with every replica's buffers) its stage's slice and its replica's buffers.
    The optimizer state must have the structure of the freshly built optimizer's, and
    anything that does not fit is a :class:`ConfigError` (the file is damaged or crafted);
    a part only some ranks read can fail on those alone, so the caller agrees on it.
    """
    mismatch = _mismatch(state["optimizer"], optimizer.state_dict(), "optimizer")
    if mismatch:
        raise ConfigError(f"checkpoint {path} is damaged: {mismatch}")
    try:
        replica_buffers = state["pipeline"]["buffers"] if "pipeline" in state else [state["buffers"]]
        optimizer.load_model(state["parameters"], replica_buffers)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"][rank])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"checkpoint {path} is damaged: {type(error).__name__}: {first_line}") from None
