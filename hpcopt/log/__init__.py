"""What a run leaves on disk: the HDF5 run log and the checkpoints.

Owns the run-log schema and writer (:mod:`~hpcopt.log.runlog`; rank 0 writes, SWMR so
that a killed job leaves a readable file) and checkpoint save/restore
(:mod:`~hpcopt.log.checkpoint`; the optimizer is seen through a small protocol), and
the lock file that keeps a second job from writing either (:mod:`~hpcopt.log.lock`).  It
may import :mod:`hpcopt.comm` (checkpoints broadcast and gather), :mod:`hpcopt.errors`
and :mod:`hpcopt.testing`; the reader side for analysis is :mod:`hpcopt.analysis.tables`.
"""
