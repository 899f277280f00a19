"""Limited-memory SR1 operator in compact form.

Derivation (our notation).  Start from ``B_0 = gamma I`` and apply the symmetric
rank-one update for the pairs ``(s_0, y_0), ..., (s_{m-1}, y_{m-1})`` in order::

    B_{k+1} = B_k + (y_k - B_k s_k)(y_k - B_k s_k)' / ((y_k - B_k s_k)' s_k).

Every update adds a multiple of ``y_k - B_k s_k``, which is a combination of the
columns of ``Psi = Y - gamma S``, so ``B_m = gamma I + Psi W Psi'`` for a symmetric
``m x m`` matrix ``W``.  SR1 keeps earlier secant equations (``B_{k+1} s_i = y_i``
for ``i <= k``); imposing them column by column and solving the triangular recurrence
(Byrd, Nocedal & Schnabel, 1994) gives ``W = M^{-1}`` with::

    M = D + L + L' - gamma S'S,

where ``D`` is the diagonal and ``L`` the strictly lower triangle of ``S'Y``
(``L_ij = s_i'y_j`` for ``i > j``).  The leading ``k x k`` block of ``M`` is the
matrix of the first ``k`` pairs, and its Schur complements are the SR1
denominators, so ``M`` is singular exactly when some recursive update is undefined.

Only the small matrices ``S'S`` and ``S'Y`` (``memory x memory``, float64, built
through ``dot``) and the pairs themselves are stored; a product costs ``2m`` dots.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from hpcopt.numerics.krylov.cg import Dot, default_dot

GAMMA_MIN = 1e-4
GAMMA_MAX = 1e4
# Below this ratio of smallest to largest |eigenvalue| of M, M^{-1} would amplify
# rounding in the pairs into a meaningless operator, so the oldest pairs are dropped.
M_RCOND = 1e-8


class LSR1Operator:
    """``B = gamma I + Psi M^{-1} Psi'`` from the last ``memory`` accepted SR1 pairs.

    Args:
        memory: Number of pairs kept (default 5); the oldest is dropped first.
        dot: Inner product (default :func:`hpcopt.numerics.krylov.cg.default_dot`); every Gram
            entry and every product coefficient goes through it.
        skip_tol: A pair is skipped when ``|(y - Bs)'s| <= skip_tol ||s|| ||y - Bs||``
            (default 1e-8), the usual SR1 safeguard; ``y = Bs`` (nothing to learn)
            is skipped too.

    Choices (ours):

    * ``gamma = y'y / s'y`` of the newest stored pair when ``s'y > 0``, clipped to
      ``[1e-4, 1e4]``; otherwise the previous gamma is kept (1.0 initially).
    * With no pairs the operator is ``B = 0``: a first-order model until curvature is
      known, so a Steihaug solve on it is the Cauchy step.  The compact form (and the
      skip test of the first pair) uses the base ``gamma I``.
    * When a new gamma makes ``M`` of the kept pairs (nearly) singular, the oldest
      pairs are dropped until it is not; the operator never raises on bad pairs.
    """

    def __init__(self, memory: int = 5, dot: Dot = default_dot, skip_tol: float = 1e-8) -> None:
        if isinstance(memory, bool) or not isinstance(memory, int) or memory < 1:
            raise ValueError(f"lsr1 memory must be an integer >= 1, got {memory!r}")
        if not math.isfinite(skip_tol) or skip_tol < 0:
            raise ValueError(f"lsr1 skip_tol must be finite and >= 0, got {skip_tol!r}")
        self.memory = memory
        self.dot = dot
        self.skip_tol = skip_tol
        self.reset()

    def reset(self) -> None:
        """Forget all pairs and return to ``B = 0`` with gamma 1."""
        self._s: list[torch.Tensor] = []
        self._y: list[torch.Tensor] = []
        self._ss = torch.zeros(0, 0, dtype=torch.float64)
        self._sy = torch.zeros(0, 0, dtype=torch.float64)
        self._gamma = 1.0
        self._m_inv = torch.zeros(0, 0, dtype=torch.float64)

    def state_dict(self) -> dict[str, object]:
        """Pairs, Gram matrices, gamma and ``M^{-1}`` as copies (restored bit for bit)."""
        return {
            "s": [v.clone() for v in self._s],
            "y": [v.clone() for v in self._y],
            "ss": self._ss.clone(),
            "sy": self._sy.clone(),
            "gamma": self._gamma,
            "m_inv": self._m_inv.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; ``M^{-1}`` is copied, not recomputed."""
        s_list, y_list = list(state["s"]), list(state["y"])
        if len(s_list) != len(y_list) or len(s_list) > self.memory:
            raise ValueError(f"lsr1 state holds {len(s_list)} pairs, more than memory={self.memory}")
        self._s = [v.clone() for v in s_list]
        self._y = [v.clone() for v in y_list]
        self._ss = state["ss"].clone()
        self._sy = state["sy"].clone()
        self._gamma = float(state["gamma"])
        self._m_inv = state["m_inv"].clone()

    @property
    def size(self) -> int:
        """Number of stored pairs."""
        return len(self._s)

    @property
    def gamma(self) -> float:
        """Current initial scaling ``gamma`` of ``B_0 = gamma I``."""
        return self._gamma

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``B v`` (a new tensor of ``v``'s dtype)."""
        if not self._s:
            return torch.zeros_like(v)
        return self._apply(v, self._s, self._y, self._gamma, self._m_inv)

    def update(self, s: torch.Tensor, y: torch.Tensor) -> bool:
        """Add the pair ``(s, y)`` (step, gradient change); return whether it was stored."""
        if s.shape != y.shape or s.dim() != 1:
            raise ValueError(f"lsr1 pair must be two flat vectors of equal length, got {s.shape}, {y.shape}")
        dot = self.dot
        s_s, y_y, s_y = dot(s, s), dot(y, y), dot(s, y)
        if not all(math.isfinite(x) for x in (s_s, y_y, s_y)) or s_s <= 0.0:
            return False
        gamma = self._gamma
        # Not the Rayleigh quotient s'y/s's: with it the newest pair's SR1 denominator
        # (y - gamma s)'s is exactly zero and every pair would be skipped.
        if s_y > 0.0:
            gamma = min(GAMMA_MAX, max(GAMMA_MIN, y_y / s_y))

        # The skip test must use the operator the new pair will be added to, i.e. the
        # old pairs under the new gamma; that may need dropping old pairs first.
        keep = self._prune(list(range(self.size)), gamma)
        m_inv = self._inverse(keep, gamma)
        if m_inv is None:
            keep, m_inv = [], torch.zeros(0, 0, dtype=torch.float64)
        s_list = [self._s[i] for i in keep]
        y_list = [self._y[i] for i in keep]
        b_s = self._apply(s, s_list, y_list, gamma, m_inv) if keep else s * gamma
        mismatch = y - b_s
        m_s, m_m = dot(mismatch, s), dot(mismatch, mismatch)
        if not (math.isfinite(m_s) and math.isfinite(m_m)):
            return False
        if abs(m_s) <= self.skip_tol * math.sqrt(s_s) * math.sqrt(max(m_m, 0.0)):
            return False

        keep = keep[-(self.memory - 1) :] if self.memory > 1 else []
        index = torch.tensor(keep, dtype=torch.long)
        old_ss = self._ss[index][:, index]
        old_sy = self._sy[index][:, index]
        old_s = [self._s[i] for i in keep]
        old_y = [self._y[i] for i in keep]
        s_new, y_new = s.detach().clone(), y.detach().clone()
        k = len(keep)
        new_ss = torch.zeros(k + 1, k + 1, dtype=torch.float64)
        new_sy = torch.zeros(k + 1, k + 1, dtype=torch.float64)
        new_ss[:k, :k] = old_ss
        new_sy[:k, :k] = old_sy
        for i, (s_i, y_i) in enumerate(zip(old_s, old_y)):
            new_ss[i, k] = new_ss[k, i] = dot(s_i, s_new)
            new_sy[i, k] = dot(s_i, y_new)
            new_sy[k, i] = dot(s_new, y_i)
        new_ss[k, k] = s_s
        new_sy[k, k] = s_y
        if not bool(torch.isfinite(new_ss).all() and torch.isfinite(new_sy).all()):
            return False

        previous = (self._s, self._y, self._ss, self._sy, self._gamma, self._m_inv)
        self._s, self._y = [*old_s, s_new], [*old_y, y_new]
        self._ss, self._sy, self._gamma = new_ss, new_sy, gamma
        final = self._prune(list(range(k + 1)), gamma)
        m_inv = self._inverse(final, gamma)
        if m_inv is None or not final:
            # Cannot happen for a pair that passed the skip test, but never raise.
            self._s, self._y, self._ss, self._sy, self._gamma, self._m_inv = previous
            return False
        self._select(final)
        self._m_inv = m_inv
        return True

    # -- internals -----------------------------------------------------------------

    def _middle(self, keep: list[int], gamma: float) -> torch.Tensor:
        index = torch.tensor(keep, dtype=torch.long)
        sy = self._sy[index][:, index]
        ss = self._ss[index][:, index]
        lower = torch.tril(sy, diagonal=-1)
        return torch.diag(torch.diag(sy)) + lower + lower.T - gamma * ss

    def _inverse(self, keep: list[int], gamma: float) -> torch.Tensor | None:
        """``M^{-1}`` for the pairs ``keep`` or ``None`` when ``M`` is (nearly) singular."""
        if not keep:
            return torch.zeros(0, 0, dtype=torch.float64)
        middle = self._middle(keep, gamma)
        if not bool(torch.isfinite(middle).all()):
            return None
        try:
            eigenvalues, eigenvectors = torch.linalg.eigh(middle)
        except RuntimeError:
            return None
        magnitude = eigenvalues.abs()
        largest = float(magnitude.max())
        if not math.isfinite(largest) or largest == 0.0 or float(magnitude.min()) <= M_RCOND * largest:
            return None
        return (eigenvectors / eigenvalues) @ eigenvectors.T

    def _prune(self, keep: list[int], gamma: float) -> list[int]:
        """Drop the oldest of ``keep`` until ``M`` is well conditioned."""
        while keep and self._inverse(keep, gamma) is None:
            keep = keep[1:]
        return keep

    def _select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long)
        self._s = [self._s[i] for i in keep]
        self._y = [self._y[i] for i in keep]
        self._ss = self._ss[index][:, index]
        self._sy = self._sy[index][:, index]

    def _apply(
        self,
        v: torch.Tensor,
        s_list: list[torch.Tensor],
        y_list: list[torch.Tensor],
        gamma: float,
        m_inv: torch.Tensor,
    ) -> torch.Tensor:
        dot = self.dot
        projections = torch.tensor(
            [dot(y_i, v) - gamma * dot(s_i, v) for s_i, y_i in zip(s_list, y_list)], dtype=torch.float64
        )
        weights = (m_inv @ projections).tolist()
        out = v * gamma
        for weight, s_i, y_i in zip(weights, s_list, y_list):
            out.add_(y_i, alpha=weight)
            out.add_(s_i, alpha=-gamma * weight)
        return out
