"""Drift-aware pacing: the tick's factor follows a high quantile of the measured steps."""

from __future__ import annotations

import random

import pytest

from server.core.pacing import Pacer


def feed(pacer: Pacer, ratios) -> list[bool]:
    return [pacer.observe(r * 0.010, 0.010) for r in ratios]


def test_a_pessimistic_start_tightens_to_what_the_host_measures():
    pacer = Pacer(factor=1.2 * 1.3)  # a start-up time scale of 1.3 and a 20% guard band
    rng = random.Random(0)
    ratios = [rng.uniform(0.95, 1.05) for _ in range(512)]
    changed = feed(pacer, ratios)
    assert sum(changed) == pacer.repaces >= 1
    assert 1.0 * (1 + pacer.margin) < pacer.factor <= 1.05 * (1 + pacer.margin)
    assert sum(r > pacer.factor for r in ratios) == 0  # the margin covers the whole spread here


def test_a_few_outliers_do_not_set_the_pace():
    pacer = Pacer(factor=1.5)
    ratios = [1.0] * 500 + [3.0] * 5  # 1% of steps three times as long (a new shape, a stall)
    feed(pacer, ratios)
    assert pacer.factor == pytest.approx(1.0 * (1 + pacer.margin))


def test_a_host_that_drifts_slower_is_followed():
    pacer = Pacer(factor=1.1)
    feed(pacer, [1.0] * 256)
    before = pacer.factor
    feed(pacer, [1.4] * 512)
    assert pacer.factor == pytest.approx(1.4 * (1 + pacer.margin)) and pacer.factor > before


def test_the_factor_waits_for_enough_samples_and_ignores_small_moves():
    pacer = Pacer(factor=1.0 * 1.10)
    assert not any(feed(pacer, [0.5] * (pacer.min_samples - 1)))  # fewer than min_samples
    pacer = Pacer(factor=1.0 * 1.10)
    feed(pacer, [1.0] * pacer.min_samples)  # the first estimate from its own ticks: 1.0 x 1.10 again
    assert pacer.repaces == 0 and pacer.factor == pytest.approx(1.10)
    assert not any(feed(pacer, [1.01] * 600))  # 1.01 x 1.10 is within 5% of 1.10
    assert pacer.repaces == 0


def test_the_first_estimate_from_its_own_ticks_replaces_the_start_up_factor_however_close():
    """The start-up factor is a guess (a 25% band, server/core/build.py): served steps at
    1.22 x 1.1 within the tolerance of it would otherwise keep it all run long."""
    pacer = Pacer(factor=1.0 * 1.25)
    changed = feed(pacer, [1.22 / 1.10] * pacer.min_samples)
    assert changed[-1] and pacer.repaces == 1 and pacer.factor == pytest.approx(1.22)
    assert not any(feed(pacer, [1.24 / 1.10] * 600)) and pacer.factor == pytest.approx(1.22)  # then within 5%: kept


def test_fixed_pacing_never_moves():
    pacer = Pacer(factor=1.5, adaptive=False)
    assert not any(feed(pacer, [3.0] * 600)) and pacer.factor == 1.5


@pytest.mark.parametrize("kw", [dict(factor=0.0), dict(factor=1.0, quantile=0.0), dict(factor=1.0, margin=-0.1)])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError):
        Pacer(**kw)


def test_a_phase_with_few_ticks_follows_another_phases_slowdown_until_it_has_its_own():
    prefill = Pacer(1.2)
    assert prefill.follow(1.5) and prefill.factor == pytest.approx(1.8) and prefill.repaces == 1
    assert not prefill.follow(0.5) and prefill.factor == pytest.approx(1.8)  # never faster on another's word
    assert not prefill.follow(float("nan")) and not prefill.follow(float("inf"))
    for _ in range(prefill.min_samples):
        prefill.observe(1.0, 1.0)
    assert not prefill.follow(2.0)  # its own samples decide from here on
    assert not Pacer(1.2, adaptive=False).follow(1.5)


def test_a_slowdown_is_followed_within_a_few_ticks_and_one_slow_step_is_not_one():
    pacer = Pacer(factor=1.1)
    assert not any(feed(pacer, [1.0] * 15 + [3.0]))  # one slow step in sixteen
    changed = feed(pacer, [1.5] * 2 * pacer.fast_window)  # the host is half as slow again
    assert changed.index(True) < pacer.fast_window and pacer.factor == pytest.approx(1.5 * (1 + pacer.margin))
    assert not any(feed(pacer, [1.0] * (pacer.min_samples - 60)))  # faster again: waits for the 128-tick rule


def test_a_host_that_got_faster_again_is_followed_within_a_window():
    pacer = Pacer(factor=1.1)
    feed(pacer, [1.6] * 600)  # a slow spell: the fast rule and the quantile rule follow it up
    assert pacer.factor == pytest.approx(1.6 * (1 + pacer.margin))
    # The host is back: followed within 192 ticks (~15 s of an 80 ms cadence), not ~40 s.
    feed(pacer, [1.0] * 192)
    assert pacer.factor == pytest.approx(1.0 * (1 + pacer.margin))


def test_a_fresh_pacer_keeps_the_settings_and_factor_but_not_the_samples():
    p = Pacer(1.3, quantile=0.5, margin=0.1, min_samples=16, every=16, fast_window=4)
    for _ in range(20):
        p.observe(1.5, 1.0)
    f = p.fresh(min_samples=4)
    assert (f.factor, f.quantile, f.margin, f.every, f.fast_window, f.min_samples) == (p.factor, 0.5, 0.1, 16, 4, 4)
    assert f.samples == 0 and p.samples == 20
