"""Drift-aware pacing: the tick's factor follows the measured steps' high quantile."""

from __future__ import annotations

import random

import pytest

from server.pacing import Pacer


def feed(pacer: Pacer, ratios) -> list[bool]:
    return [pacer.observe(r * 0.010, 0.010) for r in ratios]


def test_a_pessimistic_start_tightens_to_what_the_host_measures():
    pacer = Pacer(factor=1.2 * 1.3)  # a start-up time scale of 1.3 and a 20% guard band
    rng = random.Random(0)
    ratios = [rng.uniform(0.95, 1.05) for _ in range(256)]
    changed = feed(pacer, ratios)
    assert sum(changed) == pacer.repaces >= 1
    assert 1.05 < pacer.factor < 1.05 * 1.05 + 1e-9  # the 99th percentile (<= 1.05) + 5%
    overruns = sum(r * 0.010 > 0.010 * pacer.factor for r in ratios)
    assert overruns == 0


def test_a_host_that_drifts_slower_is_followed():
    pacer = Pacer(factor=1.1)
    feed(pacer, [1.0] * 128)
    before = pacer.factor
    feed(pacer, [1.4] * 256)
    assert pacer.factor == pytest.approx(1.4 * 1.05) and pacer.factor > before


def test_the_factor_waits_for_enough_samples_and_ignores_small_moves():
    pacer = Pacer(factor=1.05 * 1.0)
    assert not any(feed(pacer, [1.0] * 63))  # fewer than min_samples
    assert not any(feed(pacer, [1.01] * 200))  # 1.01 x 1.05 is within 2% of 1.05
    assert pacer.repaces == 0


def test_fixed_pacing_never_moves():
    pacer = Pacer(factor=1.5, adaptive=False)
    assert not any(feed(pacer, [3.0] * 300)) and pacer.factor == 1.5


@pytest.mark.parametrize("kw", [dict(factor=0.0), dict(factor=1.0, quantile=0.0), dict(factor=1.0, margin=-0.1)])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError):
        Pacer(**kw)
