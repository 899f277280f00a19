"""Numerical building blocks that know nothing of MPI.

Owns the flat parameter buffer (:mod:`~hpcopt.numerics.flat`), curvature products
(:mod:`~hpcopt.numerics.curvature`: Hessian, Gauss–Newton), Taylor-mode jets for PINNs
(:mod:`~hpcopt.numerics.jets`), Krylov solvers (:mod:`~hpcopt.numerics.krylov`) and the
trust-region core (:mod:`~hpcopt.numerics.trust_region`).  Solvers work against
``matvec`` and ``dot`` callables, so a distributed product or dot is injected from
above.  It may import torch, :mod:`hpcopt.errors` and :mod:`hpcopt.kernels` only.
"""
