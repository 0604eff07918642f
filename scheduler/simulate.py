"""Running the tick scheduler forward over the program's tick times: the one timing model
behind every admission promise.

`predict_arrival` answers "if a request arrived now, when would its first token and its
last token come?" by cloning the engine's scheduler state, queueing the request, and
running ticks (each lasting `tick_s(plan.key)`) until it finishes. The schedule is
static, so this is exact up to what cannot be known: early stops (a stop token or string
ends a sequence sooner; the promise is then pessimistic) and steps that overrun.

Cost: a stretch of decode ticks with nothing to admit or prefill repeats the same plan
until the first row finishes or moves to a bigger key bucket, and a stretch of mixed ticks
repeats it while one prompt goes in in whole slices beside the same decoding rows: each
is taken in one jump (`run_length`, `skip`), so a run is O(requests) events, not O(ticks).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from scheduler.program import ProgramView
from scheduler.ticks import (DECODE, MIXED, PREFILL, Seq, StepKey, TickPlan, TickScheduler, company_cadence, key_bucket,
                             slice_sizes)

NEW_ID = -1  # the simulated arrival's seq_id (real ones are >= 0)


def paced_ticks(view: ProgramView, factors: dict[str, float]) -> dict[StepKey, float]:
    """Wall seconds every tick shape lasts: its program step (seconds) times its phase's
    pace factor. Ticks follow the work; what keeps a stream's pace is the cadence it was
    promised (`promise_cadence`), which bounds them. The engine paces with this; the
    admission simulation and `lockstep simulate` read the same table (the pipelined
    engine's turns: scheduler/pipeline.pipelined_tables)."""
    return {key: seconds * factors[key.phase] for key, seconds in view.steps.items()}


# Seconds an admission window waits before it closes on a member's first token, for the
# arrivals that came during that tick to join (server/core/engine.py, `_let_arrivals_in`;
# `--window-grace-ms`). None by default: measured side by side (bench/peer_vllm.py, det
# against --window-grace-ms 0, one run), 2 ms put more of a burst in its first group, and
# the group's first tokens are promised after all its prompts: TTFT p50 265 against 222 ms
# in the burst, 245 against 200 at c=8, p99 273 against 227 (docs/architecture.md,
# "Arrival groups").
WINDOW_GRACE_S = 0.0
# The quantile of the last streams' start lateness that every promise adds as a lead
# (server/core/engine.py, START_TOKENS, where it is measured; `serve --start-lead-quantile`).
START_LEAD_QUANTILE = 0.95
# A promise made after the engine sat idle this long (seconds, waiting for work) ...
COLD_IDLE_S = 0.25
# ... or within this long after the first tick that followed such a spell, adds the cold
# allowance (`Pace.cold_s`; server/core/engine.py, where it is measured).
COLD_WINDOW_S = 0.2


def promised_cold(at: float, cold_until: float, idle: bool, last_tick_end: float) -> bool:
    """Whether a promise made at `at` adds the cold allowance: within a cold window (ticks
    starting before `cold_until`), or with the engine `idle` COLD_IDLE_S since its last tick
    ended. The engine's rule (`Engine.cold_s`), which the simulation runs too."""
    return at < cold_until or (idle and at - last_tick_end >= COLD_IDLE_S)


@dataclass(frozen=True)
class Pace:
    """Everything a promise's tick times come from, at one moment: the engine's pacers
    (server/core/engine.py, server/core/pacing.py). The engine builds its tick and tail
    tables from it (`tables`); serve records it as it moves, and `lockstep simulate`
    builds the same tables from the record, so a simulated promise is the engine's.

    factors: phase -> wall seconds of a paced tick per program second; shapes: prefill
    slice tokens -> the factor of that shape's ticks once it has samples of its own (else
    the prefill factor); tail: the prefill ticks' factor at the tail quantile (a first
    token's promise adds the longest tail of the prefill ticks before it), None: no tails;
    cold_s: seconds a promise made after an idle spell adds (COLD_IDLE_S); lead_s: seconds
    every promise adds, the lead a stream's first tokens need (the engine's `start_lead_s`)."""

    factors: dict[str, float]
    shapes: dict[int, float] = field(default_factory=dict)
    tail: float | None = None
    cold_s: float = 0.0
    lead_s: float = 0.0

    def tables(self, view: ProgramView) -> tuple[dict[StepKey, float], dict[StepKey, float]]:
        """(tick seconds, tail seconds) per step shape; tails only for prefill shapes."""
        ticks = paced_ticks(view, self.factors)
        for key, seconds in view.steps.items():
            if key.phase == PREFILL and key.tokens in self.shapes:
                ticks[key] = seconds * self.shapes[key.tokens]
        if self.tail is None:
            return ticks, {}
        return ticks, {k: max(0.0, s * self.tail - ticks[k]) for k, s in view.steps.items() if k.phase == PREFILL}

    def to_json(self) -> dict:
        return {"factors": dict(self.factors), "shapes": {str(n): f for n, f in self.shapes.items()},
                "tail": self.tail, "cold_s": self.cold_s, "lead_s": self.lead_s}

    @classmethod
    def from_json(cls, data: dict) -> "Pace":
        """From `to_json`, or from a bare {phase: factor} (serve's record before the tails).
        Raises ValueError on anything else, or on a factor not finite and > 0."""
        if not isinstance(data, dict):
            raise ValueError(f"a pace is a JSON object, got {type(data).__name__}")
        try:
            if "factors" not in data:
                pace = cls({str(k): float(v) for k, v in data.items()})
            else:
                tail = data.get("tail")
                pace = cls({str(k): float(v) for k, v in data["factors"].items()},
                           {int(n): float(f) for n, f in (data.get("shapes") or {}).items()},
                           None if tail is None else float(tail), float(data.get("cold_s") or 0.0),
                           float(data.get("lead_s") or 0.0))
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a pace: {exc}") from None
        factors = [*pace.factors.values(), *pace.shapes.values(), *([] if pace.tail is None else [pace.tail])]
        if (not pace.factors or not all(0 < f < math.inf for f in factors)
                or not all(0 <= s < math.inf for s in (pace.cold_s, pace.lead_s))):
            raise ValueError(f"pace factors must be finite and > 0, the cold allowance and the lead finite and "
                             f">= 0: {data}")
        return pace


def _decode_run(sched: TickScheduler) -> int:
    """Ticks the next decode plan would repeat unchanged (>= 1): until a row finishes or
    a row's context enters a bigger key bucket, as long as no prompt is pending and
    nothing waiting can be admitted."""
    if any(not s.decoding for s in sched.running) or (sched.waiting and sched.free_slots):
        return 1
    finish = min(min(s.max_tokens - s.generated, sched.max_context - s.prompt_len - s.generated) for s in sched.running)
    contexts = [s.prompt_len + s.generated for s in sched.running]
    same_keys = min(key_bucket(c, sched.max_context) - c + 1 for c in contexts)
    return max(1, min(finish, same_keys))


def _mixed_run(sched: TickScheduler, plan: TickPlan) -> int:
    """Ticks a mixed plan would repeat unchanged (>= 1): its one prompt takes whole slices
    of the same length, no decoding row finishes before the last of them, and no row's
    context passes the plan's key bucket; nothing waiting can be admitted meanwhile.
    (A long prompt going in beside decoding streams is a long run of such ticks.)"""
    if (sched.waiting and sched.free_slots) or len(plan.spans) != 1:
        return 1
    if any(sched.tick_for(s, plan.key) > s.cadence_s for s in plan.rows[:plan.decoding]):
        return 1  # each such tick spends slack: `fits` looks at them one at a time
    *decoding, seq = plan.rows
    (_, n), keys = plan.spans[0], plan.keys
    run = min((seq.prompt_len - seq.prefilled) // n, (keys - seq.prefilled) // n)
    for s in decoding:
        context = s.prompt_len + s.generated
        run = min(run, s.max_tokens - s.generated, sched.max_context - context, keys - context + 1)
    return max(1, run)


def run_length(sched: TickScheduler, plan: TickPlan) -> int:
    """How many ticks `plan` stands for: the same step, repeated, with the same rows."""
    if plan.phase == DECODE:
        return _decode_run(sched)
    if plan.phase == MIXED:
        return _mixed_run(sched, plan)
    return 1


def skip(plan: TickPlan, ticks: int, sched: TickScheduler) -> None:
    """Applies `ticks` of `plan` at once (all but the last tick of a run; update() does
    that one): decoding rows gain a token each tick, the prompt row a slice, and `sched`'s
    running seqs bank the ticks (TickScheduler.bank)."""
    sched.bank(plan, ticks)
    for i, seq in enumerate(plan.rows):
        if plan.is_slice(i):
            seq.prefilled += ticks * plan.span(i)[1]
        else:
            seq.generated += ticks


def rebind(plan: TickPlan, sched: TickScheduler) -> TickPlan:
    """`plan` (planned from another copy of `sched`) over `sched`'s own seqs. Rows aborted
    since are no longer running: stand-ins keep the rows' order (the slice row is the
    last), and update() skips them."""
    by_id = {s.seq_id: s for s in sched.running}
    return replace(plan, rows=tuple(by_id.get(s.seq_id) or replace(s) for s in plan.rows))


def promise_cadence(sched: TickScheduler, seq: Seq) -> float:
    """The TPOT promised to `seq` arriving now (docs/architecture.md, "Promises per
    request"): alone (nothing running or waiting, and no earlier stream still being handed
    out: `sched.delivering`), its own decode step, so a lone stream
    does not pay for a batch that is not there, and those who arrive during it wait for
    what it leaves (their promises say so); in company, the longest decode tick any batch
    may run and `sched.join_share` of what the longest mixed tick takes past it
    (`ticks.company_cadence`): whoever joins later keeps its pace, and a prompt goes in
    beside it when the slack its shorter ticks banked pays for the mixed tick. Both at the key bucket the longest stream
    may reach. 0 without promises (`sched.tick_s` unset) or for a single token. With
    `sched.alone_own_step` off, a request alone is promised as one in company."""
    others = (*sched.running, *sched.waiting)
    return group_cadence(sched, (seq,), not others and not sched.delivering)


def group_cadence(sched: TickScheduler, seqs: tuple[Seq, ...], alone: bool) -> float:
    """The TPOT `promise_cadence` promises: `seqs` (one arrival, or an arrival group) are
    `alone` when nothing else runs, waits or is still handed out; a group of two or more
    is in company. A group that fills every slot (a burst, a closed loop's wave) leaves no
    room for anyone to join while it runs, so it needs no room for a joiner's prompt
    either: it is promised the longest decode tick, not the mixed ticks' (which carry a
    prompt slice beside the streams: 1.26x the batch-8 decode step of smollm2-135m here).
    0 without promises or for a single token."""
    tick_s = sched.tick_s
    if tick_s is None or max(s.max_tokens for s in seqs) < 2:
        return 0.0
    keys = key_bucket(max(s.final_context for s in (*sched.running, *sched.waiting, *seqs)), sched.max_context)
    if alone and len(seqs) == 1 and sched.alone_own_step:
        return tick_s(StepKey(DECODE, sched.buckets[0], keys, 1))
    decode = max(tick_s(StepKey(DECODE, b, keys, 1)) for b in sched.buckets)
    if len(seqs) >= sched.max_slots:
        return decode
    if not sched.slices:  # prefill ticks alternate with decode ticks: a prompt's gap is both
        prefill = max(tick_s(StepKey(PREFILL, 1, keys, n)) for n in slice_sizes(sched.chunk))
        return company_cadence(decode, decode + prefill, sched.join_share)
    mixed = max(tick_s(StepKey(MIXED, b, keys, sched.slices[b])) for b in sched.buckets)
    return company_cadence(decode, mixed, sched.join_share)


class ArrivalWindow(NamedTuple):
    """An open admission window (docs/architecture.md, "Arrival groups")."""

    closes_s: float  # when its bound ends
    group: int  # its members' `Seq.group`
    members: list  # in arrival order (the engine's Requests, the simulation's Seqs)
    alone: bool  # it opened with no earlier stream still being handed out


def promise_group(sched: TickScheduler, members: list[Seq], tick_s: Callable[[StepKey], float], alone: bool,
                  in_flight: TickPlan | None = None, elapsed_s: float = 0.0,
                  tail_s: Callable[[StepKey], float] | None = None,
                  ended: bool = False) -> dict[int, tuple[float, float]]:
    """seq_id -> (first token, cadence), seconds from now, for an arrival group: `members`,
    already queued in `sched` (without promises) in one admission window that the first of
    them opened `alone` (docs/architecture.md, "Arrival groups"). `sched` is left untouched;
    `in_flight` and `elapsed_s` as in `predict_arrival`.

    One run forward of the scheduler with the whole group in it: each member's first token
    is promised no earlier than the start of the tick that makes its second (a member that
    has its first token waits for its group's prompts before it decodes), so its second
    token is due a cadence after that start: no tick from there on is longer than the
    cadence (scheduler/ticks.py), whatever arrives meanwhile and changes which tick it is.
    `tail_s`: as in `predict_arrival`, the longest prefill tick's tail before the members'
    second tokens, added to every member's first token. `ended`: the tick in flight has run
    (the window closes as it made a member's first token): it can run past its pace no
    more, so its own tail is not one of them (it was, and a lone prompt's first token was
    held that much after it was made, while the next step ran)."""
    sim = sched.clone()
    ids = {s.seq_id for s in members}
    mine = [s for s in (*sim.running, *sim.waiting) if s.seq_id in ids]
    if not mine:  # every member ended already (one token each), at the tick that just ended
        return {i: (0.0, 0.0) for i in ids}
    cadence = group_cadence(sim, tuple(mine), alone)
    for seq in mine:
        seq.cadence_s = cadence
    t, tail = 0.0, 0.0
    if in_flight is not None:
        t = max(0.0, tick_s(in_flight.key) - elapsed_s)
        tail = 0.0 if ended else _tail(tail_s, in_flight, 0.0)
        sim.update(rebind(in_flight, sim))
    first: dict[int, float] = {}  # seq_id -> when the tick that makes its first token ends
    second: dict[int, float] = {}  # seq_id -> when the tick that makes its second token starts

    def token(seq_id: int, start: float, dt: float) -> None:
        if seq_id not in first:
            first[seq_id] = start + dt
        elif seq_id not in second:
            second[seq_id] = start

    for seq in mine:  # members whose first token the tick in flight already made
        if seq.generated:
            first[seq.seq_id] = t
    while any(s.seq_id not in second and s.finish_reason is None for s in mine):
        plan = sim.schedule()
        if plan is None:
            raise RuntimeError("the scheduler stalled with an arrival group waiting")  # a bug, not an input
        run = run_length(sim, plan)
        dt = tick_s(plan.key)
        tail = _tail(tail_s, plan, tail)
        if run > 1:  # only the first two tokens of a jumped run can matter
            for i, seq in enumerate(plan.rows):
                if seq.seq_id in ids and not plan.is_slice(i):
                    for k in range(min(run - 1, 2)):
                        token(seq.seq_id, t + k * dt, dt)
            skip(plan, run - 1, sim)
            t += (run - 1) * dt
        before = {s.seq_id: s.generated for s in plan.rows}
        for out in sim.update(plan):
            if out.seq.seq_id in ids and out.seq.generated > before[out.seq.seq_id]:
                token(out.seq.seq_id, t, dt)
        t += dt
    # A member missing from `first` ended at the tick that just ended (one token).
    return {i: (max(first[i], second.get(i, 0.0)) + tail if i in first else 0.0, cadence) for i in ids}


def _tail(tail_s: Callable[[StepKey], float] | None, plan: TickPlan, longest: float) -> float:
    """The longest prefill tick's tail so far: `longest`, or this plan's if it is longer."""
    if tail_s is None or plan.phase != PREFILL:
        return longest
    return max(longest, tail_s(plan.key) or 0.0)


def predict_arrival(sched: TickScheduler, prompt_len: int, max_tokens: int,
                    tick_s: Callable[[StepKey], float], clone: bool = True,
                    in_flight: TickPlan | None = None, elapsed_s: float = 0.0,
                    first_token_only: bool = False,
                    tail_s: Callable[[StepKey], float] | None = None) -> tuple[float, float]:
    """(TTFT, end-to-end) in seconds for a request arriving now, from a clone of `sched`
    (left untouched; `clone=False` runs `sched` itself forward, for a caller that passes a
    copy already); the queue bound does not apply (the caller checks it).

    `in_flight`: the plan of the tick running now (planned from `sched`, not yet applied),
    `elapsed_s` into it. It finishes first, in what is left of it, and the new request
    joins the tick after, as in the engine (a request arriving mid-tick is admitted at the
    tick's end): without it, the new request would be planned into a tick already running.
    `first_token_only`: stop at the first token (a router choosing by TTFT); e2e is then NaN.
    `tail_s`: seconds a prefill tick of a shape may run past `tick_s` (prefill ticks paced at
    their median, server/core/engine.py: PREFILL_TICK_QUANTILE): the first token is promised
    the longest one's later, and so every token after it. None: no tails."""
    sim = sched.clone() if clone else sched
    t, ttft, tail = 0.0, None, 0.0
    if in_flight is not None:
        t = max(0.0, tick_s(in_flight.key) - elapsed_s)
        tail = _tail(tail_s, in_flight, 0.0)
        sim.update(rebind(in_flight, sim))
    new = Seq(NEW_ID, prompt_len, max_tokens)
    new.cadence_s = promise_cadence(sim, new)
    sim.waiting.append(new)
    while new.finish_reason is None:
        plan = sim.schedule()
        if plan is None:
            raise RuntimeError("the scheduler stalled with a request waiting")  # a bug, not an input
        run = run_length(sim, plan)
        tail = _tail(tail_s, plan, tail)
        if run > 1:  # all but the last tick of the run at once
            skip(plan, run - 1, sim)
            t += (run - 1) * tick_s(plan.key)
        t += tick_s(plan.key)
        sim.update(plan)
        if ttft is None and new.generated:
            ttft = t + tail
            if first_token_only:
                return ttft, math.nan
            if new.cadence_s:  # the promise: each later token one cadence after the last
                return ttft, ttft + (max_tokens - 1) * new.cadence_s
    return ttft, t + tail


@dataclass(frozen=True)
class SimRequest:
    prompt_len: int
    max_tokens: int
    arrival_s: float | None = None  # None: closed loop (starts when a client is free)


@dataclass
class SimResult:
    index: int
    arrival_s: float
    prompt_len: int
    status: str = "OK"  # or RESOURCE_EXHAUSTED (queue full at arrival)
    token_s: list[float] = field(default_factory=list)  # when each token left, seconds
    # With promises: (first token, cadence) promised at admission, seconds from arrival; and
    # how far after its promised time the engine computed its latest token (0: none late).
    promise: tuple[float, float] | None = None
    late_s: float = 0.0

    @property
    def ttft_s(self) -> float | None:
        return self.token_s[0] - self.arrival_s if self.token_s else None

    @property
    def itl_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_s, self.token_s[1:])]

    @property
    def e2e_s(self) -> float | None:
        return self.token_s[-1] - self.arrival_s if self.token_s else None


def simulate_load(sched: TickScheduler, requests: list[SimRequest], tick_s: Callable[[StepKey], float],
                  concurrency: int = 0, jumps: bool = True, window_s: float = 0.0,
                  tail_s: Callable[[StepKey], float] | None = None,
                  cold_s: float = 0.0,
                  lead_s: float = 0.0,
                  late_s: Callable[[int], float] | None = None,
                  window_grace_s: float = 0.0) -> tuple[list[SimResult], float]:
    """A discrete-event run of the tick scheduler: the same ticks the engine would run for
    these arrivals, each lasting `tick_s(plan.key)`. Open loop (every request has an
    arrival time; `concurrency` > 0 caps the requests in flight, the rest wait to be sent)
    or closed loop (no arrival times: `concurrency` clients, each sending its next request
    when the last one ends). A request arriving during a tick is admitted at the tick's
    end, as in the engine; one that finds the queue full is refused. With promises
    (`sched.tick_s` set), each request is promised at admission as the engine promises
    (`predict_arrival`) and its tokens are delivered no sooner than promised, as the front
    end delivers them; a client is free when its last token is delivered. Returns (results
    by index, seconds until the last token).

    `window_s` > 0: the engine's admission window (docs/architecture.md, "Arrival
    groups"): a request that finds nothing running or waiting opens it, those arriving within
    `window_s` of it (and before a member's first token) join its group, and the group is
    promised together when it closes (at the first tick boundary after its bound or a
    member's first token; the engine closes it mid-tick or just before that token, from
    the same state run forward: the same promises). `window_grace_s`: the engine's wait
    before a window closes on a first token (EngineConfig.window_grace_s): arrivals
    within it join, and the next tick starts after it.

    `tail_s` and `cold_s`: the prefill tails and the cold allowance the engine's promises
    add (`Pace`): a promise made while the simulated engine is cold (idle COLD_IDLE_S, or
    within COLD_WINDOW_S of the first tick after that) adds `cold_s`, as the engine's; every
    promise adds `lead_s` (the engine's `start_lead_s`: the lead its streams' first tokens need).
    `late_s(k)`: a draw of how late (seconds) promised token k (0: the first) leaves after its
    time, for each one handed out (serve's record of its own: the front end's timers and
    writes share the cores with the steps), so what a client sees is the promise plus that
    spread; None: on time.

    Runs of identical ticks are taken at once up to the next arrival (`jumps`),
    so a run costs O(tokens) list appends, not O(ticks) scheduler calls."""
    closed = any(r.arrival_s is None for r in requests)
    if closed and concurrency < 1:
        raise ValueError("a closed-loop simulation needs concurrency >= 1")
    promising = sched.tick_s is not None
    results: dict[int, SimResult] = {}
    promises: dict[int, tuple[float, float]] = {}  # index -> (first token due, cadence), absolute seconds
    # A heap of (when, index): open loop, every arrival; closed loop, each client's next send.
    upcoming = sorted((r.arrival_s, i) for i, r in enumerate(requests)) if not closed else []
    unsent = list(range(len(requests))) if closed else []
    frees: list[float] = []  # when each request in flight is delivered in full (a heap)
    waiting_to_send: list[int] = []
    in_flight, t = 0, 0.0
    delivery_ends: dict[int, float] = {}  # index -> its last token's promised time (the engine's `_delivery_ends`)
    window: ArrivalWindow | None = None  # the open admission window
    last_end, cold_until = -math.inf, -math.inf  # the last tick's end; cold ticks start before cold_until
    free_during = len(sched.free_slots)  # the free slots while the last tick ran (TickScheduler.full)

    def added(at: float) -> float:
        """The engine's `cold_s` and its start lead: what a promise made at `at` adds."""
        return lead_s + (cold_s if promised_cold(at, cold_until, sched.idle(), last_end) else 0.0)

    def close(at: float, in_flight: TickPlan | None = None) -> None:
        """Promises the open window's group (the engine's `close_window`); `in_flight`: the
        tick that just made a member's first token, not yet applied to `sched` (the engine
        closes the window then, its tick still in flight: its tail is in the promise)."""
        nonlocal window
        members, alone, window = window.members, window.alone, None
        allowance = added(at)
        elapsed = 0.0 if in_flight is None else tick_s(in_flight.key)
        for i, (ttft, cadence) in promise_group(sched, members, tick_s, alone, in_flight, elapsed,
                                                tail_s=tail_s, ended=in_flight is not None).items():
            ttft += allowance
            promises[i] = (at + ttft, cadence)
            delivery_ends[i] = at + ttft + (requests[i].max_tokens - 1) * cadence
            results[i].promise = (at + ttft - results[i].arrival_s, cadence)
        for seq in members:
            seq.cadence_s = promises[seq.seq_id][1]

    def send(i: int, at: float) -> None:
        nonlocal in_flight, window
        r = requests[i]
        results[i] = SimResult(i, r.arrival_s if r.arrival_s is not None else at, r.prompt_len)
        if window and results[i].arrival_s > window.closes_s:
            close(at)  # arrived after the window: promised as any other, beside the group
        if sched.full(free_during):  # as the engine saw it while the tick it arrived in ran
            results[i].status = "RESOURCE_EXHAUSTED"
            if closed and unsent:  # a refused client sends its next request at once
                heapq.heappush(upcoming, (at, unsent.pop(0)))
            return
        seq = Seq(i, r.prompt_len, r.max_tokens)
        if promising:
            for j in [j for j, end in delivery_ends.items() if end <= at]:
                del delivery_ends[j]  # handed out in full
            sched.delivering = bool(delivery_ends)
            if not window and window_s > 0 and sched.idle():  # it opens a window
                window = ArrivalWindow(results[i].arrival_s + window_s, i, [], not sched.delivering)
            if window:  # a member: promised when the window closes
                seq.group = window.group
                window.members.append(seq)
                sched.add(seq)
                in_flight += 1
                return
            ttft, _ = predict_arrival(sched, r.prompt_len, r.max_tokens, tick_s, tail_s=tail_s)
            ttft += added(at)
            seq.cadence_s = promise_cadence(sched, seq)
            promises[i] = (at + ttft, seq.cadence_s)
            delivery_ends[i] = at + ttft + (r.max_tokens - 1) * seq.cadence_s
            results[i].promise = (at + ttft - results[i].arrival_s, seq.cadence_s)
        sched.add(seq)
        in_flight += 1

    def delivered(i: int) -> float:
        """When request i's last token reaches its client."""
        token_s = results[i].token_s
        if i in promises:
            due, cadence = promises[i]
            delivery_ends[i] = due + (len(token_s) - 1) * cadence
            results[i].late_s = max(0.0, *(x - due - k * cadence for k, x in enumerate(token_s)))
            token_s[:] = [max(x, due + k * cadence) + (late_s(k) if late_s else 0.0) for k, x in enumerate(token_s)]
        return token_s[-1] if token_s else t

    def next_event() -> float | None:
        """When the next request arrives, the next client is free or the window closes, if ever."""
        return min([x[0] for x in upcoming[:1]] + frees[:1] + ([window.closes_s] if window else []), default=None)

    for _ in range(min(concurrency, len(requests)) if closed else 0):
        heapq.heappush(upcoming, (0.0, unsent.pop(0)))
    while upcoming or waiting_to_send or frees or not sched.idle():
        while frees and frees[0] <= t:
            heapq.heappop(frees)
            in_flight -= 1
        while upcoming and upcoming[0][0] <= t:
            waiting_to_send.append(heapq.heappop(upcoming)[1])
        while waiting_to_send and (closed or not concurrency or in_flight < concurrency):
            send(waiting_to_send.pop(0), t)
        if window and (t >= window.closes_s or any(s.generated for s in window.members)):  # its bound, or a first token
            close(t)
        plan = sched.schedule()
        free_during = len(sched.free_slots)  # what an arrival during this tick finds (TickScheduler.full)
        nxt = next_event()
        if plan is None:
            if nxt is None:
                break  # everything sent has ended, or was refused
            t = max(t, nxt)
            continue
        dt = tick_s(plan.key)
        if t - last_end >= COLD_IDLE_S:  # the first tick after an idle spell
            cold_until = t + COLD_WINDOW_S
        run = run_length(sched, plan) if jumps else 1
        if nxt is not None:  # stop at the first tick boundary at or after the next arrival or free client
            run = min(run, max(1, math.ceil((nxt - t) / dt)))
        if run > 1:
            for i, seq in enumerate(plan.rows):
                if not plan.is_slice(i):
                    results[seq.seq_id].token_s.extend(t + k * dt for k in range(1, run))
            skip(plan, run - 1, sched)
            t += (run - 1) * dt
        before = {s.seq_id: s.generated for s in plan.rows}
        t += dt
        last_end = t
        hold = 0.0
        if window and plan.samples_for(window.group):
            # As the engine: arrivals within the window joined it as they came, during the
            # tick and its grace; it closes before the first token is handed out, the tick
            # in flight.
            hold = window_grace_s
            # A closed loop's client sends at t, which may be past the window's bound: that send
            # closes the window itself (promised beside the group), and no later one joins.
            while (window and upcoming and upcoming[0][0] <= min(t + hold, window.closes_s) and not waiting_to_send
                   and (closed or not concurrency or in_flight < concurrency)):
                send(heapq.heappop(upcoming)[1], t)
            if window:
                close(t + hold, in_flight=plan)
        for out in sched.update(plan):
            i = out.seq.seq_id
            if out.seq.generated > before[i]:
                results[i].token_s.append(t)
            if out.finish_reason is not None:
                end = delivered(i)
                heapq.heappush(frees, end)
                if closed and unsent:
                    heapq.heappush(upcoming, (end, unsent.pop(0)))
        t += hold  # the engine's next tick starts after the grace
    return [results[i] for i in range(len(requests))], max([t, *(x.token_s[-1] for x in results.values() if x.token_s)])
