"""The options of ``hpcopt train`` that are not the optimizer's or the problem's: :class:`TrainConfig`.

It is the single source of those options: its fields are the top-level keys of a
``--config`` TOML file, and their :class:`~hpcopt.config.Flag` metadata makes each
one a flag of ``hpcopt train`` (``batch_size`` → ``--batch-size``).  It may import
only the standard library and :mod:`hpcopt.config`, so that building the command
line never imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hpcopt.config import flag_field, require

#: ``--stop-signal`` values: early-warning signals a batch system can be told to send.
STOP_SIGNALS: tuple[str, ...] = ("USR1", "USR2", "HUP", "XCPU", "none")
#: ``--heap`` values (:mod:`hpcopt.training.heap`).
HEAP_MODES: tuple[str, ...] = ("keep", "release")


@dataclass
class TrainConfig:
    """Options of ``hpcopt train`` that are not the optimizer's.

    Attributes:
        problem: problem name (``poisson2d``), or a plug-in: ``MODULE:ATTR``,
            ``path/to/file.py:ATTR`` or an installed ``hpcopt.problems`` entry point.
        model: model name; ``None`` → the problem's default.
        optimizer: optimizer name (``apts-d``).
        data_dir: directory of the dataset files (MNIST IDX files).
        epochs: passes over the training set (10; when none is given, ``hpcopt train``
            takes the problem's default instead, as for ``eval_every``, ``time_limit`` and
            ``target``: ``hpcopt options PROBLEM``).
        batch_size: global mini-batch size; ``None`` → the problem's default.
        seed: seeds initialisation, batch order and dropout (0).
        out: HDF5 run log path; ``None`` → no log.
        overwrite: replace an existing run log.
        threads: torch threads per rank (1: one rank per core is the MPI way).
        heap: ``release`` (glibc's defaults) or ``keep`` (glibc serves a step's large
            buffers from its heap and keeps freed pages for the next step: no page faults
            per step, but the heap only grows); for the whole process
            (:mod:`hpcopt.training.heap`).
        eval_every: evaluate every this many epochs (1).
        max_steps: stop after this many outer iterations (None: no limit).
        time_limit: stop after the first step that ends this many seconds into training, and
            evaluate there (None: no limit).
        target: stop at the first evaluation whose metric reaches this value
            (≤ for errors, ≥ for accuracies; None: train all epochs).
        quiet: print nothing: no evaluation lines, no progress bar or progress lines.
        checkpoint_every: write a checkpoint every this many steps (0: only at the
            last step, and only when ``checkpoint`` is given).
        checkpoint: checkpoint file; ``None`` → ``<out>.ckpt`` when ``checkpoint_every``
            is set (see :mod:`hpcopt.log.checkpoint`).
        resume: continue from this checkpoint (same rank count and options; ``epochs``
            and ``max_steps`` count from the start of the original run).
        collective_timeout: seconds a collective may wait before the job is aborted
            (0: no watchdog; see :mod:`hpcopt.comm.communicator`).
        device: ``auto`` (CUDA if torch sees a GPU, else CPU), ``cpu`` or ``cuda``
            (one GPU per rank by local rank; see :mod:`hpcopt.training.device`).
        progress_every: without a terminal (batch logs), rank 0 prints a progress line
            every this many steps of an epoch (0: by time only, see ``progress_seconds``);
            on a terminal a progress bar shows every step instead
            (see :mod:`hpcopt.training.progress`).
        progress_seconds: without a terminal, also a progress line once this many seconds
            have passed since the last one, checked after each step (0: by step count only;
            both 0: no progress lines).
        num_workers: processes that read the rows of a user's ``Dataset`` ahead of the
            optimizer (0: each shard is read when it is needed; in-memory data ignore it).
        stop_signal: the early-warning signal that, like SIGTERM, stops the run after the
            current step with a checkpoint, run-log status ``preempted`` and exit status 75
            (``USR1``, what ``#SBATCH --signal=USR1@120`` sends; ``none``: SIGTERM only).
            SIGINT stops it as ``interrupted``, exit 130 (:mod:`hpcopt.training.preemption`).
        read_ahead: shards of a user's ``Dataset`` that one thread of each rank reads ahead
            of the optimizer, without reader processes (0: none): for ranks that already
            take every core, where a reader process would take time from a rank.  Not
            together with ``num_workers``; a dataset that draws from torch's global random
            generator is then read concurrently with the training and loses reproducibility.
    """

    # The field order is that of the run log's config_json attribute; keep it.
    problem: str = flag_field(
        "poisson2d",
        help="poisson1d|2d|3d, allen-cahn, allen-cahn-time, mnist, tinyshakespeare, quadratic, logistic "
        "(default poisson2d), or a problem of your own: MODULE:ATTR or path/to/file.py:ATTR",
    )
    model: str | None = flag_field(None, help="model name (default: the problem's)")
    optimizer: str = flag_field("apts-d", help="apts-d, apts-p, apts-ip, hf, nlcg, neumann, sgd, adam (default apts-d)")
    data_dir: str | None = flag_field(None, help="directory with the dataset files")
    epochs: int = flag_field(10)
    batch_size: int | None = flag_field(None, help="global mini-batch size")
    seed: int = flag_field(0)
    out: str | None = flag_field(None, help="HDF5 run log to write")
    overwrite: bool = flag_field(False, help="replace an existing --out file")
    threads: int = flag_field(1, help="torch threads per rank (default 1)")
    heap: str = flag_field(
        "release",
        help="release (default: the C library's behaviour) or keep (large buffers reuse the heap's pages: "
        "no page faults per step, more memory)",
        choices=HEAP_MODES,
    )
    eval_every: int = flag_field(1, help="evaluate every N epochs")
    max_steps: int | None = flag_field(None, help="stop after N outer iterations")
    time_limit: float | None = flag_field(None, help="stop, and evaluate, after the first step that ends N seconds in")
    target: float | None = flag_field(None, help="stop when the validation metric reaches this value")
    quiet: bool = flag_field(False)
    checkpoint_every: int = flag_field(0, help="write a checkpoint every N steps")
    checkpoint: str | None = flag_field(None, help="checkpoint file (default: the --out path with .ckpt appended)")
    resume: str | None = flag_field(None, help="continue the run saved in this checkpoint (same rank count)")
    collective_timeout: float = flag_field(
        0.0, help="abort the job when a collective waits longer than this many seconds (default 0: no watchdog)"
    )
    device: str = flag_field(
        "auto", help="auto (default: cuda if a GPU is seen), cpu, cuda", choices=("auto", "cpu", "cuda")
    )
    progress_every: int = flag_field(
        0, help="without a terminal: a progress line every N steps (default 0: every --progress-seconds)"
    )
    progress_seconds: float = flag_field(
        30.0, help="without a terminal: a progress line at least every T seconds (default 30; 0: off)"
    )
    num_workers: int = flag_field(0, help="processes that read a Dataset's rows ahead (default 0: none)")
    stop_signal: str = flag_field(
        "USR1",
        help="early-warning signal that stops the run as SIGTERM does: checkpoint, status preempted, exit 75 "
        "(default USR1)",
        choices=STOP_SIGNALS,
    )
    read_ahead: int = flag_field(
        0, help="shards of a Dataset read ahead by a thread of each rank, no processes (default 0: none)"
    )

    def validate(self) -> None:
        require(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        require(self.threads >= 1, f"--threads must be >= 1, got {self.threads}")
        require(self.eval_every >= 1, f"--eval-every must be >= 1, got {self.eval_every}")
        require(self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1")
        require(self.time_limit is None or self.time_limit > 0, "--time-limit must be > 0")
        # Below 2**32: seeds of derived streams (dropout noise: seed * 1_000_003 + step) must fit torch's 64 bits.
        require(0 <= self.seed < 2**32, f"--seed must be between 0 and {2**32 - 1}, got {self.seed}")
        require(self.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        require(
            math.isfinite(self.collective_timeout) and self.collective_timeout >= 0,
            f"--collective-timeout must be >= 0 seconds, got {self.collective_timeout}",
        )
        require(self.progress_every >= 0, f"--progress-every must be >= 0, got {self.progress_every}")
        require(self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}")
        require(self.read_ahead >= 0, f"--read-ahead must be >= 0, got {self.read_ahead}")
        require(
            not (self.read_ahead and self.num_workers),
            "--read-ahead and --num-workers are two ways to read ahead: give one of them",
        )
        require(self.heap in HEAP_MODES, f"--heap must be one of {', '.join(HEAP_MODES)}, got {self.heap!r}")
        require(
            self.stop_signal in STOP_SIGNALS,
            f"--stop-signal must be one of {', '.join(STOP_SIGNALS)}, got {self.stop_signal!r}",
        )
        require(
            math.isfinite(self.progress_seconds) and self.progress_seconds >= 0,
            f"--progress-seconds must be >= 0, got {self.progress_seconds}",
        )
