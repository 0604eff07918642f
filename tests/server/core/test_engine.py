"""The engine's pacing: ticks follow the work, promises per request bound them in
deterministic mode; each phase's pace follows its own steps."""

from __future__ import annotations

from dataclasses import replace

import pytest

import scheduler
from scheduler.ticks import StepKey
from server.core.engine import Engine, EngineConfig
from tests.server.helpers import OPTIONS

VIEW = scheduler.compile(scheduler.get_model("tiny"), scheduler.parse_pool("cpu:1"), OPTIONS).view()
EXACT = EngineConfig(deterministic=True, guard_band_frac=0.0, guard_band_s=0.0)


def keys_of(view, phase=None, keys=None):
    return [k for k in view.steps if (phase is None or k.phase == phase) and (keys is None or k.keys == keys)]


@pytest.mark.parametrize("keys", VIEW.key_buckets)
def test_ticks_follow_the_work_and_only_deterministic_ticks_are_bound_by_promises(keys):
    """Every tick lasts its own step (times the pace), in both modes; in deterministic mode
    the promised cadences bound them (scheduler/ticks.py)."""
    paced = Engine(None, VIEW, EXACT)
    steady = keys_of(VIEW, "decode", keys) + keys_of(VIEW, "mixed", keys)
    assert len(steady) == 2 * len(VIEW.buckets)
    assert all(paced.tick_s(k) == VIEW.step_s(k) for k in steady)
    free = Engine(None, VIEW, EngineConfig(deterministic=False, guard_band_frac=0.0, guard_band_s=0.0))
    assert all(free.tick_s(k) == VIEW.step_s(k) for k in steady)
    assert paced.sched.tick_s is not None and free.sched.tick_s is None


def test_a_lone_request_is_promised_its_own_decode_step_and_one_in_company_the_company_cadence():
    from server.core.engine import Request
    from server.runtime.sampling import GREEDY

    engine = Engine(None, VIEW, EXACT)  # the default: `--alone-tpot own`
    company = Engine(None, VIEW, replace(EXACT, alone_own_step=False))  # `--alone-tpot company`
    assert company.predict(20, 11)[1] - company.predict(20, 11)[0] == pytest.approx(
        10 * VIEW.company_cadence_s(128))  # the longest decode tick and half the mixed excess
    ttft, e2e = engine.predict(20, 11)
    keys = VIEW.key_buckets[0]
    assert (e2e - ttft) / 10 == pytest.approx(VIEW.step_s(StepKey("decode", 1, keys, 1)))
    r = Request("a", list(range(20)), 11, GREEDY, frozenset(), lambda *a: None)
    r.promise(ttft, e2e)
    engine.submit(r)
    assert r.seq.cadence_s == pytest.approx(r.predicted_tpot_s)
    ttft2, e2e2 = engine.predict(20, 11)
    assert (e2e2 - ttft2) / 10 == pytest.approx(VIEW.company_cadence_s(keys))
    assert ttft2 > ttft + 9 * r.predicted_tpot_s  # it waits for the lone stream, whose cadence has no room for it


def test_an_arrival_is_in_company_while_an_earlier_stream_is_still_handed_out():
    """The engine has run a stream to its end ahead of its promise: until its last token's
    promised time, an arrival to the empty engine is promised as one in company."""
    from server.core.engine import Request
    from server.runtime.sampling import GREEDY

    engine = Engine(None, VIEW, EXACT)
    keys = VIEW.key_buckets[0]
    own = VIEW.step_s(StepKey("decode", 1, keys, 1))
    steady = VIEW.company_cadence_s(keys)
    r = Request("a", list(range(20)), 11, GREEDY, frozenset(), lambda *a: None)
    r.promise(*engine.predict(20, 11))
    engine.submit(r)
    with engine._lock:  # as if its ticks had run: the engine is empty, its tokens still being handed out
        engine.sched.abort(r.seq)
    assert engine.sched.idle()
    ttft, e2e = engine.predict(20, 11)
    assert (e2e - ttft) / 10 == pytest.approx(steady)
    engine._delivery_ends.clear()  # its last token handed out: the next arrival is alone
    ttft, e2e = engine.predict(20, 11)
    assert (e2e - ttft) / 10 == pytest.approx(own)


def test_a_prefill_tick_is_paced_for_its_own_slice_and_keys():
    paced = Engine(None, VIEW, EXACT)
    for key in keys_of(VIEW, "prefill"):
        assert paced.tick_s(key) == VIEW.step_s(key)
    small, big = (StepKey("prefill", 1, VIEW.key_buckets[0], t) for t in (4, VIEW.prefill_chunk))
    assert paced.tick_s(small) < paced.tick_s(big)


def test_the_cadence_grows_with_the_keys_attended():
    paced = Engine(None, VIEW, EXACT)
    cadence = [paced.tick_s(StepKey("decode", 1, k, 1)) for k in VIEW.key_buckets]
    assert len(cadence) > 1 and cadence == sorted(cadence) and cadence[0] < cadence[-1]


def test_slow_prefill_steps_do_not_slow_the_decode_cadence():
    engine = Engine(None, VIEW, EngineConfig(deterministic=True))
    decode = keys_of(VIEW, "decode")
    before = {k: engine.tick_s(k) for k in decode}
    pacer, prefill = engine.pacers["prefill"], StepKey("prefill", 1, VIEW.key_buckets[0], VIEW.prefill_chunk)
    for _ in range(512):  # prefill steps 1.5x their prediction: its own pace follows
        if pacer.observe(1.5 * VIEW.step_s(prefill), VIEW.step_s(prefill)):
            engine._repace()
    assert pacer.factor == pytest.approx(1.5 * (1 + pacer.margin))
    assert engine.tick_s(prefill) == pytest.approx(VIEW.step_s(prefill) * pacer.factor)  # the guard is in no tick
    assert {k: engine.tick_s(k) for k in decode} == before


def test_a_stream_that_stops_early_is_handed_out_only_until_its_last_token():
    """A stop token ends a stream before its max_tokens: it counts as still being handed
    out until its last real token's promised time, not its promised end."""
    from server.core.engine import Request
    from server.runtime.sampling import GREEDY

    engine = Engine(None, VIEW, EXACT)
    r = Request("a", list(range(20)), 11, GREEDY, frozenset(), lambda *a: None)
    r.promise(*engine.predict(20, 11))
    engine.submit(r)
    assert engine._delivery_ends[r.seq.seq_id] == pytest.approx(r.arrival_s + r.predicted_e2e_s)
    r.out[:] = [5, 6, 7]  # three tokens, then the stop token
    with engine._lock:
        engine._finish(r, "stop")
    assert engine._delivery_ends[r.seq.seq_id] == pytest.approx(r.arrival_s + r.predicted_ttft_s
                                                                + 2 * r.predicted_tpot_s)


class Recording:
    """A LocalExecutor that remembers each step's phase (the real one runs every step)."""

    def __init__(self, executor):
        self.executor, self.phases = executor, []

    def step(self, batch):
        self.phases.append(batch.phase)
        return self.executor.step(batch)


class Timed:
    """An executor whose every step takes `step_s` (a sleep) and samples token 7; it
    remembers when each step ran."""

    def __init__(self, step_s):
        self.step_s, self.spans = step_s, []

    def step(self, batch):
        import time
        from types import SimpleNamespace

        start = time.perf_counter()
        time.sleep(self.step_s)
        self.spans.append((start, time.perf_counter()))
        return SimpleNamespace(token_ids=[7] * len(batch.slot_ids))


def stream_one(engine, max_tokens, ttft_s, tpot_s):
    """Runs one 8-token prompt promised `ttft_s`, then `tpot_s` a token, through `engine`
    until it ends; returns the request and when each of its tokens was handed out."""
    import threading

    from server.core.engine import Finished, Request
    from server.runtime.sampling import GREEDY

    done, made = threading.Event(), []
    r = Request("a", list(range(8)), max_tokens, GREEDY, frozenset(),
                lambda item, tick, t: done.set() if isinstance(item, Finished) else made.append(t))
    r.promise(ttft_s, ttft_s + (max_tokens - 1) * tpot_s)
    engine.submit(r)
    engine.start()
    try:
        assert done.wait(30)
    finally:
        engine.stop()
    return r, made


@pytest.mark.parametrize("align", [True, False])
def test_steps_ahead_of_their_promises_leave_each_promised_token_time_free(align):
    """A stream promised 40 ms a token by 30 ms steps runs ahead; its held tokens go out
    at their promised times, and a step running then takes a core from them. Aligned, no
    step spans a promised time of a token already made once the stream has its lead; back
    to back, most do."""
    executor = Timed(0.030)
    engine = Engine(executor, VIEW, replace(EXACT, admission_window_s=0.0, align_to_deliveries=align))
    r, made = stream_one(engine, 24, 0.05, 0.04)
    assert len(made) == 24
    promised = [r.arrival_s + r.predicted_ttft_s + k * r.predicted_tpot_s for k in range(len(made))]
    # The promised times of tokens already made when they came, 2 ms inside a step (timer slack).
    spanned = [t for k, t in enumerate(promised) if made[k] < t
               and any(a + 0.002 < t < b - 0.002 for a, b in executor.spans)]
    if align:  # only before the stream has two ticks of lead (measured: 1)
        assert len(spanned) <= 2, spanned
    else:  # steps back to back until the 24 tokens were made, 0.72 s of the promised 0.97 (measured: 16)
        assert len(spanned) >= 10, spanned


def test_before_step_runs_after_a_first_token_with_no_lock_held():
    """The core process hooks its outbox's flush here (server/core/process.py): before the
    step after one that made a first token, and before no other."""
    executor = Timed(0.002)
    engine = Engine(executor, VIEW, replace(EXACT, admission_window_s=0.0))
    calls = []

    def before_step():
        assert engine._lock.acquire(blocking=False)  # not held by the engine thread
        engine._lock.release()
        calls.append(len(executor.spans))  # steps run before this one

    engine.before_step = before_step
    stream_one(engine, 6, 0.05, 0.01)
    assert len(executor.spans) >= 6
    assert calls == [1]  # the prefill step made the first token; the decode steps after it, none


def test_the_tick_log_records_every_tick_and_each_request_beside_its_promise(tmp_path):
    """`serve --tick-log`: one JSON line per tick (its shape, measured beside program and
    paced time) and one per request as it ends (its promise, the pace factors it was made
    at, when each token was made), so a run's promises can be checked and replayed."""
    import json

    engine = Engine(Timed(0.010), VIEW, replace(EXACT, admission_window_s=0.0))
    path = tmp_path / "ticks.jsonl"
    engine.open_tick_log(str(path))
    r, made = stream_one(engine, 6, 0.05, 0.03)
    engine.tick_log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    ticks, requests = [x for x in lines if "tick" in x], [x for x in lines if "request" in x]
    assert lines[0]["start"]["perf_counter_s"] == engine._t0 and len(ticks) + len(requests) == len(lines) - 1
    assert [t["tick"] for t in ticks] == list(range(1, engine.ticks + 1)) and len(ticks) >= 6
    assert {t["phase"] for t in ticks} >= {"prefill", "decode"}
    for t in ticks:
        assert t["rows"] == [r.seq.seq_id] and t["sampled"] in (0, 1)
        assert t["measured_ms"] >= 10.0 and t["program_ms"] > 0 and t["paced_ms"] > 0 and t["overrun"] is False
    (logged,) = requests
    assert logged["request"] == r.seq.seq_id and logged["reason"] == "length" and logged["max_tokens"] == 6
    assert logged["ttft_ms"] == pytest.approx(50.0) and logged["tpot_ms"] == pytest.approx(30.0)
    assert set(logged["factors"]) == {"prefill", "decode", "mixed"}
    assert logged["lead_ms"] == pytest.approx(r.lead_s * 1e3, abs=1e-3) and logged["cold"] == r.cold
    assert logged["made_ms"] == [pytest.approx((t - r.arrival_s) * 1e3, abs=1e-3) for t in made]
    assert all(m <= logged["ttft_ms"] + k * logged["tpot_ms"] for k, m in enumerate(logged["made_ms"]))
    # A member of an admission window is promised when the window closes: its factors then.
    from server.core.engine import Request
    from server.runtime.sampling import GREEDY

    windowed = Engine(None, VIEW, EXACT)
    windowed.open_tick_log(str(tmp_path / "windowed.jsonl"))
    member = Request("b", list(range(8)), 4, GREEDY, frozenset(), lambda *a: None)
    with windowed._lock:
        assert windowed.submit_windowed(member) and member.factors == {}
        windowed.close_window()
    assert member.factors == {p: pacer.factor for p, pacer in windowed.pacers.items()}


def test_ticks_just_after_an_idle_spell_are_not_paced_from():
    """This host's first steps after a pause run slower (engine.COLD_IDLE_S): the ticks that
    start within COLD_WINDOW_S of an idle spell count, but no pacer sees them; the ticks
    after them do."""
    import time

    from server.core.engine import COLD_IDLE_S, COLD_WINDOW_S

    step_s = 0.02
    engine = Engine(Timed(step_s), VIEW, replace(EXACT, admission_window_s=0.0))
    time.sleep(COLD_IDLE_S)  # idle since the engine was built
    stream_one(engine, 40, 0.05, 0.03)
    assert engine.ticks == 40  # a prefill tick and 39 decode ticks, all counted
    assert engine.pacers["prefill"]._seen == 0  # the first tick: just after the idle spell
    # Some decode ticks start inside the window, none after it: at most the window's worth
    # of 20 ms steps (fewer when the stream's lead spaces its ticks).
    decode_seen = engine.pacers["decode"]._seen
    assert 39 - COLD_WINDOW_S / step_s - 1 <= decode_seen < 39, decode_seen


def test_an_admission_window_promises_its_group_together_and_its_prompts_go_in_first():
    """Three arrivals in one window: all promised company's cadence, their prompts in by
    prefill steps before any of them decodes, each the tokens it gets alone; a request
    alone in its window is promised its own decode step."""
    import threading

    from server.core.engine import Finished, Request
    from server.runtime.executor import LocalExecutor
    from server.runtime.sampling import GREEDY
    from server.runtime.stage import plan_from_program
    from tests.server.helpers import generate, random_prompt

    executor = Recording(LocalExecutor(plan_from_program(VIEW, seed=0)))
    engine = Engine(executor, VIEW, replace(EXACT, admission_window_s=5.0))
    prompts = [random_prompt(40, seed=i) for i in range(3)]
    done, out = threading.Semaphore(0), {}

    def emit_to(name):
        def emit(item, tick, t):
            if isinstance(item, Finished):
                done.release()
            else:
                out.setdefault(name, []).append(item)
        return emit

    requests = [Request(str(i), p, 6, GREEDY, frozenset(), emit_to(i)) for i, p in enumerate(prompts)]
    with engine._lock:
        assert all(engine.submit_windowed(r) for r in requests)
        assert engine.window_closes_at() is not None
        assert engine.close_window() == requests
    keys = VIEW.key_buckets[0]
    company = VIEW.company_cadence_s(keys)
    assert [r.predicted_tpot_s for r in requests] == pytest.approx([company] * 3)
    assert [r.seq.cadence_s for r in requests] == pytest.approx([company] * 3)
    engine.start()
    try:
        for _ in requests:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    # 3 x 40 prompt tokens in chunks of 32: four prefill steps, then decode steps only.
    assert executor.phases[:4] == ["prefill"] * 4 and set(executor.phases[4:]) == {"decode"}
    alone = LocalExecutor(plan_from_program(VIEW, seed=0))
    assert [out[i] for i in range(3)] == [generate(alone, 0, p, 6).out for p in prompts]

    lone = Engine(None, VIEW, replace(EXACT, admission_window_s=5.0))
    r = Request("lone", prompts[0], 6, GREEDY, frozenset(), lambda *a: None)
    with lone._lock:
        assert lone.submit_windowed(r)
        lone.close_window()
    assert r.predicted_tpot_s == pytest.approx(VIEW.step_s(StepKey("decode", 1, keys, 1)))
    no_window = Engine(None, VIEW, replace(EXACT, admission_window_s=0.0))
    with no_window._lock:
        assert not no_window.submit_windowed(Request("x", prompts[0], 6, GREEDY, frozenset(), lambda *a: None))


def test_prefill_ticks_follow_the_decode_ticks_when_the_host_slows_down():
    """Prefill ticks are few (one in 32 between streams of 32 tokens): until their own
    pacer has its samples, they stretch by the decode pacer's slowdown."""
    from scheduler.ticks import TickPlan

    engine = Engine(None, VIEW, replace(EXACT, guard_band_frac=0.1))
    prefill = next(k for k in keys_of(VIEW, "prefill", 128))
    before = engine.tick_s(prefill)
    plan = TickPlan("decode", 1, ())
    slow = 2 * VIEW.step_s(plan.key)  # the host at half its calibrated speed
    for _ in range(engine.pacers["decode"].min_samples):
        engine._account(plan, engine.sched, {}, slow, False, 0.0)
    # From 1 x (1 + 10%) to the measured 2 x (1 + 10%): twice as slow, and prefill with it.
    assert engine.pacers["decode"].factor == pytest.approx(2 * 1.1)
    assert engine.tick_s(prefill) == pytest.approx(before * 2)


@pytest.mark.parametrize("quantile, decode", [(0.95, 1.5), (0.5, 1.0)])
def test_streams_are_paced_at_their_quantile_and_first_tokens_at_the_tail(quantile, decode):
    """Decode ticks follow the chosen quantile of their steps (`--pace-quantile`: the
    median lets their lead absorb one slow step in ten). Prefill ticks run at their median,
    and a first token, which has no lead before it, is promised one prefill tick at the
    95th percentile whatever is chosen (`tail_s`)."""
    from scheduler.ticks import TickPlan

    engine = Engine(None, VIEW, replace(EXACT, guard_band_frac=0.1, pace_quantile=quantile))
    for phase in ("decode", "prefill"):
        plan = TickPlan(phase, 1, (), shape=VIEW.prefill_chunk if phase == "prefill" else 1)
        program = VIEW.step_s(plan.key)
        for i in range(engine.pacers[phase].min_samples):
            engine._account(plan, engine.sched, {}, program * (1.5 if i % 10 == 0 else 1.0), False, 0.0)
    assert engine.pacers["decode"].factor == pytest.approx(decode * 1.1)
    assert engine.pacers["prefill"].factor == pytest.approx(1.0 * 1.1)
    assert engine.tail_s(plan.key) == pytest.approx((1.5 - 1.0) * 1.1 * program)
    assert engine.tick_s(plan.key) + engine.tail_s(plan.key) == pytest.approx(1.5 * 1.1 * program)


@pytest.mark.parametrize("quantile, prefill", [(0.95, 1.5), (0.5, 1.0)])
def test_first_tokens_are_paced_at_the_prefill_quantile_chosen(quantile, prefill):
    """`--prefill-quantile`: the same for a first token's prefill tail, its own choice
    (decode keeps its); the ticks themselves at the median, or lower if chosen."""
    from scheduler.ticks import TickPlan

    engine = Engine(None, VIEW, replace(EXACT, guard_band_frac=0.1, prefill_quantile=quantile))
    plan = TickPlan("prefill", 1, (), shape=VIEW.prefill_chunk)
    for i in range(engine.pacers["prefill"].min_samples):
        engine._account(plan, engine.sched, {}, VIEW.step_s(plan.key) * (1.5 if i % 10 == 0 else 1.0), False, 0.0)
    assert engine.pacers["prefill"].factor == pytest.approx(1.0 * 1.1)
    assert engine.tail_s(plan.key) == pytest.approx((prefill - 1.0) * 1.1 * VIEW.step_s(plan.key))
    assert engine.pacers["decode"].quantile == 0.95


def test_each_prefill_shape_is_paced_from_its_own_steps_after_four():
    """The served prefill steps err from their program by shape (a lone prompt's step
    beside its request's parsing, a burst's larger ones): from SHAPE_SAMPLES ticks of a
    slice shape on, its ticks run at the median of its own, + the band; the tail tops each
    up to the phase's 95th percentile, + the band."""
    from scheduler.ticks import TickPlan
    from server.core.engine import SHAPE_SAMPLES

    engine = Engine(None, VIEW, replace(EXACT, guard_band_frac=0.1))
    small, chunk = (TickPlan("prefill", 1, (), shape=n) for n in (8, VIEW.prefill_chunk))
    for i in range(16):
        engine._account(small, engine.sched, {}, VIEW.step_s(small.key) * 1.4, False, 0.0)
        engine._account(chunk, engine.sched, {}, VIEW.step_s(chunk.key) * (1.1 if i else 1.6), False, 0.0)
    for plan, ratio in ((small, 1.4), (chunk, 1.1)):
        assert engine.tick_s(plan.key) == pytest.approx(VIEW.step_s(plan.key) * ratio * 1.1)
        # The phase's 95th percentile of these 32 ticks: 1.4 (the 1.6 is one in 32).
        assert engine.tick_s(plan.key) + engine.tail_s(plan.key) == pytest.approx(VIEW.step_s(plan.key) * 1.4 * 1.1)
    fresh = Engine(None, VIEW, replace(EXACT, guard_band_frac=0.1, prefill_scale=2.0))
    for _ in range(SHAPE_SAMPLES - 1):  # too few of its own: the phase's pace still
        fresh._account(chunk, fresh.sched, {}, VIEW.step_s(chunk.key) * 1.0, False, 0.0)
    assert fresh.tick_s(chunk.key) == pytest.approx(VIEW.step_s(chunk.key) * fresh.pacers["prefill"].factor)
    fresh._account(chunk, fresh.sched, {}, VIEW.step_s(chunk.key) * 1.0, False, 0.0)
    assert fresh.tick_s(chunk.key) == pytest.approx(VIEW.step_s(chunk.key) * 1.0 * 1.1)


def test_with_a_tail_on_each_prefill_tick_every_tick_is_paced_at_the_quantile():
    """`--prefill-tails each`: every prefill tick at `prefill_quantile`, no first-token tail."""
    from scheduler.ticks import TickPlan, prompt_keys

    engine = Engine(None, VIEW, replace(EXACT, guard_band_frac=0.1, prefill_tail_once=False))
    plan = TickPlan("prefill", 1, (), keys=prompt_keys(VIEW.prefill_chunk, VIEW.max_context), shape=VIEW.prefill_chunk)
    for i in range(engine.pacers["prefill"].min_samples):
        engine._account(plan, engine.sched, {}, VIEW.step_s(plan.key) * (1.5 if i % 10 == 0 else 1.0), False, 0.0)
    assert engine.pacers["prefill"].factor == pytest.approx(1.5 * 1.1) and engine.tail_s(plan.key) == 0.0
    assert engine.predict(VIEW.prefill_chunk, 4)[0] == pytest.approx(engine.tick_s(plan.key))


def test_a_group_s_prefill_ticks_are_promised_at_their_median_and_one_tail():
    """A lone prompt's first token: one prefill tick, promised at its 95th percentile. An
    arrival group's prompts go in by several prefill ticks back to back: their first tokens
    are promised the ticks at the median and one tick's tail, not a tail on every tick."""
    from server.core.engine import Request
    from server.runtime.sampling import GREEDY
    from scheduler.ticks import TickPlan, prompt_keys

    engine = Engine(None, VIEW, replace(EXACT, guard_band_frac=0.1))
    chunk = TickPlan("prefill", 1, (), keys=prompt_keys(VIEW.prefill_chunk, VIEW.max_context), shape=VIEW.prefill_chunk)
    for i in range(engine.pacers["prefill"].min_samples):
        engine._account(chunk, engine.sched, {}, VIEW.step_s(chunk.key) * (1.5 if i % 10 == 0 else 1.0), False, 0.0)
    tail = engine.tail_s(chunk.key)
    assert tail > 0
    ttft, _ = engine.predict(VIEW.prefill_chunk, 4)  # alone: one chunk-sized prefill tick
    assert ttft == pytest.approx(engine.tick_s(chunk.key) + tail)
    members = [Request(f"m{i}", list(range(VIEW.prefill_chunk)), 4, GREEDY, frozenset(), lambda *a: None)
               for i in range(3)]
    with engine._lock:
        for r in members:
            assert engine.submit_windowed(r)
        engine.close_window()
    # Three whole chunks (a prompt each) before the group decodes; a tail once.
    for r in members:  # promised from its arrival; the window closed a moment later
        waited = r.predicted_ttft_s - 3 * engine.tick_s(chunk.key) - tail
        assert 0 <= waited < 0.05, waited


def test_a_window_closed_by_a_first_token_adds_no_tail_for_the_tick_that_made_it():
    """The engine closes an admission window when a tick makes a member's first token, that
    tick in flight but its step run: it can overrun no more, so its tail is not added (it
    was: a lone prompt's first token, made, was held a tail longer while the next step ran).
    Closed by its bound mid-tick, the tick may still overrun: its tail stays."""
    import time

    from server.core.engine import Request
    from server.runtime.sampling import GREEDY
    from scheduler.ticks import TickPlan, prompt_keys

    def promised(ended: bool) -> tuple[float, float]:
        engine = Engine(None, VIEW, replace(EXACT, guard_band_frac=0.1))
        chunk = TickPlan("prefill", 1, (), keys=prompt_keys(VIEW.prefill_chunk, VIEW.max_context),
                         shape=VIEW.prefill_chunk)
        for i in range(engine.pacers["prefill"].min_samples):  # a tail of ms: two slow ticks in 16
            engine._account(chunk, engine.sched, {}, VIEW.step_s(chunk.key) * (10.0 if i % 10 == 0 else 1.0), False,
                            0.0)
        r = Request("lone", list(range(VIEW.prefill_chunk)), 4, GREEDY, frozenset(), lambda *a: None)
        with engine._lock:
            assert engine.submit_windowed(r)
            plan = engine.sched.schedule()  # its prefill tick, run for exactly its paced time
            engine._in_flight = (plan, time.perf_counter() - engine.tick_s(plan.key))
            engine.close_window(ended=ended)
        return r.predicted_ttft_s - (time.perf_counter() - r.arrival_s), engine.tail_s(plan.key)

    (made, tail), (in_flight, _) = promised(True), promised(False)
    assert tail > 0.005
    assert abs(made) < 1e-3  # the first token is due as it is made (its tick ran its pace)
    assert in_flight - made == pytest.approx(tail, abs=1e-3)


@pytest.mark.parametrize("grace_s, joins", [(0.05, True), (0.0, False)])
def test_an_arrival_that_came_during_the_first_prompt_s_step_joins_its_window(grace_s, joins):
    """A compiled step holds the GIL, so the core's input thread reads an arrival that came
    during the window's first step only after that step: the window waits `window_grace_s`
    before it closes on the first token (Engine._let_arrivals_in), and the arrival joins
    the group (promised with it, its prompt in by the group's prefill steps). Without the
    grace the window closes first and the arrival goes in on its own."""
    import threading

    from server.core.engine import Finished, Request
    from server.runtime.sampling import GREEDY

    step_ended = threading.Event()

    class FirstStepLetsAnArrivalIn(Timed):
        def step(self, batch):
            out = super().step(batch)
            step_ended.set()  # the arrival contends for the lock only once the step is over
            return out

    engine = Engine(FirstStepLetsAnArrivalIn(0.01), VIEW, replace(EXACT, admission_window_s=5.0,
                                                                  window_grace_s=grace_s))
    done = threading.Semaphore(0)

    def emit(item, tick, t):
        if isinstance(item, Finished):
            done.release()

    first, late = (Request(name, list(range(8)), 3, GREEDY, frozenset(), emit) for name in ("first", "late"))
    with engine._lock:
        assert engine.submit_windowed(first)
    joined = []

    def arrive():
        step_ended.wait(10)
        with engine._lock:
            joined.append(engine.submit_windowed(late))
            if not joined[0]:
                late.promise(*engine.predict(8, 3))
                engine.submit(late)

    arrival = threading.Thread(target=arrive)
    arrival.start()
    engine.start()
    try:
        arrival.join(10)
        for _ in range(2):
            assert done.acquire(timeout=30)
    finally:
        engine.stop()
    assert joined == [joins]
    assert (late.seq.group == first.seq.group >= 0) == joins
    assert (late.predicted_tpot_s == pytest.approx(first.predicted_tpot_s)) == joins  # promised together


def test_a_pessimistic_prefill_start_comes_down_after_16_prefill_ticks():
    """Prefill ticks are one in 33 at c=1: a start-up scale measured in a slow minute must
    not hold every first token late until 128 of them have run."""
    from scheduler.ticks import TickPlan

    engine = Engine(None, VIEW, replace(EXACT, guard_band_frac=0.1, prefill_scale=2.5))
    plan = TickPlan("prefill", 1, (), shape=VIEW.prefill_chunk)
    assert engine.pacers["prefill"].factor == pytest.approx(2.5 * 1.1)
    for _ in range(16):
        engine._account(plan, engine.sched, {}, 1.2 * VIEW.step_s(plan.key), False, 0.0)
    assert engine.pacers["prefill"].factor == pytest.approx(1.2 * 1.1)


def test_prefill_steps_slower_served_than_at_start_up_re_pace_it_after_4():
    """A first token's prefill runs beside its request's parsing and the last stream's end
    (measured: 85-90 ms served against 72 at start-up): four such ticks re-pace prefill,
    not sixteen (a c=1 run of 12 requests has 14 prefill ticks with its warm-up)."""
    from scheduler.ticks import TickPlan

    engine = Engine(None, VIEW, replace(EXACT, guard_band_frac=0.1, prefill_scale=1.0))
    plan = TickPlan("prefill", 1, (), shape=VIEW.prefill_chunk)
    for _ in range(3):
        engine._account(plan, engine.sched, {}, 1.25 * VIEW.step_s(plan.key), False, 0.0)
    assert engine.pacers["prefill"].factor == pytest.approx(1.1)
    engine._account(plan, engine.sched, {}, 1.25 * VIEW.step_s(plan.key), False, 0.0)
    assert engine.pacers["prefill"].factor == pytest.approx(1.25 * 1.1)


def test_mixed_ticks_follow_the_decode_pace_down_from_a_pessimistic_start():
    """Mixed ticks start from the decode ticks' start-up measurement and are few at low
    load: when decode's own steps show the start was pessimistic, mixed comes down with it
    (until it has its own samples); prefill, measured apart, follows only slowdowns."""
    from scheduler.ticks import TickPlan

    engine = Engine(None, VIEW, replace(EXACT, guard_band_frac=0.1, time_scale=1.6))
    mixed, prefill = engine.pacers["mixed"].factor, engine.pacers["prefill"].factor
    plan = TickPlan("decode", 1, ())
    for _ in range(engine.pacers["decode"].min_samples):
        engine._account(plan, engine.sched, {}, 1.1 * VIEW.step_s(plan.key), False, 0.0)
    assert engine.pacers["decode"].factor == pytest.approx(1.1 * 1.1)
    assert engine.pacers["mixed"].factor == pytest.approx(mixed * 1.1 / 1.6)
    assert engine.pacers["prefill"].factor == prefill


def test_a_wide_start_up_band_paces_only_the_first_ticks():
    """`serve` measures the band at start (server/core/build.py): the first ticks take it,
    the served steps' own quantile then takes `pace_margin`, not that band."""
    from scheduler.ticks import TickPlan

    engine = Engine(None, VIEW, replace(EXACT, guard_band_frac=0.288, pace_margin=0.1, time_scale=1.0))
    assert engine.pacers["decode"].factor == pytest.approx(1.288)
    plan = TickPlan("decode", 1, ())
    for _ in range(engine.pacers["decode"].min_samples):
        engine._account(plan, engine.sched, {}, 1.05 * VIEW.step_s(plan.key), False, 0.0)
    assert engine.pacers["decode"].factor == pytest.approx(1.05 * 1.1)
    same = Engine(None, VIEW, replace(EXACT, guard_band_frac=0.288, time_scale=1.0))  # no pace_margin: the band
    for _ in range(same.pacers["decode"].min_samples):
        same._account(plan, same.sched, {}, 1.05 * VIEW.step_s(plan.key), False, 0.0)
    assert same.pacers["decode"].factor == pytest.approx(1.05 * 1.288)


def test_the_engine_tells_its_whole_pace_as_it_moves_and_times_ticks_from_it():
    """What `lockstep simulate` reads (serve records it): the engine's `Pace`, the prefill
    shapes paced apart, the tail's factor and the cold allowance, told to the metrics when
    it moves; its tables are the engine's own tick and tail times."""
    from scheduler.simulate import Pace
    from scheduler.ticks import TickPlan
    from server.core.engine import SHAPE_SAMPLES
    from server.frontend.metrics import Metrics

    metrics = Metrics("tiny")
    engine = Engine(None, VIEW, replace(EXACT, guard_band_frac=0.1), metrics=metrics)
    assert metrics.pace_state == {}  # the start: the factors go with the ready message
    chunk = TickPlan("prefill", 1, (), shape=VIEW.prefill_chunk)
    for i in range(16):
        engine._account(chunk, engine.sched, {}, VIEW.step_s(chunk.key) * (1.1 if i else 1.6), False, 0.0)
    for _ in range(3):  # COLD_MIN spells: one cold tick each
        engine._account(TickPlan("decode", 1, ()), engine.sched, {}, 0.05, False, 0.0, cold=True)
        engine._end_cold_spell()
    pace = Pace.from_json(metrics.pace_state)
    assert pace == engine.pace() and pace.shapes.keys() == {VIEW.prefill_chunk} and pace.tail > pace.shapes[
        VIEW.prefill_chunk] and pace.cold_s > 0
    ticks, tails = pace.tables(VIEW)
    assert ticks == {k: engine.tick_s(k) for k in VIEW.steps} and tails == {k: engine.tail_s(k) for k in tails}
    assert SHAPE_SAMPLES <= 16 and tails[chunk.key] > 0


def test_a_promise_made_cold_adds_the_median_recent_cold_spell():
    """Ticks just after an idle spell run slow and are not paced from (COLD_IDLE_S); a
    request promised while the engine is cold gets the median of how far recent spells' ticks
    ran past their pace (from COLD_MIN spells on), on its first token and so on every token;
    warm, nothing."""
    import time

    from scheduler.ticks import TickPlan

    engine = Engine(None, VIEW, replace(EXACT, admission_window_s=0.0))
    plan = TickPlan("decode", 1, ())
    paced = engine.tick_s(plan.key)
    with engine._lock:
        assert engine.cold_s(time.perf_counter() + 1.0) == 0.0  # no spell measured yet
    for extra in (0.010, 0.020):  # a spell: two cold ticks 10 and 20 ms past their pace
        engine._account(plan, engine.sched, {}, paced + extra, False, 0.0, cold=True)
    engine._account(plan, engine.sched, {}, paced, False, 0.0)  # a warm tick ends it
    engine._account(plan, engine.sched, {}, paced + 0.005, False, 0.0, cold=True)  # a milder one
    engine._end_cold_spell()
    with engine._lock:  # two spells: fewer than COLD_MIN, no allowance yet
        engine._last_tick_end = time.perf_counter() - 1.0
        assert engine.cold_s(time.perf_counter()) == 0.0
    engine._cold_spells.append(0.040)  # and a worse one: the median of 5, 30 and 40 ms is 30
    now = time.perf_counter()
    engine._last_tick_end = now - 1.0  # idle for a second
    with engine._lock:
        assert engine.cold_s(now) == pytest.approx(0.030)
    cold_ttft, cold_e2e = engine.predict(8, 4)
    engine._last_tick_end = time.perf_counter()  # it just ticked: warm
    with engine._lock:
        assert engine.cold_s(time.perf_counter()) == 0.0
    ttft, e2e = engine.predict(8, 4)
    assert cold_ttft - ttft == pytest.approx(0.030, abs=1e-6) and cold_e2e - e2e == pytest.approx(0.030, abs=1e-6)
    fast = Engine(None, VIEW, replace(EXACT, deterministic=False))  # throughput mode promises no cold start
    fast._cold_spells.extend([0.030] * 3)
    with fast._lock:
        assert fast.cold_s(time.perf_counter() + 1.0) == 0.0


def test_a_burst_finds_every_slot_and_the_queue_before_it_is_refused():
    """Submitted faster than the ticks take them in, max_slots + max_queue requests are
    queued before one is refused: the free slots are the first waiting's."""
    from server.core.engine import Request
    from server.runtime.sampling import GREEDY

    engine = Engine(None, VIEW, replace(EXACT, max_queue=3))
    slots = engine.sched.max_slots
    for i in range(slots + 3):
        assert engine.queue_full() is None
        r = Request(f"r{i}", list(range(8)), 4, GREEDY, frozenset(), lambda *a: None)
        r.promise(*engine.predict(8, 4))
        engine.submit(r)
    assert "queue full (3 waiting)" in engine.queue_full()
    with pytest.raises(OverflowError, match="queue full"):
        engine.submit(Request("over", list(range(8)), 4, GREEDY, frozenset(), lambda *a: None))


def test_every_promise_adds_the_lead_the_last_streams_first_tokens_needed():
    """A stream's first tokens have no lead (START_TOKENS): each stream's worst lateness over
    them, against its promise less the lead it got, is measured; from START_MIN streams on,
    every promise (`predict`, and so every token's time) adds their `start_lead_quantile`,
    told to the metrics with the pace. Early streams count as 0, streams promised cold not
    at all; off (quantile 0) or in throughput mode, no lead."""
    from scheduler.simulate import Pace
    from server.core.engine import START_MIN, START_TOKENS, Request
    from server.frontend.metrics import Metrics
    from server.runtime.sampling import GREEDY

    def stream(engine, late_s, cold=False):
        """A stream promised now, its first START_TOKENS tokens made `late_s` past their times
        (the worst of them; the others on time)."""
        r = Request("s", [1, 2, 3], START_TOKENS, GREEDY, frozenset(), lambda *a: None)
        ttft, e2e = engine.predict(3, START_TOKENS)
        r.promise(ttft, e2e)
        r.lead_s, r.cold = engine.start_lead_s(), cold
        for k in range(START_TOKENS):
            engine._emit(r, 7, r.due_s(k) + (late_s if k == 1 else 0.0) - r.lead_s)

    metrics = Metrics("tiny")
    engine = Engine(None, VIEW, replace(EXACT, admission_window_s=0.0), metrics=metrics)
    ttft0, e2e0 = engine.predict(3, START_TOKENS)
    stream(engine, -0.050)  # early: counts as 0
    stream(engine, 0.500, cold=True)  # promised cold: the cold allowance's to cover, not counted
    for i in range(1, START_MIN - 2):
        stream(engine, i * 1e-3)
    stream(engine, 0.020)
    assert engine.start_lead_s() == 0.0  # fewer than START_MIN streams measured
    stream(engine, 0.020)  # the eighth: of 0, 1..5, 20 and 20 ms, the lower 95th percentile is 20
    assert START_MIN == 8 and engine.start_lead_s() == pytest.approx(0.020, abs=1e-6)
    worst = Engine(None, VIEW, replace(EXACT, admission_window_s=0.0))
    for i in range(START_MIN):  # one stream far worse than the others is not the lead
        stream(worst, 0.600 if i == 3 else i * 1e-3)
    assert worst.start_lead_s() == pytest.approx(0.007, abs=1e-6)
    ttft, e2e = engine.predict(3, START_TOKENS)
    assert ttft - ttft0 == pytest.approx(0.020, abs=1e-6) and e2e - e2e0 == pytest.approx(0.020, abs=1e-6)
    assert Pace.from_json(metrics.pace_state).lead_s == pytest.approx(0.020, abs=1e-6) == engine.pace().lead_s
    stream(engine, 0.020)  # measured against its promise less its lead: late by 20 ms again, not by 0
    assert engine.start_lead_s() == pytest.approx(0.020, abs=1e-6)
    for config in (replace(EXACT, start_lead_quantile=0.0), replace(EXACT, deterministic=False)):
        other = Engine(None, VIEW, replace(config, admission_window_s=0.0))
        for _ in range(START_MIN + 1):
            stream(other, 0.020)
        assert other.start_lead_s() == 0.0
