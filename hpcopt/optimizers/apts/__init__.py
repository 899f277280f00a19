"""The APTS family: additively preconditioned trust region over data, parameters or stages.

Owns the options the variants share (:mod:`~hpcopt.optimizers.apts.options`), the local
phase (:mod:`~hpcopt.optimizers.apts.local_phase`: builds a rank's local model and runs
the one trust-region loop of :mod:`hpcopt.numerics.trust_region.loop`), the outer-step
bookkeeping (:mod:`~hpcopt.optimizers.apts.outcome`) and the three variants
(:mod:`~hpcopt.optimizers.apts.apts_d`, :mod:`~hpcopt.optimizers.apts.apts_p`,
:mod:`~hpcopt.optimizers.apts.apts_ip`).  Same imports as :mod:`hpcopt.optimizers`.
"""
