"""The public Python API: :func:`hpcopt.problem`, :func:`hpcopt.train`, :func:`hpcopt.optimizer`.

A thin layer for users' own scripts over :mod:`hpcopt.training` (the same run as
``hpcopt train``), :mod:`hpcopt.problems` (a user's model, loss and data as a
problem) and :mod:`hpcopt.optimizers` (one optimizer for a user's own loop).  May
import errors, config, comm, distributed, log, numerics, optimizers, problems,
training and kernels; only :mod:`hpcopt.cli` imports it.
"""
