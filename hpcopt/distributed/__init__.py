"""Who owns what across ranks, and the objectives built on that ownership.

Owns the :class:`~hpcopt.distributed.objective.Objective` protocol; the data-parallel
objective with the one distributed curvature operator
(:mod:`~hpcopt.distributed.data_parallel`); the pipeline objective, layout and executor
(:mod:`~hpcopt.distributed.pipeline`); the parameter-block decomposition of APTS-P
(:mod:`~hpcopt.distributed.decomposition`); and how global batches are sharded
(:mod:`~hpcopt.distributed.sharding`).  Every collective goes through
:mod:`hpcopt.comm`; it may import :mod:`hpcopt.comm`, :mod:`hpcopt.numerics`,
:mod:`hpcopt.kernels`, :mod:`hpcopt.problems` (the problem interface) and
:mod:`hpcopt.testing` (fault hooks), never the optimizers or the trainer.
"""
