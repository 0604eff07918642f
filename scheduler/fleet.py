"""Several replicas of one program behind a router: the routing policies, and a
discrete-event run of the fleet over the program's tick times.

The router (server/frontend/router.py) and this simulation choose with the same `pick`, and the
prediction they choose by is the same `predict_arrival` each engine answers admission
with (scheduler/simulate.py): one timing model behind every prediction.

Policies:
- `prediction`: the replica whose predicted TTFT for this request is lowest; ties go to
  the lowest index, so the same state gives the same choice.
- `round-robin`: replica i % N for the i-th request, whatever their state.
- `least-outstanding`: the replica with the fewest requests admitted and not finished
  (running + waiting), ties to the lowest index: what a load-aware balancer knows.

A replica whose queue is full is passed over by `prediction` and `least-outstanding`; a
request none can take is refused (RESOURCE_EXHAUSTED). `round-robin` does not look: its
pick refuses when that replica is full, as a generic balancer's backend would.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from scheduler.simulate import SimRequest, SimResult, predict_arrival, run_length, skip, promise_cadence
from scheduler.ticks import Seq, StepKey, TickPlan, TickScheduler

POLICIES = ("prediction", "round-robin", "least-outstanding")


@dataclass(frozen=True)
class Candidate:
    """What the router knows of one replica when a request arrives."""

    index: int
    ttft_s: float  # its predicted TTFT for this request (inf: not asked, or it cannot say)
    outstanding: int  # admitted, not finished
    full: bool  # its queue is full: it would refuse


def pick(policy: str, candidates: list[Candidate], turn: int) -> int | None:
    """The replica index `policy` sends a request to, or None when it is refused.
    `turn`: how many requests were routed before this one (round-robin's position)."""
    if policy == "round-robin":
        if not candidates:
            return None
        c = candidates[turn % len(candidates)]
        return None if c.full else c.index
    open_ = [c for c in candidates if not c.full]
    if not open_:
        return None
    if policy == "prediction":
        return min(open_, key=lambda c: (c.ttft_s, c.index)).index
    if policy == "least-outstanding":
        return min(open_, key=lambda c: (c.outstanding, c.index)).index
    raise ValueError(f"routing policy must be one of {list(POLICIES)}, got {policy!r}")


@dataclass
class FleetResult(SimResult):
    replica: int = -1  # where it was sent (-1: refused before any replica)
    predicted_ttft_s: float | None = None  # the chosen replica's prediction at arrival


class _Replica:
    def __init__(self, index: int, sched: TickScheduler):
        self.index, self.sched = index, sched
        self.plan: TickPlan | None = None  # the tick in flight
        self.run = 1  # ticks the plan in flight stands for (a stretch of equal decode ticks)
        self.start_s = self.end_s = 0.0


def simulate_fleet(scheds: list[TickScheduler], requests: list[SimRequest], tick_s: Callable[[StepKey], float],
                   policy: str) -> tuple[list[FleetResult], float]:
    """Open-loop arrivals routed by `policy` over replicas `scheds` (one TickScheduler
    each, as their engines; all run the same program, so one `tick_s`). Each replica runs
    its own ticks; a request is routed at its arrival from the replicas' state then (a
    tick in flight ends first, as in the engine) and admitted at its
    replica's next tick. Returns (results by index, seconds until the last token)."""
    if policy not in POLICIES:
        raise ValueError(f"routing policy must be one of {list(POLICIES)}, got {policy!r}")
    if not scheds:
        raise ValueError("a fleet needs at least one replica")
    if any(r.arrival_s is None for r in requests):
        raise ValueError("a fleet simulation is open loop: every request needs an arrival time")
    replicas = [_Replica(i, s) for i, s in enumerate(scheds)]
    results = [FleetResult(i, r.arrival_s, r.prompt_len) for i, r in enumerate(requests)]
    arrivals = sorted((r.arrival_s, i) for i, r in enumerate(requests))
    ends: list[tuple[float, int]] = []  # (tick end, replica) heap
    a, t, turn = 0, 0.0, 0

    def start_tick(rep: _Replica, now: float) -> None:
        plan = rep.sched.schedule()
        rep.plan, rep.start_s = plan, now
        if plan is None:
            return
        dt = tick_s(plan.key)
        run = run_length(rep.sched, plan)
        if run > 1 and a < len(arrivals):  # stop at the first tick boundary at or after the next arrival
            run = min(run, max(1, math.ceil((arrivals[a][0] - now) / dt)))
        rep.run, rep.end_s = run, now + run * dt
        heapq.heappush(ends, (rep.end_s, rep.index))

    def end_tick(rep: _Replica) -> None:
        plan, dt = rep.plan, (rep.end_s - rep.start_s) / rep.run
        if rep.run > 1:
            for i, seq in enumerate(plan.rows):
                if not plan.is_slice(i):
                    results[seq.seq_id].token_s.extend(rep.start_s + k * dt for k in range(1, rep.run))
            skip(plan, rep.run - 1, rep.sched)
        before = {s.seq_id: s.generated for s in plan.rows}
        for out in rep.sched.update(plan):
            if out.seq.generated > before[out.seq.seq_id]:
                results[out.seq.seq_id].token_s.append(rep.end_s)
        start_tick(rep, rep.end_s)

    while a < len(arrivals) or ends:
        if ends and (a == len(arrivals) or ends[0][0] < arrivals[a][0]):
            t, i = heapq.heappop(ends)
            end_tick(replicas[i])
            continue
        t, i = arrivals[a]
        a += 1
        r = requests[i]
        candidates = []
        for rep in replicas:
            full = rep.sched.full()
            ttft = _predict(rep, r, t, tick_s) if policy == "prediction" and not full else math.inf
            candidates.append(Candidate(rep.index, ttft, len(rep.sched.waiting) + len(rep.sched.running), full))
        chosen = pick(policy, candidates, turn)
        turn += 1
        if chosen is None:
            results[i].status = "RESOURCE_EXHAUSTED"
            continue
        rep = replicas[chosen]
        results[i].replica = chosen
        results[i].predicted_ttft_s = candidates[chosen].ttft_s if policy == "prediction" else None
        seq = Seq(i, r.prompt_len, r.max_tokens)
        seq.cadence_s = promise_cadence(rep.sched, seq)
        rep.sched.add(seq)
        if rep.plan is None:  # idle: it starts a tick now
            start_tick(rep, t)
    return results, t


def _predict(rep: _Replica, r: SimRequest, now: float, tick_s: Callable[[StepKey], float]) -> float:
    """The replica's TTFT prediction, as its engine makes it: its scheduler state cloned
    and run forward from the tick in flight (what is left of it), then the new request."""
    if rep.plan is None:
        return predict_arrival(rep.sched, r.prompt_len, r.max_tokens, tick_s, first_token_only=True)[0]
    sim, dt = rep.sched.clone(), (rep.end_s - rep.start_s) / rep.run
    by_id = {s.seq_id: s for s in sim.running}
    plan = replace(rep.plan, rows=tuple(by_id.get(s.seq_id) or replace(s) for s in rep.plan.rows))
    done = min(rep.run - 1, int((now - rep.start_s) / dt))  # inside a run of equal ticks
    skip(plan, done, sim)
    start = rep.start_s + done * dt
    return predict_arrival(sim, r.prompt_len, r.max_tokens, tick_s, clone=False, in_flight=plan,
                           elapsed_s=now - start, first_token_only=True)[0]
