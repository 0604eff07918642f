"""The engine as `serve` builds it (server/core/build.py)."""

import pytest

import scheduler
from server.config import ServeConfig
from server.core.build import MAX_GUARD, MIN_GUARD, START_GUARD, build_engine
from tests.server.helpers import OPTIONS

PROGRAM = scheduler.compile(scheduler.get_model("tiny"), scheduler.parse_pool("cpu:1"), OPTIONS)


@pytest.mark.parametrize("band", [None, 0.25])
def test_a_band_measured_at_start_paces_only_the_first_ticks(band):
    """Measured (no --guard-band-pct): the first ticks take the start-up jitter as their band,
    no less than START_GUARD (served steps run slower than the quiet start-up measurement),
    and the served pace MIN_GUARD; given: the band is the served margin too."""
    engine, executor, scale = build_engine(ServeConfig(PROGRAM.to_json(), guard_band_frac=band), PROGRAM.view())
    try:
        cfg = engine.config
        if band is None:
            assert START_GUARD <= cfg.guard_band_frac <= MAX_GUARD and cfg.pace_margin == MIN_GUARD < START_GUARD
        else:
            assert cfg.guard_band_frac == band and cfg.pace_margin is None
        assert engine.pacers["decode"].margin == (MIN_GUARD if band is None else band)
        assert engine.pacers["decode"].factor == pytest.approx(scale * (1 + cfg.guard_band_frac))
        if band is None:  # the first prefill ticks: the measured jitter, not the decode ticks' floor
            assert MIN_GUARD <= cfg.prefill_guard_frac <= MAX_GUARD
        else:
            assert cfg.prefill_guard_frac is None
        prefill_band = cfg.guard_band_frac if cfg.prefill_guard_frac is None else cfg.prefill_guard_frac
        assert engine.pacers["prefill"].factor == pytest.approx((cfg.prefill_scale or scale) * (1 + prefill_band))
    finally:
        executor.close()
