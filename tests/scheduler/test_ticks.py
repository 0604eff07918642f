"""The tick scheduler on hand-built arrivals and results (no model, no clock): who runs on
each tick, one token per decode tick for every decoding stream, slots and queues that
balance after aborts in every state, the same ticks for the same arrivals."""

from __future__ import annotations

import random

import pytest

from scheduler.ticks import DECODE, MIXED, PREFILL, Seq, TickScheduler

SLICES = {1: 4, 2: 4, 4: 2}  # decode bucket -> prompt tokens a mixed step carries


def make(max_slots=4, chunk=8, max_queue=16, max_context=64, slices=None) -> TickScheduler:
    return TickScheduler(max_slots=max_slots, max_context=max_context, chunk=chunk, buckets=(1, 2, 4),
                         max_queue=max_queue, slices=slices or {})


def step(sched: TickScheduler, token: int = 7):
    """One tick with every row sampling `token`; returns (plan, outputs)."""
    plan = sched.schedule()
    return plan, sched.update(plan, {s.seq_id: token for s in plan.rows})


def length(plan) -> int:
    """Prompt tokens the plan carries."""
    return sum(n for _, n in plan.spans)


def test_a_prompt_goes_in_by_chunks_then_decodes_to_max_tokens():
    sched = make()
    seq = Seq(0, prompt_len=20, max_tokens=3)
    sched.add(seq)
    phases = []
    while not sched.idle():
        plan, outs = step(sched)
        phases.append((plan.phase, plan.spans, [o.token for o in outs]))
    assert phases == [(PREFILL, ((0, 8),), [None]), (PREFILL, ((8, 8),), [None]), (PREFILL, ((16, 4),), [7]),
                      (DECODE, (), [7]), (DECODE, (), [7])]
    assert seq.finish_reason == "length" and seq.generated == 3 and sched.free_slots == [0, 1, 2, 3]


def test_prefill_and_decode_alternate_and_every_decoding_stream_gets_one_token_per_decode_tick():
    sched = make()
    for i in range(4):
        sched.add(Seq(i, prompt_len=8 * (i + 1), max_tokens=30))
    before = {}
    for _ in range(40):
        counts = {s.seq_id: s.generated for s in sched.running}
        decoding = {s.seq_id for s in sched.running if s.decoding}
        plan, _ = step(sched)
        if plan.phase == DECODE:
            assert {s.seq_id for s in plan.rows} == decoding
            assert all(s.generated == counts[s.seq_id] + 1 for s in plan.rows)
            assert plan.bucket == min(b for b in (1, 2, 4) if b >= len(plan.rows))
        elif decoding:  # a prefill tick while streams decode: the next tick is theirs
            assert before.get("phase") != PREFILL
        before["phase"] = plan.phase


def test_admission_is_fifo_into_the_lowest_free_slot():
    sched = make(max_slots=2)
    seqs = [Seq(i, 4, 2) for i in range(4)]
    for s in seqs:
        sched.add(s)
    sched.schedule()
    assert [(s.seq_id, s.slot) for s in sched.running] == [(0, 0), (1, 1)]
    sched.abort(seqs[0])
    sched.schedule()
    assert [(s.seq_id, s.slot) for s in sched.running] == [(1, 1), (2, 0)]


def test_a_full_queue_refuses_past_max_queue_beyond_the_free_slots():
    sched = make(max_slots=4, max_queue=2)
    for i in range(6):  # 4 for the free slots, 2 queued beyond them
        sched.add(Seq(i, 4, 2))
    with pytest.raises(OverflowError, match="queue full"):
        sched.add(Seq(6, 4, 2))
    sched.schedule()  # the slots taken: max_queue wait, and no more
    assert len(sched.running) == 4 and len(sched.waiting) == 2
    with pytest.raises(OverflowError, match="queue full"):
        sched.add(Seq(6, 4, 2))


def test_a_stop_token_ends_the_sequence_and_frees_its_slot():
    sched = make()
    seq = Seq(0, 4, 10, stop_ids=frozenset({5}))
    sched.add(seq)
    step(sched, token=1)  # prefill: first token 1
    _, outs = step(sched, token=5)
    assert outs[0].finish_reason == "stop" and sched.idle() and len(sched.free_slots) == 4


def test_the_context_bounds_generation():
    sched = make(max_context=10)
    seq = Seq(0, 8, 100)
    sched.add(seq)
    while not sched.idle():
        step(sched)
    assert seq.generated == 2 and seq.finish_reason == "length"


def test_a_row_missing_from_the_results_is_left_for_the_caller_to_abort():
    sched = make()
    a, b = Seq(0, 4, 5), Seq(1, 4, 5)
    sched.add(a)
    sched.add(b)
    while not (a.decoding and b.decoding):
        step(sched)
    plan = sched.schedule()
    assert plan.phase == DECODE and plan.rows == (a, b)
    b_before = b.generated
    outs = sched.update(plan, {a.seq_id: 3})
    assert [o.seq for o in outs] == [a] and b.generated == b_before
    assert sched.abort(b) and b.finish_reason == "aborted" and not sched.abort(b)


@pytest.mark.parametrize("seed", range(20))
def test_slots_and_queues_balance_after_aborts_at_every_phase(seed):
    rng = random.Random(seed)
    sched = make(max_slots=4, max_queue=8)
    live, next_id = [], 0
    for _ in range(300):
        if rng.random() < 0.3 and len(sched.waiting) < 8:
            seq = Seq(next_id, rng.randint(1, 30), rng.randint(1, 12))
            sched.add(seq)
            live.append(seq)
            next_id += 1
        if live and rng.random() < 0.15:
            sched.abort(rng.choice(live))
        if not sched.idle():
            step(sched, token=rng.randint(0, 9))
        live = [s for s in live if s.finish_reason is None]
        held = sorted([s.slot for s in sched.running] + sched.free_slots)
        assert held == [0, 1, 2, 3]
        assert all(s.finish_reason is None for s in list(sched.waiting) + sched.running)
        assert len(sched.running) <= 4 and len(sched.waiting) <= 8
    for s in live:
        sched.abort(s)
    assert sched.idle() and sched.free_slots == [0, 1, 2, 3]


def test_the_same_arrivals_give_the_same_ticks():
    def run() -> list[tuple]:
        sched = make()
        rng = random.Random(3)
        ticks = []
        for i in range(30):
            sched.add(Seq(i, rng.randint(1, 40), rng.randint(1, 20))) if len(sched.waiting) < 16 else None
            if not sched.idle():
                plan, _ = step(sched)
                ticks.append((plan.phase, plan.bucket, tuple((s.seq_id, s.slot) for s in plan.rows), plan.spans))
        return ticks

    assert run() == run()


def test_with_mixed_steps_every_decoding_stream_gets_a_token_on_every_tick_while_prompts_go_in():
    sched = make(slices=SLICES)
    rng = random.Random(1)
    for i in range(12):
        sched.add(Seq(i, rng.randint(1, 30), rng.randint(1, 15)))
    phases = set()
    while not sched.idle():
        before = {s.seq_id: s.generated for s in sched.running if s.decoding}
        plan, outs = step(sched)
        phases.add(plan.phase)
        decoding_rows = [s for i, s in enumerate(plan.rows) if not plan.is_slice(i)]
        if plan.phase == PREFILL:  # a pure prefill only when nothing decodes
            assert not before
        else:  # every decoding stream, each one token further
            assert {s.seq_id for s in decoding_rows} == set(before)
            assert all(s.generated == before[s.seq_id] + 1 for s in decoding_rows)
        if plan.phase == MIXED:  # never past its compiled shape
            assert len(decoding_rows) <= plan.bucket and 1 <= length(plan) <= SLICES[plan.bucket]
    assert phases == {PREFILL, DECODE, MIXED}


def test_slices_must_cover_every_bucket():
    with pytest.raises(ValueError, match="every bucket"):
        make(slices={1: 4, 2: 4})


def test_a_plan_names_the_key_bucket_of_its_longest_row_and_its_static_slice_shape():
    sched = TickScheduler(max_slots=4, max_context=1024, chunk=64, buckets=(1, 2, 4), slices={1: 16, 2: 16, 4: 8})
    long, short = Seq(0, prompt_len=200, max_tokens=60), Seq(1, prompt_len=21, max_tokens=5)
    sched.add(long)
    plans = []
    while not long.decoding:
        plans.append(step(sched)[0])
    # 200 tokens: three 64-token chunks (ending at 64, 128, 192 keys), then 8 in an 8-token
    # shape; a prefill step's keys start at MIN_PROMPT_KEYS (32), not MIN_KEY_BUCKET.
    assert [(p.phase, length(p), p.shape, p.keys) for p in plans] == [
        (PREFILL, 64, 64, 64), (PREFILL, 64, 64, 128), (PREFILL, 64, 64, 256), (PREFILL, 8, 8, 256)]
    sched.add(short)
    mixed = step(sched)[0]  # the long row decodes at 201 keys; the slice ends at 16
    assert (mixed.phase, length(mixed), mixed.shape, mixed.keys) == (MIXED, 16, 16, 256)
    assert mixed.key == (MIXED, 1, 256, 16)
    while not short.decoding:
        last = step(sched)[0]
    assert (length(last), last.shape) == (5, 16)  # the bucket's slice shape, whatever is left of the prompt
    decode = step(sched)[0]
    assert decode.key == (DECODE, 2, 256, 1)
    while long.finish_reason is None:  # 200 + 60 tokens: 256 keys, then 512 past its 256th token
        context = long.prompt_len + long.generated
        assert step(sched)[0].keys == (512 if context > 256 else 256)


def test_slice_shapes_and_key_buckets():
    from scheduler.ticks import key_bucket, slice_shape, slice_sizes

    assert slice_sizes(64) == [4, 8, 12, 16, 24, 32, 48, 64]
    assert slice_sizes(100) == [4, 8, 12, 16, 24, 32, 48, 64, 96, 100] and slice_sizes(2) == [2]
    assert [slice_shape(n, 64) for n in (1, 4, 5, 9, 33, 35, 49, 64)] == [4, 4, 8, 12, 48, 48, 64, 64]
    assert [key_bucket(c, 1024) for c in (1, 128, 129, 600, 1024)] == [128, 128, 256, 1024, 1024]


def test_a_decode_tick_that_keeps_a_prompt_out_is_keyed_by_its_own_rows():
    """A prefill tick that does not fit a running stream's cadence leaves a decode tick of
    the decoding rows, at their key bucket, not at the bucket of the prompt chunk kept out
    (a later chunk of a long prompt, 512 keys: the decode tick was timed at 512)."""
    sched = TickScheduler(max_slots=4, max_context=1024, chunk=64, buckets=(1, 2, 4), slices={},
                          tick_s=lambda key: 0.001 if key.phase == DECODE else 1.0)
    short = Seq(0, prompt_len=10, max_tokens=50)
    sched.add(short)
    while not short.decoding:
        step(sched)
    step(sched)  # a decode tick: a prefill tick may come next
    short.cadence_s = 0.01  # no room for a 1 s prefill tick
    long = Seq(1, prompt_len=400, max_tokens=5)
    sched.add(long)
    long.prefilled = 256  # its next chunk ends at 320: 512 keys
    plan = sched.schedule()
    assert plan.phase == DECODE and plan.rows == (short,) and plan.keys == 128


def test_eight_short_prompts_go_in_by_one_prefill_step():
    """PREFILL_ROWS: a burst of eight 25-token prompts (200 tokens) is one prefill step of a
    256-token chunk, not four of four prompts each; a ninth waits for a slot."""
    sched = TickScheduler(max_slots=8, max_context=1024, chunk=256, buckets=(1, 2, 4, 8), max_queue=16)
    for i in range(9):
        sched.add(Seq(i, 25, 4))
    plan = sched.schedule()
    assert plan.phase == "prefill" and [s.seq_id for s in plan.rows] == list(range(8))
    assert plan.spans == ((0, 25),) * 8 and plan.key == ("prefill", 1, 32, 256)
    assert all(o.seq.generated == 1 for o in sched.update(plan))
    assert sched.schedule().phase == "decode"  # all eight decode together


def test_a_prompt_goes_in_beside_a_stream_once_its_banked_slack_covers_the_mixed_tick():
    """join_share < 1 (docs/architecture.md, "Joins paid from slack"): a stream promised a
    cadence below the mixed tick banks what each shorter decode tick leaves of it, and a
    prompt slice goes in beside it only once that covers the mixed tick's excess; the
    mixed tick spends it, so the stream's gaps never sum past its cadence."""
    times = {DECODE: 0.010, MIXED: 0.020}
    sched = TickScheduler(max_slots=2, max_context=1024, chunk=64, buckets=(1, 2), slices={1: 4, 2: 4},
                          tick_s=lambda key: times[key.phase] + 0.001 * (key.batch - 1), join_share=0.5)
    running = Seq(0, prompt_len=4, max_tokens=50, cadence_s=0.013)  # the b2 decode tick + 2 ms
    sched.add(running)
    while not running.generated:
        step(sched)
    joiner = Seq(1, prompt_len=8, max_tokens=5)
    sched.add(joiner)
    phases, ends, t = [], [], 0.0
    while not joiner.decoding:
        plan = sched.schedule()
        phases.append(plan.phase)
        t += sched.tick_s(plan.key)
        sched.update(plan)
        ends.append(t)
        assert running.slack_s >= -1e-12  # never past its promise
    # b1 decode ticks bank 3 ms each, a b1 mixed tick (20 ms) needs 7: after 3 of them,
    # leaving 2; then after 2 more.
    assert phases == [DECODE, DECODE, DECODE, MIXED, DECODE, DECODE, MIXED]
    assert all(end <= (k + 1) * running.cadence_s + 1e-12 for k, end in enumerate(ends))


def test_a_group_member_held_for_its_group_banks_no_gap_and_a_later_prompt_goes_in_beside_the_group():
    """An arrival group's members that got their first tokens in its first prefill tick are
    held while the others' prompts go in (their next token is promised a cadence after that,
    scheduler/simulate.promise_group): the hold is no gap in their streams. Booked as one,
    their slack went below zero by the group's prefill ticks and no prompt could go in
    beside the group until it ended (a burst's stragglers, 0.9-1.1 s for a first token)."""
    times = {DECODE: 0.010, MIXED: 0.020, PREFILL: 0.030}
    sched = TickScheduler(max_slots=4, max_context=1024, chunk=8, buckets=(1, 2, 4), slices={1: 4, 2: 4, 4: 4},
                          tick_s=lambda key: times[key.phase], join_share=0.5)
    group = [Seq(i, prompt_len=4, max_tokens=40, cadence_s=0.015, group=0) for i in range(3)]
    for seq in group:
        sched.add(seq)
    plan = sched.schedule()  # two prompts of 4 fill the chunk: the third waits a tick
    assert plan.phase == PREFILL and [s.seq_id for s in plan.rows] == [0, 1]
    sched.update(plan)
    plan = sched.schedule()
    assert plan.phase == PREFILL and [s.seq_id for s in plan.rows] == [2]  # 0 and 1 held
    sched.update(plan)
    assert all(s.slack_s == 0.0 and s.gap_s == 0.0 for s in group)
    straggler = Seq(3, prompt_len=4, max_tokens=5, cadence_s=0.015)
    sched.add(straggler)
    phases = []
    while not straggler.generated:
        plan = sched.schedule()
        phases.append(plan.phase)
        sched.update(plan)
        assert all(s.slack_s >= -1e-12 for s in group)  # never past a promise
    # Decode ticks bank 5 ms each, a mixed tick (20 ms) needs 5 past the 15 ms cadence: one.
    assert phases == [DECODE, MIXED]


def test_join_share_must_lie_in_zero_to_one():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="join_share"):
            TickScheduler(max_slots=2, max_context=64, chunk=8, buckets=(1, 2), join_share=bad)
