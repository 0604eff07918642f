"""Pipelined stages' turn clock (scheduler/pipeline.py): with one group it is the
unpipelined engine's schedule; with P groups each ticks every max(tick, P x issue), the
rate the compiler predicts; a request goes to the group whose first token comes soonest."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import CompileOptions, compile, get_model
from scheduler.pipeline import Group, Pipeline, cadence_gap, group_slots, pipeline_chunk, pipelined_tables
from scheduler.simulate import predict_arrival
from scheduler.ticks import Seq, StepKey, TickScheduler
from tests.scheduler.conftest import SMALL_LPU_POOL
from tests.scheduler.test_simulate import busy, tick_s


def issue_s(key):
    return 0.4 * tick_s(key)


LONGEST = 0.4 * 0.050 * 1.25  # the longest issue_s: a prefill tick at 512 keys


def drive(pipe: Pipeline, tick, issue, turns: int, longest: float = LONGEST,
          arrivals: dict | None = None) -> dict[int, list[float]]:
    """Runs `turns` turns as the engine does, with no real steps: seq_id -> token times.
    `arrivals`: turn index -> (group, Seq) queued just before that turn."""
    tokens: dict[int, list[float]] = {}
    for n in range(turns):
        if arrivals and n in arrivals:
            group, seq = arrivals[n]
            pipe.groups[group].sched.add(seq)
        turn = pipe.next_turn(longest)
        if turn is None:
            break
        at, g = turn
        group = pipe.groups[g]
        if group.in_flight is not None:
            for out in group.sched.update(group.in_flight):
                if out.seq.generated and out.token is None and out.seq.decoding:
                    tokens.setdefault(out.seq.seq_id, []).append(at)
        pipe.issue(g, at, tick, issue)
    return tokens


def test_groups_own_interleaved_slots():
    assert group_slots(8, 2) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert group_slots(5, 3) == [[0, 3], [1, 4], [2]]
    with pytest.raises(ValueError, match="1..max_slots=4"):
        group_slots(4, 5)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.integers(1, 200), st.integers(1, 160)), max_size=10),
       st.integers(0, 40), st.integers(1, 300), st.integers(1, 60), st.booleans(), st.floats(0, 0.999))
def test_one_group_is_the_unpipelined_schedule(arrivals, warm, prompt_len, max_tokens, mixed, into):
    """P = 1: the same TTFT and end-to-end as `predict_arrival`, from a tick in flight."""
    sched = busy(arrivals, warm, mixed)
    plan = sched.schedule()
    if plan is None:
        expected = predict_arrival(sched, prompt_len, max_tokens, tick_s)
        pipe = Pipeline([Group(sched)])
    else:
        elapsed = into * tick_s(plan.key)
        expected = predict_arrival(sched, prompt_len, max_tokens, tick_s, in_flight=plan, elapsed_s=elapsed)
        pipe = Pipeline([Group(sched, tick_s(plan.key), plan)], issue_s(plan.key)).clone(now=elapsed)
    before = (len(sched.waiting), len(sched.running), [s.generated for s in sched.running])
    ttft, e2e, group = pipe.predict(prompt_len, max_tokens, tick_s, issue_s, LONGEST)
    assert group == 0
    assert ttft == pytest.approx(expected[0], rel=1e-9)
    assert e2e == pytest.approx(expected[1], rel=1e-9)
    assert (len(sched.waiting), len(sched.running), [s.generated for s in sched.running]) == before  # untouched


def full_groups(groups: int, per_group: int, prompt_len: int, max_tokens: int, slices=None) -> Pipeline:
    pipe = Pipeline([Group(TickScheduler(per_group, 512, 16, (1, 2, 4), 64, slices or {}, free_slots=slots))
                     for slots in group_slots(groups * per_group, groups)])
    for i in range(groups * per_group):
        pipe.groups[i % groups].sched.add(Seq(i, prompt_len, max_tokens))
    return pipe


@pytest.mark.parametrize("issue_frac, interval", [(0.3, 0.013), (0.8, 2 * 0.8 * 0.013)])
def test_each_group_ticks_every_max_of_tick_and_p_issues(issue_frac, interval):
    """Two groups of 4 decoding streams: latency-bound (2 x issue < tick) every tick;
    stage-bound, every 2 x issue. Every stream gets one token per interval."""
    pipe = full_groups(2, 4, prompt_len=4, max_tokens=60)
    tokens = drive(pipe, tick_s, lambda key: issue_frac * tick_s(key), turns=80)
    assert len(tokens) == 8
    for times in tokens.values():
        gaps = [b - a for a, b in zip(times[10:], times[11:30])]  # steady state, 128 keys
        assert gaps == pytest.approx([interval] * len(gaps), rel=1e-9)


def test_the_runtime_clock_realizes_the_compilers_pipelined_tokens_per_s():
    """`tiny` over 2 stages, 8 slots: two groups of 4 decoding streams, paced by the
    program's own ticks and issues (factor 1, no guard), stream the compiler's pipelined
    tokens/s for batch 4 (here stage-bound: below 2x its unpipelined tokens/s)."""
    program = compile(get_model("tiny"), SMALL_LPU_POOL,
                      CompileOptions(max_slots=8, max_context=64, prompt_len=40, prefill_chunk=16))
    view = program.view()
    assert len(view.stages) == 2 and view.key_buckets == (64,)
    factors = {"prefill": 1.0, "decode": 1.0, "mixed": 1.0}
    ticks, issues = pipelined_tables(view, factors, 0.0)
    assert all(ticks[k] == view.cadence_s(k.keys, factors) for k in view.steps if k.phase != "prefill")
    pipe = Pipeline.for_program(view, 2)
    for i in range(8):
        pipe.groups[i % 2].sched.add(Seq(i, 4, 60))
    tokens = drive(pipe, ticks.__getitem__, issues.__getitem__, turns=400, longest=cadence_gap(issues))
    assert len(tokens) == 8
    start, end = max(t[10] for t in tokens.values()), min(t[40] for t in tokens.values())
    counted = sum(start < x <= end for t in tokens.values() for x in t)
    predicted = next(x for x in program.data["predictions"] if x["batch"] == 4)
    assert predicted["pipelined_tokens_per_s"] < 2 * predicted["tokens_per_s"]  # stage-bound
    assert counted / (end - start) == pytest.approx(predicted["pipelined_tokens_per_s"], rel=0.02)


def test_a_request_goes_to_the_group_whose_first_token_comes_first():
    pipe = full_groups(2, 2, prompt_len=4, max_tokens=50)
    pipe.groups[0].sched.add(Seq(10, 200, 5))  # group 0 has a long prompt queued
    ttft, e2e, group = pipe.clone().predict(8, 4, tick_s, issue_s, LONGEST)
    assert group == 1
    ttft0 = pipe.clone()._run(0, 8, 4, tick_s, issue_s, LONGEST, first_token_only=True)[0]
    assert ttft < ttft0 and e2e > ttft
    # Ties go to the lower group.
    idle = Pipeline([Group(TickScheduler(2, 512, 16, (1, 2, 4), 64, {}, free_slots=slots)) for slots in group_slots(4, 2)])
    assert idle.predict(8, 4, tick_s, issue_s, LONGEST)[2] == 0


def uniform_tick(key) -> float:
    """One period for every step at a key bucket, as `pipelined_tables` gives (a prefill
    step's keys, from MIN_PROMPT_KEYS, tick as the smallest bucket's, 128)."""
    return 0.012 * (1 + (max(key.keys, 128).bit_length() - 8) / 8)


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(st.integers(0, 40), st.integers(1, 60), st.integers(1, 40), st.sampled_from([0.2, 0.3, 0.5]),
       st.integers(1, 4), st.sampled_from([2, 3]), st.integers(0, 12))
def test_a_group_that_starts_does_not_move_the_other_groups_tokens(at_turn, prompt_len, max_tokens, frac, streams,
                                                                   groups, late):
    """The promise holds under load: the other groups' token times are the same whether
    or not group 1 starts a request at any turn, at any pace (rows within one key
    bucket). With 3 groups the last one starts `late` turns in, off the first's beat."""
    def issue(key):
        return frac * uniform_tick(key)

    gap = issue(StepKey("decode", 4, 128, 1))
    before = {late: (2, lambda: Seq(50, 12, 30))} if groups == 3 else {}  # fresh seqs for each run
    after = {at_turn + (at_turn in before): (1, lambda: Seq(99, prompt_len, max_tokens))}
    alone = drive(_two(streams, groups), uniform_tick, issue, 300, gap, {n: (g, f()) for n, (g, f) in before.items()})
    joined = drive(_two(streams, groups), uniform_tick, issue, 300, gap,
                   {n: (g, f()) for n, (g, f) in (before | after).items()})
    if groups == 3 and late >= at_turn:
        del alone[50]  # it came after the newcomer: its promise counted it
    assert 99 in joined and alone.keys() <= joined.keys() - {99}
    for seq_id, times in alone.items():
        assert joined[seq_id] == pytest.approx(times, abs=1e-12)


def _two(streams: int, groups: int = 2) -> Pipeline:
    """Groups of 4 slots (mixed steps on); group 0 has `streams` requests, the others none."""
    pipe = Pipeline([Group(TickScheduler(4, 512, 16, (1, 2, 4), 64, {1: 8, 2: 8, 4: 4}, free_slots=slots))
                     for slots in group_slots(4 * groups, groups)])
    for i in range(streams):
        pipe.groups[0].sched.add(Seq(i, 20 + 7 * i, 40))
    return pipe


def test_a_pipelined_prompt_goes_in_slices_that_fit_the_cadence():
    program = compile(get_model("tiny"), SMALL_LPU_POOL,
                      CompileOptions(max_slots=8, max_context=64, prompt_len=40, prefill_chunk=16))
    view = program.view()
    chunk = pipeline_chunk(view)
    assert 4 <= chunk <= view.prefill_chunk
    for key in view.steps:
        if key.phase == "prefill" and key.tokens == chunk:
            keys = view.holding_bucket(key.keys)
            assert view.steps[key] <= view.cadence_s(keys) and view.bottlenecks[key] <= view.issue_s(keys)
    assert all(g.sched.chunk == chunk for g in Pipeline.for_program(view, 2).groups)
