"""Physics-informed problems: Poisson in 1-3 dimensions and Allen–Cahn (steady and in time).

Each builds its collocation points, residual and boundary rows, exact solution and
relative-L2 metric, and provides Taylor-mode jets so APTS-IP can pipeline them.  Same
imports as :mod:`hpcopt.problems`; scipy is imported only where a reference solution
needs it.
"""
