"""Pipelined stages: P row groups whose steps are in flight across a program's stages
together, and the one timing model that paces them and predicts their requests.

Why groups (docs/architecture.md, "Pipelined stages"): a decode row's next token needs
its last one, so one batch cannot be in two stages at once. P groups can: group g owns
KV slots g, g + P, g + 2P, ... and has its own tick scheduler (scheduler/ticks.py), like
vLLM's virtual engines. While group 0's step is on stage 1, group 1's is on stage 0.

Turns: each group's tick is a turn. At its turn a group applies the step it had in the
stages (its tokens leave then) and issues its next one. A group's turn comes at

    max(its last turn + tick_s(its last step), the last turn of any group + issue_s(that step))

where `tick_s` is the paced tick of the step (the unpipelined engine's, scheduler/simulate.py
`paced_ticks`) and `issue_s` how long the step holds the busiest stage (`paced_issues`):
a step never enters the first stage before the one ahead of it leaves the busiest stage,
so no stage queues. Busy groups take turns earliest first, ties to the lower group. In
steady state each group ticks every max(tick, P x issue): the compiler's
`pipelined_tokens_per_s` (scheduler/compiler.py), which reads the same `issue_s`.

With P = 1 this is the unpipelined engine's schedule, and `Pipeline.predict` gives what
`simulate.predict_arrival` gives (tests/scheduler/test_pipeline.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

from scheduler.program import ProgramView
from scheduler.simulate import NEW_ID
from scheduler.ticks import DECODE, MIXED, Seq, StepKey, TickPlan, TickScheduler

TickTable = Callable[[StepKey], float]


def paced_issues(view: ProgramView, factors: dict[str, float], guard_s: float,
                 deterministic: bool = True) -> dict[StepKey, float]:
    """Wall seconds each step shape holds the busiest stage, paced as `paced_ticks` paces
    ticks: in deterministic mode every decode and mixed step at one key bucket shares the
    longest such stage (`ProgramView.issue_s`); plus the fixed guard, which the engine
    thread spends on each turn (apply, admit, issue)."""
    issue = {k: view.issue_s(k, factors) for k in view.key_buckets}
    return {key: (issue[key.keys] if deterministic and key.phase in (DECODE, MIXED)
                  else seconds * factors[key.phase]) + guard_s
            for key, seconds in view.bottlenecks.items()}


def group_slots(max_slots: int, groups: int) -> list[list[int]]:
    """KV slots of each group: g, g + P, g + 2P, ... (every group gets one when P <= slots)."""
    if not 1 <= groups <= max_slots:
        raise ValueError(f"pipelined groups must be in 1..max_slots={max_slots}, got {groups}")
    return [list(range(g, max_slots, groups)) for g in range(groups)]


@dataclass
class Group:
    sched: TickScheduler  # over this group's slots only
    ready_s: float = 0.0  # its next turn may come (its last turn + that step's tick)
    in_flight: TickPlan | None = None  # its step in the stages: planned, not yet applied

    @property
    def busy(self) -> bool:
        return self.in_flight is not None or not self.sched.idle()


@dataclass
class Pipeline:
    """The groups' schedulers and turn clock. Pure, like the tick scheduler: the engine
    drives one with the real steps, a prediction drives a copy with none."""

    groups: list[Group]
    free_s: float = 0.0  # the next step may enter the stages (the last turn + its step's issue)

    @staticmethod
    def for_program(view: ProgramView, groups: int, max_queue: int = 64) -> Pipeline:
        return Pipeline([Group(TickScheduler(len(slots), view.max_context, view.prefill_chunk, view.buckets, max_queue,
                                             dict(view.slices), free_slots=slots))
                         for slots in group_slots(view.max_slots, groups)])

    def clone(self, now: float = 0.0) -> Pipeline:
        """An independent copy with times moved to seconds after `now` (past ones to 0)."""
        out = Pipeline([], max(0.0, self.free_s - now))
        for g in self.groups:
            sched = g.sched.clone()
            plan = g.in_flight
            if plan is not None:  # its rows as the copy's seqs (an aborted row: a stand-in, skipped by update)
                by_id = {s.seq_id: s for s in sched.running}
                plan = replace(plan, rows=tuple(by_id.get(s.seq_id) or replace(s) for s in plan.rows))
            out.groups.append(Group(sched, max(0.0, g.ready_s - now), plan))
        return out

    def next_turn(self) -> tuple[float, int] | None:
        """(when, group) of the next turn, or None when every group is idle."""
        turns = [(max(g.ready_s, self.free_s), i) for i, g in enumerate(self.groups) if g.busy]
        return min(turns) if turns else None

    def issue(self, i: int, at: float, tick_s: TickTable, issue_s: TickTable) -> TickPlan | None:
        """Group i's turn at `at`, its in-flight step applied: plans its next step (admitting
        into its free slots) and moves the clock. Returns the plan, or None (the group idles)."""
        g = self.groups[i]
        plan = g.in_flight = g.sched.schedule()
        if plan is not None:
            g.ready_s = at + tick_s(plan.key)
            self.free_s = at + issue_s(plan.key)
        return plan

    def waiting(self) -> int:
        return sum(len(g.sched.waiting) for g in self.groups)

    def predict(self, prompt_len: int, max_tokens: int, tick_s: TickTable, issue_s: TickTable,
                first_token_only: bool = False) -> tuple[float, float, int]:
        """(TTFT, end-to-end, group) for a request arriving at time 0 (call on a `clone`
        taken at arrival; it is left untouched): the group whose first token would come
        soonest, ties to the lower group (`scheduler.fleet.pick`'s rule). The queue bound
        does not apply (the caller checks it). `first_token_only`: e2e is NaN."""
        best = None
        for i in range(len(self.groups)):
            ttft, _ = self.clone()._run(i, prompt_len, max_tokens, tick_s, issue_s, first_token_only=True)
            if best is None or ttft < best[0]:
                best = (ttft, i)
        ttft, i = best
        if first_token_only:
            return ttft, math.nan, i
        return (*self.clone()._run(i, prompt_len, max_tokens, tick_s, issue_s), i)

    def _run(self, i: int, prompt_len: int, max_tokens: int, tick_s: TickTable, issue_s: TickTable,
             first_token_only: bool = False) -> tuple[float, float]:
        new = Seq(NEW_ID, prompt_len, max_tokens)
        self.groups[i].sched.waiting.append(new)
        ttft = None
        while True:
            turn = self.next_turn()
            if turn is None:
                raise RuntimeError("the pipeline stalled with a request waiting")  # a bug, not an input
            at, g = turn
            group = self.groups[g]
            if group.in_flight is not None:
                group.sched.update(group.in_flight)
                if ttft is None and new.generated:
                    ttft = at
                    if first_token_only:
                        return ttft, math.nan
                if new.finish_reason is not None:
                    return ttft, at
            self.issue(g, at, tick_s, issue_s)
