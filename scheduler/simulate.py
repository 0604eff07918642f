"""Running the tick scheduler forward over the program's tick times: the one timing model
behind every admission promise.

`predict_arrival` answers "if a request arrived now, when would its first token and its
last token come?" by cloning the engine's scheduler state, queueing the request, and
running ticks (each lasting `tick_s(phase, bucket)`) until it finishes. The schedule is
static, so this is exact up to what cannot be known: early stops (a stop token or string
ends a sequence sooner; the promise is then pessimistic) and steps that overrun.

Cost: a stretch of decode ticks with nothing to admit or prefill repeats the same plan
until the first row finishes, so it is taken in one jump: the run is O(requests x prompt
chunks) events, not O(ticks).
"""

from __future__ import annotations

from collections.abc import Callable

from scheduler.ticks import DECODE, Seq, TickScheduler

NEW_ID = -1  # the simulated arrival's seq_id (real ones are >= 0)


def _decode_run(sched: TickScheduler) -> int:
    """Ticks the next decode plan would repeat unchanged (>= 1): until a row finishes,
    as long as no prompt is pending and nothing waiting can be admitted."""
    if any(not s.decoding for s in sched.running) or (sched.waiting and sched.free_slots):
        return 1
    return max(1, min(min(s.max_tokens - s.generated, sched.max_context - s.prompt_len - s.generated)
                      for s in sched.running))


def predict_arrival(sched: TickScheduler, prompt_len: int, max_tokens: int,
                    tick_s: Callable[[str, int], float]) -> tuple[float, float]:
    """(TTFT, end-to-end) in seconds for a request arriving now, from a clone of `sched`
    (left untouched); the queue bound does not apply (the caller checks it)."""
    sim = sched.clone()
    new = Seq(NEW_ID, prompt_len, max_tokens)
    sim.waiting.append(new)
    t, ttft = 0.0, None
    while new.finish_reason is None:
        plan = sim.schedule()
        if plan is None:
            raise RuntimeError("the scheduler stalled with a request waiting")  # a bug, not an input
        if plan.phase == DECODE:
            run = _decode_run(sim)
            if run > 1:  # all but the last tick of the stretch at once
                for seq in plan.rows:  # decoding rows, `new` among them, have their first token
                    seq.generated += run - 1
                t += (run - 1) * tick_s(DECODE, plan.bucket)
        t += tick_s(plan.phase, plan.bucket)
        sim.update(plan)
        if ttft is None and new.generated:
            ttft = t
    return ttft, t
