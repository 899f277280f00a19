"""Tests of hpcopt.analysis.perfmodel: allreduce formulas, the fit, and the scaling predictions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from hpcopt.analysis.perfmodel import CollectiveProfile, Network, allreduce_time, fit_network, predict
from hpcopt.errors import ConfigError, DataError

ALPHA, BANDWIDTH = 2e-6, 25e9
BETA = 1 / BANDWIDTH


@pytest.mark.parametrize(
    ("algorithm", "ranks", "expected"),
    [
        ("ring", 8, 2 * 7 * ALPHA + 2 * 7 / 8 * 1e6 * BETA),
        ("recursive-doubling", 8, 3 * (ALPHA + 1e6 * BETA)),
        ("rabenseifner", 8, 2 * 3 * ALPHA + 2 * 7 / 8 * 1e6 * BETA),
        ("rabenseifner", 5, 2 * 3 * ALPHA + 2 * 4 / 5 * 1e6 * BETA),  # ⌈log2 5⌉ = 3
        ("ring", 1, 0.0),
    ],
)
def test_allreduce_formulas(algorithm: str, ranks: int, expected: float) -> None:
    assert allreduce_time(ranks, 1e6, Network(ALPHA, BANDWIDTH, algorithm)) == pytest.approx(expected, rel=1e-12)


def test_auto_picks_cheapest() -> None:
    net = Network(ALPHA, BANDWIDTH)
    for nbytes in (8.0, 1e3, 1e8):
        best = min(
            allreduce_time(1024, nbytes, Network(ALPHA, BANDWIDTH, alg))
            for alg in ("ring", "recursive-doubling", "rabenseifner")
        )
        assert allreduce_time(1024, nbytes, net) == best
    # Short messages: latency-bound recursive doubling; long ones: bandwidth-optimal.
    assert allreduce_time(1024, 8.0, net) == pytest.approx(10 * (ALPHA + 8 * BETA))
    assert allreduce_time(1024, 1e8, net) == pytest.approx(20 * ALPHA + 2 * 1023 / 1024 * 1e8 * BETA)


def test_fit_recovers_network() -> None:
    truth = Network(5e-6, 2e9, "ring")
    samples = [(p, b, allreduce_time(p, b, truth)) for p in (2, 4) for b in (8.0, 4e3, 4e5, 4e6)]
    fitted = fit_network(samples, "ring")
    assert fitted.latency == pytest.approx(5e-6, rel=1e-6)
    assert fitted.bandwidth == pytest.approx(2e9, rel=1e-6)
    with pytest.raises(DataError, match="at least two"):
        fit_network([(1, 8.0, 1e-6)])


def test_predict_strong_and_weak() -> None:
    # 1 s of compute on 2 ranks; 2 allreduces of 4 MB each per step.
    profile = CollectiveProfile("sgd", calls=2, bytes=8e6, compute=1.0, ref_ranks=2)
    net = Network(ALPHA, BANDWIDTH, "ring")
    comm64 = 2 * allreduce_time(64, 4e6, net)
    one, p64 = predict(profile, net, [1, 64], "strong")
    assert one.efficiency == 1.0 and one.comm == 0.0 and one.compute == pytest.approx(2.0)
    assert p64.compute == pytest.approx(2.0 / 64)
    assert p64.efficiency == pytest.approx(2.0 / (64 * (2.0 / 64 + comm64)))
    assert p64.speedup == pytest.approx(64 * p64.efficiency)
    (weak,) = predict(profile, net, [64], "weak")
    assert weak.compute == 1.0 and weak.efficiency == pytest.approx(1.0 / (1.0 + comm64))
    # Strong scaling degrades faster than weak scaling.
    assert p64.efficiency < weak.efficiency
    with pytest.raises(ConfigError):
        predict(profile, net, [2], "diagonal")
    assert math.isnan(predict(CollectiveProfile("x", 0, 0, 0.0), net, [2], "weak")[0].efficiency)


def test_network_validation_and_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Network(1e-6, 0.0)
    with pytest.raises(ConfigError):
        Network(1e-6, 1e9, "butterfly")
    Network(1e-6, 1e9, "ring").to_json(tmp_path / "net.json")
    assert Network.from_json(tmp_path / "net.json") == Network(1e-6, 1e9, "ring")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="cannot read network"):
        Network.from_json(tmp_path / "bad.json")


@pytest.mark.timeout(120)
def test_calibrate_under_mpiexec() -> None:
    from hpcopt.analysis.perfmodel import calibrate

    network, samples = calibrate(2, sizes=(16, 65_536, 1_048_576), repeats=3)
    assert [(ranks, nbytes) for ranks, nbytes, _ in samples] == [(2, 64.0), (2, 262_144.0), (2, 4_194_304.0)]
    assert all(seconds > 0 for _, _, seconds in samples)
    # Shared memory on one machine: somewhere between 1 MB/s and 1 TB/s, latency under 10 ms.
    assert 1e6 < network.bandwidth < 1e12 and 0 <= network.latency < 1e-2
