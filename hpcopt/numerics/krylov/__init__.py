"""Krylov solvers against ``matvec``/``dot`` callables.

:mod:`~hpcopt.numerics.krylov.cg` holds CG and Steihaug–Toint truncated CG (used by
the trust-region subproblem solvers and HF); :mod:`~hpcopt.numerics.krylov.martens`
holds the Hessian-free solvers (Martens' CG with stored iterates for backtracking,
and BiCGSTAB for indefinite systems).  It may import torch, :mod:`hpcopt.errors`
and :mod:`hpcopt.kernels` (fused vector updates).
"""
