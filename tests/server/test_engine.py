"""The engine's pacing: one cadence per bucket in deterministic mode."""

from __future__ import annotations

import pytest

import scheduler
from server.engine import Engine, EngineConfig
from tests.server.helpers import OPTIONS

PROGRAM = scheduler.compile(scheduler.get_model("tiny"), scheduler.parse_pool("cpu:1"), OPTIONS).data


@pytest.mark.parametrize("bucket", PROGRAM["buckets"])
def test_decode_and_mixed_ticks_of_a_bucket_share_one_cadence_when_deterministic(bucket):
    """A stream's tokens come at the same pace whether or not a prompt goes in beside it."""
    paced = Engine(None, PROGRAM, EngineConfig(deterministic=True, guard_band_frac=0.0, guard_band_s=0.0))
    steps = {phase: program_step(phase, bucket) for phase in ("decode", "mixed")}
    assert steps["mixed"] > steps["decode"]
    assert paced.tick_s("decode", bucket) == paced.tick_s("mixed", bucket) == max(steps.values())
    free = Engine(None, PROGRAM, EngineConfig(deterministic=False, guard_band_frac=0.0, guard_band_s=0.0))
    assert (free.tick_s("decode", bucket), free.tick_s("mixed", bucket)) == (steps["decode"], steps["mixed"])


def program_step(phase: str, bucket: int) -> float:
    return next(s["step_s"] for s in PROGRAM["schedules"] if (s["phase"], s["batch"]) == (phase, bucket))


def test_slow_prefill_steps_do_not_slow_the_decode_cadence():
    engine = Engine(None, PROGRAM, EngineConfig(deterministic=True))
    before = {b: engine.tick_s("decode", b) for b in PROGRAM["buckets"]}
    pacer = engine.pacers["prefill"]
    for _ in range(512):  # prefill steps 1.5x their prediction: its own pace follows
        pacer.observe(1.5 * program_step("prefill", 1), program_step("prefill", 1))
    assert pacer.factor == pytest.approx(1.5 * (1 + pacer.margin))
    assert {b: engine.tick_s("decode", b) for b in PROGRAM["buckets"]} == before
