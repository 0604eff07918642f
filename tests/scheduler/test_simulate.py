"""Admission predictions: the tick scheduler run forward. The jump over stretches of
identical decode ticks must give exactly what running every tick gives, also where rows'
contexts cross key buckets (ticks there last longer)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.simulate import NEW_ID, predict_arrival
from scheduler.ticks import DECODE, JOIN_SHARE, Seq, StepKey, TickScheduler

TICK_S = {("prefill", 1): 0.050, (DECODE, 1): 0.010, (DECODE, 2): 0.011, (DECODE, 4): 0.013,
          ("mixed", 1): 0.015, ("mixed", 2): 0.016, ("mixed", 4): 0.017}


def tick_s(key: StepKey) -> float:
    """At 128 keys, TICK_S; 1/8 longer per doubling of the keys attended."""
    return TICK_S[(key.phase, key.batch)] * (1 + (key.keys.bit_length() - 8) / 8)


# A 40-token prompt alone, in 16-token prefill steps ending at 16, 32 and 40: from
# MIN_PROMPT_KEYS (32) keys, as a prefill step's keys start.
PROMPT_40 = sum(tick_s(StepKey("prefill", 1, k, 16)) for k in (32, 32, 64))


def tick_by_tick(sched: TickScheduler, prompt_len: int, max_tokens: int) -> tuple[float, float]:
    """The reference: every tick, no jumps."""
    sim = sched.clone()
    new = Seq(NEW_ID, prompt_len, max_tokens)
    sim.waiting.append(new)
    t, ttft = 0.0, None
    while new.finish_reason is None:
        plan = sim.schedule()
        t += tick_s(plan.key)
        sim.update(plan)
        if ttft is None and new.generated:
            ttft = t
    return ttft, t


def busy(arrivals: list[tuple[int, int]], warm_ticks: int, mixed: bool = False) -> TickScheduler:
    sched = TickScheduler(max_slots=4, max_context=512, chunk=16, buckets=(1, 2, 4), max_queue=64,
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
    assert ttft == PROMPT_40  # 40 tokens in 16-token chunks
    assert abs(e2e - (ttft + 4 * 0.010)) < 1e-12
    assert sched.idle()  # the engine's state is untouched


def test_a_queued_request_waits_for_a_slot():
    sched = busy([(16, 20)] * 4, warm_ticks=8)  # four streams hold every slot
    ttft, _ = predict_arrival(sched, 16, 5, tick_s)
    alone, _ = predict_arrival(busy([], 0), 16, 5, tick_s)
    assert ttft > alone + 10 * 0.013  # behind the earliest of the 20-token generations


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.integers(1, 200), st.integers(1, 160)), max_size=12),
       st.integers(0, 300), st.integers(1, 200), st.integers(1, 160), st.booleans())
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
    ttft, e2e = predict_arrival(sched, 100, 1000, lambda key: 0.01)
    assert ttft > 8 * 0.01 * 999  # nine rounds of 8 slots, each ~1000 decode ticks
    assert time.perf_counter() - start < 1.0  # a burst of admissions must not stall the event loop


def test_a_lone_closed_loop_stream_gets_prefill_then_decode_ticks():
    from scheduler.simulate import SimRequest, simulate_load

    results, end = simulate_load(busy([], 0), [SimRequest(40, 5)] * 3, tick_s, concurrency=1)
    for r in results:
        assert r.status == "OK" and len(r.token_s) == 5
        assert abs(r.ttft_s - PROMPT_40) < 1e-9 and all(abs(g - 0.010) < 1e-9 for g in r.itl_s)
    assert abs(end - 3 * (PROMPT_40 + 4 * 0.010)) < 1e-9


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.integers(1, 200), st.integers(1, 160), st.floats(0, 2)), min_size=1, max_size=25),
       st.booleans(), st.integers(0, 6))
def test_simulated_load_with_jumps_is_exactly_the_tick_by_tick_run(reqs, mixed, cap):
    from scheduler.simulate import SimRequest, simulate_load

    requests = [SimRequest(p, m, at) for p, m, at in reqs]
    fast, t1 = simulate_load(busy([], 0, mixed), requests, tick_s, concurrency=cap)
    slow, t2 = simulate_load(busy([], 0, mixed), requests, tick_s, concurrency=cap, jumps=False)
    assert [r.status for r in fast] == [r.status for r in slow] and abs(t1 - t2) < 1e-9
    for a, b in zip(fast, slow):
        assert len(a.token_s) == len(b.token_s) and all(abs(x - y) < 1e-9 for x, y in zip(a.token_s, b.token_s))


def test_a_queue_past_its_bound_refuses_and_every_admitted_request_finishes():
    from scheduler.simulate import SimRequest, simulate_load

    sched = TickScheduler(max_slots=2, max_context=128, chunk=16, buckets=(1, 2), max_queue=3)
    results, _ = simulate_load(sched, [SimRequest(10, 8, 0.0)] * 10, lambda key: 0.01)
    # All ten arrive within the first tick: five fit (the two free slots' and a queue of
    # three beyond them), five are refused, as the engine does when a burst beats its tick.
    assert [r.status for r in results].count("RESOURCE_EXHAUSTED") == 5
    assert all(len(r.token_s) == 8 for r in results if r.status == "OK") and sched.idle()


def test_ten_thousand_requests_of_llama_70b_on_lpu_576():
    """(Its speed is in bench/simulate_scale.py; here, that it serves them all.)"""
    import scheduler
    from scheduler.simulate import SimRequest, paced_ticks, simulate_load

    view = scheduler.compile(scheduler.get_model("llama-2-70b"), scheduler.parse_pool("lpu:576"),
                             scheduler.CompileOptions(dtype="int8")).view()
    requests = [SimRequest(128, 128, i / 2.0) for i in range(10_000)]  # 2 req/s, within capacity
    ticks = paced_ticks(view, {"prefill": 1.2, "decode": 1.2, "mixed": 1.2})
    results, _ = simulate_load(view.tick_scheduler(), requests, ticks.__getitem__)
    assert all(r.status == "OK" and len(r.token_s) == 128 for r in results)


# -- promises (deterministic serving): ticks follow the work, cadences bound them --------

def promising(mixed: bool = True, alone_own_step: bool = True) -> TickScheduler:
    sched = busy([], 0, mixed)
    sched.tick_s, sched.alone_own_step = tick_s, alone_own_step
    return sched


def company(share: float = JOIN_SHARE) -> float:
    """The TPOT in company at 128 keys: the longest decode tick and `share` of the longest
    mixed tick's excess over it."""
    decode = max(tick_s(StepKey(DECODE, b, 128, 1)) for b in (1, 2, 4))
    return decode + share * (max(tick_s(StepKey("mixed", b, 128, 1)) for b in (1, 2, 4)) - decode)


def test_a_lone_stream_is_promised_its_own_decode_step_and_company_a_share_of_the_mixed_tick():
    from scheduler.simulate import promise_cadence

    sched = promising()
    lone = Seq(0, 20, 10)
    assert promise_cadence(sched, lone) == tick_s(StepKey(DECODE, 1, 128, 1))
    sched.add(lone)
    second = Seq(1, 20, 10)
    assert promise_cadence(sched, second) == pytest.approx(company())
    sched.join_share = 1.0  # the longest tick
    assert promise_cadence(sched, second) == max(tick_s(StepKey(p, b, 128, 1)) for p in (DECODE, "mixed")
                                                 for b in (1, 2, 4))
    assert promise_cadence(sched, Seq(2, 20, 1)) == 0.0  # one token: no cadence to keep


def test_an_arrival_while_an_earlier_stream_is_still_handed_out_is_in_company():
    """Alone means nothing running or waiting and no earlier stream still being delivered
    (`delivering`): the clients of a closed loop come back one by one as their streams end,
    and the first back must not make the others wait for its own-step cadence."""
    from scheduler.simulate import promise_cadence

    sched = promising()
    sched.delivering = True
    assert promise_cadence(sched, Seq(0, 20, 10)) == pytest.approx(company())
    assert sched.clone().delivering
    sched.delivering = False
    assert promise_cadence(sched, Seq(0, 20, 10)) == tick_s(StepKey(DECODE, 1, 128, 1))


@pytest.mark.parametrize("clients", [1, 4])
def test_closed_loop_promises_own_steps_to_one_client_and_company_to_several_after_the_first(clients):
    from scheduler.simulate import SimRequest, simulate_load

    own = tick_s(StepKey(DECODE, 1, 128, 1))
    results, _ = simulate_load(promising(), [SimRequest(12, 40) for _ in range(24)], tick_s, concurrency=clients)
    cadences = [r.promise[1] for r in results]
    if clients == 1:  # each arrives after the last was handed out in full
        assert cadences == [own] * 24
    else:  # the first finds an idle server; every later one, streams still being handed out
        assert cadences[0] == own and own not in cadences[clients:]


def test_simulated_promises_add_the_engines_prefill_tails_cold_allowance_and_start_lead():
    """`lockstep simulate` promises what the engine would (scheduler/simulate.Pace): the
    longest prefill tick's tail on every first token, the cold allowance on promises made
    after an idle spell (COLD_IDLE_S) or within COLD_WINDOW_S of its first tick, and the
    start lead on every promise."""
    from scheduler.simulate import COLD_IDLE_S, COLD_WINDOW_S, SimRequest, simulate_load

    def tail_s(key: StepKey) -> float:  # 1 ms per 32 keys: the 40-token prompt's ticks at 32, 32, 64
        return key.keys / 32 * 1e-3 if key.phase == "prefill" else 0.0

    cold = 0.030
    arrivals = [0.0, COLD_WINDOW_S / 2, 5.0, 5.0 + 0.3]  # idle / in the window / idle / warm
    plain, _ = simulate_load(promising(), [SimRequest(40, 5, a) for a in arrivals], tick_s)
    results, _ = simulate_load(promising(), [SimRequest(40, 5, a) for a in arrivals], tick_s, tail_s=tail_s,
                               cold_s=cold)
    assert plain[0].promise[0] == pytest.approx(PROMPT_40)
    assert results[3].arrival_s - results[2].token_s[-1] < COLD_IDLE_S and results[3].arrival_s > 5.0 + COLD_WINDOW_S
    assert [r.promise[0] - p.promise[0] for r, p in zip(results, plain)] == pytest.approx(
        [0.002 + cold, 0.002 + cold, 0.002 + cold, 0.002])
    for r in results:  # held until promised, never later
        assert r.token_s[0] == pytest.approx(r.arrival_s + r.promise[0]) and r.late_s == 0.0
    # In an admission window, closed as the engine closes it: at the tick that makes a
    # member's first token, that tick in flight (its tail in the promise), after the
    # arrivals within the window joined it.
    grouped, _ = simulate_load(promising(), [SimRequest(40, 5, a) for a in (0.0, 0.001)], tick_s, window_s=0.5,
                               tail_s=tail_s, cold_s=cold)
    alone, _ = simulate_load(promising(), [SimRequest(40, 5, a) for a in (0.0, 0.001)], tick_s, window_s=0.5)
    assert [r.promise[0] - p.promise[0] for r, p in zip(grouped, alone)] == pytest.approx([0.002 + cold] * 2)
    assert grouped[0].promise[1] == grouped[1].promise[1]  # one group, one cadence
    # The tick that made the first token has run: no tail of its own. A lone request's first
    # token is promised when it was made (+ the cold allowance), not a tail after it; in the
    # group above, the second member's prompt ticks still to run keep theirs (0.002).
    lone, _ = simulate_load(promising(), [SimRequest(40, 5, 0.0)], tick_s, window_s=0.5, tail_s=tail_s, cold_s=cold)
    bare, _ = simulate_load(promising(), [SimRequest(40, 5, 0.0)], tick_s, window_s=0.5)
    assert lone[0].promise[0] - bare[0].promise[0] == pytest.approx(cold)
    assert bare[0].promise[0] == pytest.approx(PROMPT_40)
    # Handed out as late as serve's tokens left (its record): first tokens, later ones.
    late, _ = simulate_load(promising(), [SimRequest(40, 5, a) for a in arrivals], tick_s, tail_s=tail_s,
                            cold_s=cold, late_s=lambda k: 0.003 if k == 0 else 0.001)
    for r, on_time in zip(late, results):
        assert [x - y for x, y in zip(r.token_s, on_time.token_s)] == pytest.approx([0.003] + [0.001] * 4)
    # The start lead (the engine's `start_lead_s`): on every promise, warm or cold, grouped or not.
    lead = 0.007
    led, _ = simulate_load(promising(), [SimRequest(40, 5, a) for a in arrivals], tick_s, tail_s=tail_s,
                           cold_s=cold, lead_s=lead)
    assert [r.promise[0] - p.promise[0] for r, p in zip(led, results)] == pytest.approx([lead] * 4)
    assert all(r.token_s[0] == pytest.approx(r.arrival_s + r.promise[0]) for r in led)
    led, _ = simulate_load(promising(), [SimRequest(40, 5, a) for a in (0.0, 0.001)], tick_s, window_s=0.5,
                           tail_s=tail_s, cold_s=cold, lead_s=lead)
    assert [r.promise[0] - p.promise[0] for r, p in zip(led, grouped)] == pytest.approx([lead] * 2)


def test_an_arrival_within_the_grace_after_a_first_token_joins_its_window():
    """As the engine (EngineConfig.window_grace_s): a window closed by a member's first token
    waits its grace first, so a request arriving within it joins the group (one cadence;
    the first member's first token promised after the second's prompt), and the next tick
    starts after it. Later, or without the grace, it goes in on its own."""
    from scheduler.simulate import SimRequest, simulate_load

    first = tick_s(StepKey("prefill", 1, 32, 16))  # the first prompt's one prefill tick ends here
    pair = [SimRequest(16, 5, 0.0), SimRequest(16, 5, first + 0.001)]
    grace, _ = simulate_load(promising(), pair, tick_s, window_s=0.5, window_grace_s=0.002)
    none, _ = simulate_load(promising(), pair, tick_s, window_s=0.5)
    assert grace[0].promise[1] == grace[1].promise[1] > tick_s(StepKey(DECODE, 1, 128, 1))  # company's cadence
    assert grace[0].promise[0] > first + 0.002 + tick_s(StepKey("prefill", 1, 32, 16)) - 1e-9  # after both prompts
    assert none[0].promise == pytest.approx((first, tick_s(StepKey(DECODE, 1, 128, 1))))  # alone: its own step
    assert all(r.late_s <= 1e-9 for r in (*grace, *none))
    late = [pair[0], SimRequest(16, 5, first + 0.003)]  # past the grace: on its own
    after, _ = simulate_load(promising(), late, tick_s, window_s=0.5, window_grace_s=0.002)
    assert after[0].promise == pytest.approx((first + 0.002, tick_s(StepKey(DECODE, 1, 128, 1))))


def test_a_pace_round_trips_through_json_and_refuses_what_is_not_one():
    from scheduler.simulate import Pace

    pace = Pace({"prefill": 1.2, "decode": 1.4, "mixed": 1.4}, {64: 1.1, 16: 1.3}, 1.6, 0.004, 0.007)
    assert Pace.from_json(pace.to_json()) == pace
    assert Pace.from_json({"prefill": 1.2, "decode": 1.4}) == Pace({"prefill": 1.2, "decode": 1.4})  # an older record
    for bad in ([1.2], {}, {"factors": {}}, {"decode": "x"}, {"decode": float("nan")}, {"decode": -1.0},
                {"decode": float("inf")}, {"factors": {"decode": 1.0}, "tail": 0.0},
                {"factors": {"decode": 1.0}, "shapes": {"a": 1.0}}, {"factors": {"decode": 1.0}, "cold_s": -1e-9},
                {"factors": {"decode": 1.0}, "cold_s": float("nan")},
                *({"factors": {"decode": 1.0}, "lead_s": v} for v in (-1e-9, float("nan"), float("inf"), "x"))):
        with pytest.raises(ValueError):
            Pace.from_json(bad)


def test_a_joiner_waits_while_its_decode_tick_would_break_a_lone_streams_cadence():
    from scheduler.simulate import promise_cadence

    sched = promising()
    lone = Seq(0, 8, 6)
    lone.cadence_s = promise_cadence(sched, lone)
    sched.add(lone)
    joiner = Seq(1, 8, 6)
    joiner.cadence_s = promise_cadence(sched, joiner)
    sched.add(joiner)
    while lone.finish_reason is None:
        plan = sched.schedule()
        assert joiner not in plan.rows and tick_s(plan.key) <= lone.cadence_s or plan.phase == "prefill"
        sched.update(plan)
    assert sched.schedule().rows == (joiner,)  # its turn once the lone stream ends


def test_prompts_are_packed_into_one_prefill_step_and_into_a_mixed_steps_slice():
    sched = busy([(5, 3), (6, 3), (4, 3)], 0, mixed=True)  # chunk 16: all three fit
    plan = sched.schedule()
    assert plan.phase == "prefill" and [s.seq_id for s in plan.rows] == [0, 1, 2]
    assert plan.spans == ((0, 5), (0, 6), (0, 4)) and plan.shape == 16
    assert all(o.seq.decoding and o.seq.generated == 1 for o in sched.update(plan))  # all three start at once
    sched.add(Seq(3, 9, 3))
    mixed = sched.schedule()  # beside the three decoding rows: bucket 4's 4-token slice
    assert mixed.phase == "mixed" and mixed.spans == ((0, 4),) and mixed.key == ("mixed", 4, 128, 4)
    sched = busy([(5, 3), (6, 3)], 1, mixed=True)  # both decode, two slots free
    sched.add(Seq(2, 3, 3))
    sched.add(Seq(3, 9, 3))
    mixed = sched.schedule()  # bucket 2's 8-token slice holds the first prompt and part of the second
    assert [s.seq_id for s in mixed.rows] == [0, 1, 2, 3] and mixed.spans == ((0, 3), (0, 5))
    assert mixed.key == ("mixed", 2, 128, 8)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 60), st.integers(1, 30), st.floats(0, 2.0)), min_size=1, max_size=14),
       st.booleans(), st.booleans(), st.sampled_from([0.0, 0.02, 0.3]), st.sampled_from([1.0, 0.5, 0.0]))
def test_every_token_is_computed_no_later_than_promised_whoever_arrives_later(reqs, mixed, alone_own_step, window_s,
                                                                              join_share):
    """The promise property of the policy: a request's promise (first token, cadence),
    fixed at its admission by running the scheduler forward, holds whatever arrives after
    it, because no tick lasts longer than any running stream's cadence plus the slack it
    banked; an arrival group's promises (an admission window of `window_s`) hold too, and
    so do promises in company below the longest tick (`join_share` < 1)."""
    from scheduler.simulate import SimRequest, simulate_load

    requests = [SimRequest(p, m, a) for p, m, a in reqs]
    sched = promising(mixed)
    sched.alone_own_step = alone_own_step
    sched.join_share = join_share
    results, _ = simulate_load(sched, requests, tick_s, window_s=window_s)
    for r in results:
        if r.status == "OK":
            assert r.late_s <= 1e-9, (r.index, r.late_s)
            assert r.promise is not None and abs(r.ttft_s - r.promise[0]) <= 1e-9
            if r.promise[1]:
                assert all(abs(g - r.promise[1]) <= 1e-9 for g in r.itl_s)  # delivered on the cadence


def test_a_cadence_rounded_on_its_way_through_a_promise_still_admits_its_longest_tick():
    """The engine's cadence is (e2e - TTFT) / (max_tokens - 1) of the promise (shifted by the
    time the request waited): the longest tick give or take a rounding, which must not
    refuse that tick (it did: waves at concurrency 8, first tokens up to 1.3 s late)."""
    import math

    from scheduler.simulate import promise_cadence

    sched = promising(alone_own_step=False)
    sched.join_share = 1.0
    cadence = promise_cadence(sched, Seq(0, 8, 32))
    assert cadence == tick_s(StepKey("mixed", 4, 128, 4))  # the longest tick: bucket 4's mixed step
    rounded = math.nextafter(cadence, 0)  # one rounding below it
    running = [Seq(i, 8, 32, cadence_s=rounded) for i in range(3)]
    for s in running:
        sched.add(s)
    while not all(s.decoding for s in running):
        sched.update(sched.schedule())
    joiner = Seq(3, 8, 32, cadence_s=rounded)
    sched.add(joiner)
    plan = sched.schedule()  # three decoding rows and the joiner's prompt: bucket 4's mixed step
    assert plan.key == ("mixed", 4, 128, 4) and joiner in plan.rows


def test_an_arrival_group_goes_in_by_whole_prefill_steps_and_is_promised_together():
    """Eight simultaneous arrivals to an idle server (a burst, or a closed loop's first
    wave): with an admission window they are one group, their prompts in by prefill steps
    and each wave decoding together; filling every slot, they leave no room for a joiner's
    prompt and are promised the longest decode tick, not the mixed ticks'. Without a
    window, the first is promised its own step and the others wait for its whole stream."""
    from scheduler.simulate import SimRequest, simulate_load

    decode = max(tick_s(StepKey(DECODE, b, 128, 1)) for b in (1, 2, 4))
    assert decode < company()
    burst = [SimRequest(12, 20, 0.0)] * 4 + [SimRequest(12, 20, 0.001)] * 4  # 4 slots: two waves
    grouped, end_grouped = simulate_load(promising(), burst, tick_s, window_s=0.01)
    assert [r.promise[1] for r in grouped] == [decode] * 8
    assert all(r.late_s <= 1e-9 for r in grouped)
    first_wave = [r.ttft_s for r in grouped[:4]]
    # 4 x 12 prompt tokens in chunks of 16: three prefill ticks (each row within 32 keys),
    # then the first decode tick.
    assert first_wave == pytest.approx([3 * tick_s(StepKey("prefill", 1, 32, 16))] * 4)
    pair, _ = simulate_load(promising(), burst[:2], tick_s, window_s=0.01)  # room left: company
    assert [r.promise[1] for r in pair] == pytest.approx([company()] * 2)
    alone, end_alone = simulate_load(promising(), burst, tick_s)
    assert alone[0].promise[1] == tick_s(StepKey(DECODE, 1, 128, 1))
    assert min(r.ttft_s for r in alone[1:]) > 19 * alone[0].promise[1]  # behind the lone stream
    assert end_grouped < end_alone


def test_a_group_member_does_not_decode_while_its_group_still_prefills_nor_does_a_later_prompt_go_in():
    sched = promising()
    members = [Seq(i, 20, 5, group=7) for i in range(3)]
    for seq in members:
        sched.add(seq)
    plan = sched.schedule()  # chunk 16: the first prompt, then the second's first 0 tokens
    assert plan.phase == "prefill" and plan.spans == ((0, 16),)
    sched.update(plan)
    sched.add(Seq(3, 4, 5))  # arrives after the window: not a member
    phases = []
    while any(not s.decoding for s in members):
        plan = sched.schedule()
        assert plan.phase == "prefill" and all(s.group == 7 for s in plan.rows)
        phases.append(plan.spans)
        sched.update(plan)
    assert all(s.generated == 1 for s in members)  # each has its first token, none decoded yet
    plan = sched.schedule()  # all three decode together, the later prompt beside them
    assert plan.phase == "mixed" and plan.rows[:3] == tuple(members) and plan.rows[3].seq_id == 3
