"""Studies of many runs: scaling sweeps (``hpcopt jobs render``/``local``) and ``hpcopt study robustness``.

Owns the sweep description (:class:`~hpcopt.jobs.render.SweepSpec`: strong or weak
scaling over a list of rank counts), the rendering of the job templates in
``jobs/templates/`` (:mod:`hpcopt.jobs.render`, which also says where an installed
copy finds them), the local runner (:mod:`hpcopt.jobs.local`) and the runs of the
robustness study (:mod:`hpcopt.jobs.robustness`, which runs them as the local runner does).

It may import :mod:`hpcopt.errors` and the standard library only: the jobs start
``hpcopt train`` as a separate program, so rendering a sweep on a login node needs
neither torch nor MPI.  Inside the package, ``local`` imports ``render``; the reverse
exists only as the lazy ``render.run_local`` alias kept for callers not yet moved to
:mod:`hpcopt.jobs.local`.  Only :mod:`hpcopt.cli` (and benchmarks) import it.
"""
