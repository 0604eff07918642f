"""Routing policies and the fleet simulation: one replica is exactly the one-engine
simulation; a prediction-routed request gets its first token when its replica said it
would (late by at most the tick in flight); ties and full queues are decided the same
way every time."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.fleet import POLICIES, Candidate, pick, simulate_fleet
from scheduler.simulate import SimRequest, simulate_load
from scheduler.ticks import TickScheduler
from tests.scheduler.test_simulate import tick_s


def sched(max_queue: int = 64) -> TickScheduler:
    return TickScheduler(max_slots=4, max_context=512, chunk=16, buckets=(1, 2, 4), max_queue=max_queue,
                         slices={1: 8, 2: 8, 4: 4})


def bursty(n: int, rate: float, seed: int, shape: float = 0.25) -> list[SimRequest]:
    """Gamma arrivals (shape < 1: bursty) with mixed prompt lengths."""
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.gammavariate(shape, 1 / (rate * shape))
        out.append(SimRequest(rng.choice((8, 40, 120, 300)), rng.choice((4, 16, 48)), t))
    return out


# --- pick ---------------------------------------------------------------------------------


def test_prediction_takes_the_lowest_ttft_and_breaks_ties_by_index():
    cs = [Candidate(0, 0.5, 1, False), Candidate(1, 0.2, 9, False), Candidate(2, 0.2, 0, False)]
    assert pick("prediction", cs, 0) == 1
    assert pick("least-outstanding", cs, 0) == 2
    assert pick("round-robin", cs, 4) == 1
    # A full replica is passed over; when all are full, the request is refused.
    cs[1] = Candidate(1, 0.2, 9, True)
    assert pick("prediction", cs, 0) == 2
    assert pick("round-robin", cs, 1) is None  # round-robin does not look
    assert pick("prediction", [Candidate(0, 0.1, 0, True)], 0) is None
    assert pick("round-robin", [], 0) is None


def test_an_unknown_policy_is_named():
    with pytest.raises(ValueError, match="'random'"):
        pick("random", [Candidate(0, 0.1, 0, False)], 0)
    with pytest.raises(ValueError, match="'random'"):
        simulate_fleet([sched()], [SimRequest(8, 4, 0.0)], tick_s, "random")
    with pytest.raises(ValueError, match="open loop"):
        simulate_fleet([sched()], [SimRequest(8, 4, None)], tick_s, "prediction")


# --- simulate_fleet -------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), rate=st.floats(1.0, 80.0), policy=st.sampled_from(POLICIES))
def test_one_replica_is_the_one_engine_simulation(seed, rate, policy):
    requests = bursty(60, rate, seed)
    alone, end_alone = simulate_load(sched(8), requests, tick_s)
    fleet, end_fleet = simulate_fleet([sched(8)], requests, tick_s, policy)
    for a, f in zip(alone, fleet):
        assert a.status == f.status
        assert f.token_s == pytest.approx(a.token_s, rel=1e-12, abs=1e-12)  # up to float sums
    assert end_fleet == pytest.approx(end_alone)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), rate=st.floats(1.0, 80.0), n=st.integers(2, 4))
def test_a_routed_request_gets_its_first_token_when_its_replica_said(seed, rate, n):
    """The promise at routing time is exact: the tick in flight ends when it ends, the
    request is admitted after it, and nothing that arrives later runs ahead of it (its
    prompt goes in first, and later prompts decode only after)."""
    results, _ = simulate_fleet([sched() for _ in range(n)], bursty(80, rate, seed), tick_s, "prediction")
    for r in results:
        assert r.status == "OK" and 0 <= r.replica < n
        assert r.ttft_s == pytest.approx(r.predicted_ttft_s, rel=1e-9, abs=1e-9)


def test_each_request_goes_to_the_lowest_prediction_and_the_run_is_deterministic():
    requests = bursty(200, 40.0, seed=3)
    first = simulate_fleet([sched() for _ in range(3)], requests, tick_s, "prediction")
    again = simulate_fleet([sched() for _ in range(3)], requests, tick_s, "prediction")
    assert [(r.replica, r.token_s) for r in first[0]] == [(r.replica, r.token_s) for r in again[0]]
    assert {r.replica for r in first[0]} == {0, 1, 2}


def test_a_burst_goes_to_the_idle_replica_not_the_busy_one():
    # Replica 0 takes a long prompt at t=0; a short request right after goes to replica 1.
    requests = [SimRequest(300, 8, 0.0), SimRequest(8, 8, 0.001)]
    results, _ = simulate_fleet([sched(), sched()], requests, tick_s, "prediction")
    assert [r.replica for r in results] == [0, 1]
    rr, _ = simulate_fleet([sched(), sched()], requests + [SimRequest(8, 8, 0.002)], tick_s, "round-robin")
    assert [r.replica for r in rr] == [0, 1, 0]  # round-robin sends the third behind the long prompt


def test_refused_when_every_queue_is_full():
    requests = [SimRequest(300, 48, 0.0001 * i) for i in range(20)]
    results, _ = simulate_fleet([sched(max_queue=1), sched(max_queue=1)], requests, tick_s, "prediction")
    refused = [r for r in results if r.status == "RESOURCE_EXHAUSTED"]
    assert refused and all(r.replica == -1 and not r.token_s for r in refused)
    assert all(math.isfinite(r.ttft_s) for r in results if r.status == "OK")
