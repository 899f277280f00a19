"""Physics-informed problems: Poisson in 1-3 dimensions and Allen–Cahn (steady and in time).

Each builds its collocation points, residual and boundary rows, exact solution and
relative-L2 metric, and provides Taylor-mode jets so APTS-IP can pipeline them.  Same
imports as :mod:`hpcopt.problems`; scipy is imported only where a reference solution
needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

#: APTS-D options for the PINNs' least-squares losses (``hpcopt train``'s defaults for
#: every PINN, as in ``make demo``): the global passes solve their trust-region
#: subproblems by Steihaug CG on Gauss–Newton products, which are positive semi-definite
#: and cost about two gradients for a mean of squared residuals; the local phase keeps
#: its first-order L-SR1 models.  With L-SR1 alone the PINNs stall near 1e-1
#: (docs/results.md, "PINN study").  Up to 100 CG iterations, not the demo's 50: on
#: ``poisson2d`` the 50-iteration steps stop short of the Gauss–Newton step and the run
#: misses 1e-2 within two minutes (docs/problems.md, "Defaults for train").  Read-only:
#: every PINN shares it.
APTS_D_GAUSS_NEWTON: Mapping[str, object] = MappingProxyType(
    {"global_solver": "steihaug", "curvature": "ggn", "max_cg_iterations": 100, "global_passes": 2}
)
#: APTS-IP's: the same two Gauss–Newton passes, whose products are taken through the
#: pipeline (:mod:`hpcopt.distributed.pipeline_curvature`); without them its first-order
#: stage models stall near 1e-1 (docs/results-apts-d.md, "PINNs with no --set").  One
#: micro-batch: on a CPU a product over Poisson-2D's batch of 600 split in four took
#: 5.8 ms at P = 2, against 4.3 ms unsplit (the per-call overhead of four small passes
#: outweighs the overlap of two stages); the run to 1e-2 took 8.2 s against 6.6 s.
APTS_IP_GAUSS_NEWTON: Mapping[str, object] = MappingProxyType(
    {"max_cg_iterations": 100, "global_passes": 2, "micro_batches": 1}
)
#: The PINNs' optimizer defaults: the same Gauss–Newton passes for APTS-D and APTS-P (whose
#: global pass is APTS-D's, over all parameters; a custom ``least_squares`` problem gets the
#: same, :mod:`hpcopt.problems.custom`) and APTS-IP.
GAUSS_NEWTON_DEFAULTS: Mapping[str, Mapping[str, object]] = MappingProxyType(
    {"apts-d": APTS_D_GAUSS_NEWTON, "apts-p": APTS_D_GAUSS_NEWTON, "apts-ip": APTS_IP_GAUSS_NEWTON}
)
