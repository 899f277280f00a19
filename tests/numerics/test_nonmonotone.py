"""The non-monotone acceptance rule (Toint 1997) on constructed sequences.

The rule: ρ = max(ρ_mono, (f_ref − f_trial)/(f_ref − f + pred)) with f_ref the largest
f of the last M outer iterations; an accepted step must lower f_ref.
"""

from __future__ import annotations

import math

import pytest

from hpcopt.numerics.trust_region import RadiusPolicy, ReferenceWindow, decide

POLICY = RadiusPolicy()  # eta1 0.25, eta2 0.75


def test_window_reference_is_the_largest_of_the_last_m_values() -> None:
    window = ReferenceWindow(3)
    values = [5.0, 4.0, 4.5, 3.0, 2.0, 2.5]
    references = []
    for value in values:
        references.append(window.reference(value))
        window.record(value)
    # max over (current and the two before it)
    assert references == [5.0, 5.0, 5.0, 4.5, 4.5, 3.0]


def test_window_of_one_is_monotone() -> None:
    window = ReferenceWindow(1)
    for value in (5.0, 1.0, 9.0):
        assert window.reference(value) == value
        window.record(value)
    assert window.state() == []


def test_window_state_round_trips_and_rejects_bad_size() -> None:
    window = ReferenceWindow(4)
    for value in (3.0, 2.0, 1.0, 0.5, 0.25):
        window.record(value)
    again = ReferenceWindow(4)
    again.load(window.state())
    assert again.reference(0.1) == window.reference(0.1) == 1.0  # the window keeps 1.0, 0.5, 0.25
    with pytest.raises(ValueError):
        ReferenceWindow(0)


def test_a_rise_rejected_by_the_monotone_rule_is_accepted_below_the_reference() -> None:
    # f = 1.0, the step predicts a decrease of 0.1 but f rises to 1.05 (ρ_mono = −0.5).
    monotone = decide(POLICY, 1.0, loss=1.0, trial_loss=1.05, pred=0.1, step_norm=1.0)
    assert not monotone.accepted and monotone.ratio == pytest.approx(-0.5)
    # Two iterations ago f was 2.0: ρ_ref = (2 − 1.05)/(2 − 1 + 0.1) = 0.8636 ≥ eta2, a full step: expand.
    relaxed = decide(POLICY, 1.0, loss=1.0, trial_loss=1.05, pred=0.1, step_norm=1.0, reference=2.0)
    assert relaxed.accepted and relaxed.reason == "expanded"
    assert relaxed.ratio == pytest.approx(0.95 / 1.1)
    assert relaxed.radius == pytest.approx(1.2)


def test_a_rise_above_the_reference_is_rejected() -> None:
    # The trial value exceeds the reference itself: ρ_ref < 0, so both ratios reject.
    decision = decide(POLICY, 1.0, loss=1.0, trial_loss=2.1, pred=0.1, step_norm=1.0, reference=2.0)
    assert not decision.accepted and decision.reason == "rejected_ratio"
    assert decision.radius == pytest.approx(0.9)


def test_acceptance_bound_lowers_the_reference_by_eta1_of_the_relaxed_prediction() -> None:
    # Accepted iff f_trial ≤ f_ref − η₁(f_ref − f + pred): probe both sides of that bound.
    loss, reference, pred = 1.0, 1.5, 0.2
    bound = reference - POLICY.eta1 * (reference - loss + pred)
    above = decide(POLICY, 1.0, loss, bound + 1e-9, pred, 0.5, reference)
    below = decide(POLICY, 1.0, loss, bound - 1e-9, pred, 0.5, reference)
    assert not above.accepted and below.accepted
    assert below.reason == "accepted" and below.radius == 1.0  # interior step: radius kept


def test_reference_never_makes_the_ratio_smaller_than_the_monotone_one() -> None:
    # A step that the monotone rule expands on (ρ_mono = 1) stays expanded with a reference.
    for reference in (1.0, 1.1, 3.0, math.inf, math.nan):
        decision = decide(POLICY, 1.0, loss=1.0, trial_loss=0.9, pred=0.1, step_norm=1.0, reference=reference)
        assert decision.accepted and decision.ratio >= 1.0 - 1e-12


def test_nonfinite_and_nonpositive_prediction_still_reject() -> None:
    assert decide(POLICY, 1.0, 1.0, math.nan, 0.1, 1.0, reference=5.0).reason == "rejected_nonfinite"
    assert decide(POLICY, 1.0, 1.0, 0.5, 0.0, 1.0, reference=5.0).reason == "rejected_pred"


def test_constructed_sequence_accepts_exactly_what_the_rule_says() -> None:
    """Measured (f, f_trial, pred) of five iterations: M = 3 accepts the two rises that M = 1 rejects."""
    sequence = [
        (2.00, 1.50, 0.40),  # ρ = 1.25: accepted by both
        (1.50, 1.60, 0.20),  # rise: ρ_mono < 0; ref 2.0 → (2 − 1.6)/(0.5 + 0.2) = 0.571: accepted with M = 3
        (1.60, 1.20, 0.30),  # both
        (1.20, 1.40, 0.10),  # rise: ref max(1.5, 1.6, 1.2) = 1.6 → 0.2/0.5 = 0.4: accepted with M = 3
        (1.40, 1.70, 0.10),  # rise above ref 1.6: rejected by both
    ]
    expected = {1: [True, False, True, False, False], 3: [True, True, True, True, False]}
    for size, accepted in expected.items():
        window = ReferenceWindow(size)
        got = []
        for loss, trial, pred in sequence:
            reference = window.reference(loss)
            window.record(loss)
            got.append(decide(POLICY, 1.0, loss, trial, pred, 0.5, reference).accepted)
        assert got == accepted, (size, got)
