"""The training loop and what it needs: typed train options, device choice, the start-up check.

Owns :class:`~hpcopt.training.config.TrainConfig` (the single source of the ``hpcopt
train`` flags and TOML keys), :mod:`~hpcopt.training.trainer` (global batches, steps,
evaluation, run log, checkpoints, stopping rules), :mod:`~hpcopt.training.device` (one
rank per GPU), :mod:`~hpcopt.training.signature` (every rank runs the same job) and
:mod:`~hpcopt.training.progress` (rank 0's progress bar or batch-log lines within an epoch).
It may import every layer below it (comm, distributed, optimizers, problems, log,
config) but not the CLI or analysis.
"""
