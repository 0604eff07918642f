"""Admission predictions: the tick scheduler run forward. The jump over stretches of
identical decode ticks must give exactly what running every tick gives."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.simulate import NEW_ID, predict_arrival
from scheduler.ticks import DECODE, Seq, TickScheduler

TICK_S = {("prefill", 1): 0.050, (DECODE, 1): 0.010, (DECODE, 2): 0.011, (DECODE, 4): 0.013,
          ("mixed", 1): 0.015, ("mixed", 2): 0.016, ("mixed", 4): 0.017}


def tick_s(phase: str, bucket: int) -> float:
    return TICK_S[(phase, bucket)]


def tick_by_tick(sched: TickScheduler, prompt_len: int, max_tokens: int) -> tuple[float, float]:
    """The reference: every tick, no jumps."""
    sim = sched.clone()
    new = Seq(NEW_ID, prompt_len, max_tokens)
    sim.waiting.append(new)
    t, ttft = 0.0, None
    while new.finish_reason is None:
        plan = sim.schedule()
        t += tick_s(plan.phase, plan.bucket)
        sim.update(plan)
        if ttft is None and new.generated:
            ttft = t
    return ttft, t


def busy(arrivals: list[tuple[int, int]], warm_ticks: int, mixed: bool = False) -> TickScheduler:
    sched = TickScheduler(max_slots=4, max_context=128, chunk=16, buckets=(1, 2, 4), max_queue=64,
                          slices={1: 8, 2: 8, 4: 4} if mixed else {})
    for i, (p, m) in enumerate(arrivals):
        sched.add(Seq(i, p, m))
    for _ in range(warm_ticks):
        plan = sched.schedule()
        if plan is None:
            break
        sched.update(plan)
    return sched


def test_an_idle_server_predicts_prefill_chunks_then_decode_ticks():
    sched = busy([], 0)
    ttft, e2e = predict_arrival(sched, prompt_len=40, max_tokens=5, tick_s=tick_s)
    assert ttft == 3 * 0.050  # 40 tokens in 16-token chunks
    assert abs(e2e - (ttft + 4 * 0.010)) < 1e-12
    assert sched.idle()  # the engine's state is untouched


def test_a_queued_request_waits_for_a_slot():
    sched = busy([(16, 20)] * 4, warm_ticks=8)  # four streams hold every slot
    ttft, _ = predict_arrival(sched, 16, 5, tick_s)
    alone, _ = predict_arrival(busy([], 0), 16, 5, tick_s)
    assert ttft > alone + 10 * 0.013  # behind the earliest of the 20-token generations


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.integers(1, 60), st.integers(1, 40)), max_size=12),
       st.integers(0, 80), st.integers(1, 60), st.integers(1, 40), st.booleans())
def test_the_jumps_give_exactly_the_tick_by_tick_answer(arrivals, warm, prompt_len, max_tokens, mixed):
    sched = busy(arrivals, warm, mixed)
    got = predict_arrival(sched, prompt_len, max_tokens, tick_s)
    want = tick_by_tick(sched, prompt_len, max_tokens)
    assert abs(got[0] - want[0]) < 1e-9 and abs(got[1] - want[1]) < 1e-9


def test_a_deep_queue_is_predicted_in_milliseconds():
    import time

    sched = TickScheduler(max_slots=8, max_context=2048, chunk=64, buckets=(1, 2, 4, 8), max_queue=64)
    for i in range(72):
        sched.add(Seq(i, 100, 1000))
        if i == 7:
            sched.update(sched.schedule())  # eight admitted, one prefill tick run
    start = time.perf_counter()
    ttft, e2e = predict_arrival(sched, 100, 1000, lambda phase, b: 0.01)
    assert ttft > 8 * 0.01 * 999  # nine rounds of 8 slots, each ~1000 decode ticks
    assert time.perf_counter() - start < 1.0  # a burst of admissions must not stall the event loop
