"""Torch twins of the CUDA kernels in ``kernels/*.cu``.

Each method computes the same function as the kernel of the same name: the
elementwise arithmetic in the tensors' dtype, in the same order of operations,
and every reduction accumulated in float64 and returned as a Python float.  The
twins are the reference the GPU tests compare against, the path on CPU ranks,
and a fallback on GPU ranks without CuPy (plain torch ops run on any device, but
unfused: one kernel per operation).

In-place methods end in ``_`` and return the local sums a solver needs next; in
a distributed solver those sums are local and still have to be reduced (the
kernels never call MPI).
"""

from __future__ import annotations

import torch
from torch import Tensor


def dot64(a: Tensor, b: Tensor) -> float:
    """``a'b`` accumulated in float64 (the kernels' reduction precision)."""
    a64 = a.to(torch.float64)
    return float(torch.dot(a64, a64 if b is a else b.to(torch.float64)))


def neumann_coefficient(distance_sq: float, alpha: float, beta: float) -> float:
    """``(α‖w−v‖² − β/‖w−v‖²)/‖w−v‖`` of the Neumann cubic-plus-repulsive term; 0 at ``w = v``."""
    if distance_sq <= 0.0:
        return 0.0
    norm = distance_sq**0.5
    return (alpha * distance_sq - beta / distance_sq) / norm


class CpuKernels:
    """The kernel interface on plain torch tensors (any device, unfused)."""

    name = "cpu"

    # -- conjugate gradients ---------------------------------------------------

    def cg_step_(self, x: Tensor, r: Tensor, p: Tensor, ap: Tensor, alpha: float) -> float:
        """``x += αp``, ``r −= αAp``; returns the new local ``r'r``."""
        x.add_(p, alpha=alpha)
        r.sub_(ap, alpha=alpha)
        return dot64(r, r)

    def cg_direction_(self, p: Tensor, z: Tensor, w: Tensor, beta: float) -> tuple[float, float]:
        """``p ← z + βp``; returns the new local ``(p'p, w'p)`` (``w``: e.g. Steihaug's iterate)."""
        p.mul_(beta).add_(z)
        return dot64(p, p), dot64(w, p)

    # -- one buffer per collective ----------------------------------------------

    def pack(self, out: Tensor, vector: Tensor, scalars: Tensor, scale: float = 1.0) -> Tensor:
        """``out ← [scale·vector; scalars]``; returns ``out``."""
        n = vector.numel()
        torch.mul(vector, scale, out=out[:n])
        out[n : n + scalars.numel()].copy_(scalars)
        return out

    def unpack(self, buffer: Tensor, vector: Tensor, scalars: Tensor, scale: float = 1.0) -> None:
        """``vector ← scale·buffer[:n]``, ``scalars ← buffer[n:n+k]``."""
        n = vector.numel()
        torch.mul(buffer[:n], scale, out=vector)
        scalars.copy_(buffer[n : n + scalars.numel()])

    # -- nonlinear CG (docs/algorithms.md §5) ----------------------------------------

    def nlcg_dots(self, s: Tensor, g: Tensor, g_prev: Tensor, h: Tensor) -> tuple[float, float]:
        """Local ``(y's, s'diag(h)s)`` with ``y = g − g_prev``."""
        y = g - g_prev
        s64 = s.to(torch.float64)
        return dot64(y, s), float(torch.dot(h.to(torch.float64) * s64, s64))

    def nlcg_precondition_(
        self,
        h: Tensor,
        z: Tensor,
        g: Tensor,
        g_prev: Tensor,
        s: Tensor,
        ys: float,
        shs: float,
        *,
        update: bool,
        eps: float = 1e-8,
    ) -> tuple[float, float]:
        """Diagonal BFGS update of ``h`` (if ``update``) and ``z ← r/(h+eps)``, ``r = −g``.

        Returns the local ``(r'z, r'z_prev)``, ``z_prev`` being ``z`` on entry.
        """
        if update:
            hs = h * s
            y = g - g_prev
            h.copy_((h - hs * hs / shs + y * y / ys).abs())
        r = -g
        rz_prev = dot64(r, z)
        torch.div(r, h + eps, out=z)
        return dot64(r, z), rz_prev

    def nlcg_step_(self, theta: Tensor, d: Tensor, s: Tensor, z: Tensor, beta: float, step_size: float) -> float:
        """``d ← z + βd``, ``s ← step_size·d``, ``θ += s``; returns the local ``s's``."""
        d.mul_(beta).add_(z)
        torch.mul(d, step_size, out=s)
        theta.add_(s)
        return dot64(s, s)

    # -- Neumann optimizer (docs/algorithms.md §6) ------------------------------------

    def sq_distance(self, w: Tensor, v: Tensor) -> float:
        """Local ``‖w − v‖²``."""
        diff = w - v
        return dot64(diff, diff)

    def neumann_update_(
        self, w: Tensor, v: Tensor, m: Tensor, g: Tensor, coef: float, eta: float, mu: float, gamma: float
    ) -> float:
        """``d = g + coef(w−v)``; ``m ← μm − ηd``; ``w ← w + μm − ηd``; ``v ← w + γ(v − w)``.

        Returns the local ``‖w_new − w‖²`` (the step norm the optimizer logs).
        """
        d = g + coef * (w - v)
        m.mul_(mu).sub_(eta * d)
        w_old = w.clone()
        w.add_(mu * m).sub_(eta * d)
        v.copy_(w + gamma * (v - w))
        step = w.to(torch.float64) - w_old.to(torch.float64)
        return float(step.dot(step))

    # -- trust region ------------------------------------------------------------

    def tr_trial(self, trial: Tensor, theta: Tensor, s: Tensor) -> float:
        """``trial ← θ + s``; returns the local ``s's``."""
        torch.add(theta, s, out=trial)
        return dot64(s, s)
