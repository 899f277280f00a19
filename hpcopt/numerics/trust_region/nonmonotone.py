"""Non-monotone acceptance: a step may raise f, as long as it lowers the recent maximum.

A monotone trust region accepts θ + s only when f falls by a fraction of the model's
prediction, ρ = (f(θ) − f(θ+s)) / pred ≥ η₁.  On a noisy or curved path this rejects
steps that a few iterations later would have paid off.  The non-monotone rule of
Toint (1997) compares the trial value instead with a *reference* value f_ref ≥ f(θ), the
largest f(θ) at the start of the last M outer iterations (the window of Grippo,
Lampariello & Lucidi, 1986), and relaxes the denominator by the same amount:

    ρ_ref = (f_ref − f(θ+s)) / (f_ref − f(θ) + pred),   ρ = max(ρ_mono, ρ_ref).

An accepted step therefore has f(θ+s) ≤ f_ref − η₁·(f_ref − f(θ) + pred) < f_ref: the
reference sequence still falls, which is what the convergence theory needs, while a
single iterate may rise above its predecessor.  With M = 1, f_ref = f(θ) and ρ is the
monotone ratio.  (Zhang & Hager's averaged reference is the other common choice; the
windowed maximum is the one closest to the windowed rule reported for the APTS
authors' non-monotone variant.)

The window holds values the caller allreduced, so every rank keeps the same window.
"""

from __future__ import annotations

from collections import deque


class ReferenceWindow:
    """The values f(θ) at the start of the last ``size`` outer iterations; the reference is their maximum.

    ``size = 1`` keeps only the current value: the monotone rule.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"non-monotone window must be >= 1, got {size}")
        self.size = size
        # The current value is passed in; the window keeps the size − 1 before it.
        self._previous: deque[float] = deque(maxlen=size - 1)

    def reference(self, current: float) -> float:
        """f_ref for an iteration starting at f(θ) = ``current``: the largest of it and the window.

        ``current`` always counts, so the relaxed ratio is never below the monotone one
        (in a stochastic run f(θ) is measured on each iteration's own batch).
        """
        return max(current, *self._previous) if self._previous else current

    def record(self, current: float) -> None:
        """Close an iteration that started at f(θ) = ``current``."""
        if self.size > 1:
            self._previous.append(current)

    def state(self) -> list[float]:
        return list(self._previous)

    def load(self, values: list[float]) -> None:
        self._previous = deque((float(v) for v in values), maxlen=self.size - 1)
