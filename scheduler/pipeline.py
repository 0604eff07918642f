"""Pipelined stages: P row groups whose steps are in flight across a program's stages
together, and the one timing model that paces them and predicts their requests.

Why groups (docs/architecture.md, "Pipelined stages"): a decode row's next token needs
its last one, so one batch cannot be in two stages at once. P groups can: group g owns
KV slots g, g + P, g + 2P, ... and has its own tick scheduler (scheduler/ticks.py), like
vLLM's virtual engines. While group 0's step is on stage 1, group 1's is on stage 0.

Turns: each group's tick is a turn. At its turn a group applies the step it had in the
stages (its tokens leave then) and issues its next one. A group's turn comes at

    max(its last turn + max(tick_s, P x issue_s)(its last step), the last turn of any group + issue_s(that step))

where `tick_s` is the paced tick of the step and `issue_s` how long it holds the busiest
stage (`pipelined_tables`: at a key bucket, the deterministic cadence and issue for every
step):
a step never enters the first stage before the one ahead of it leaves the busiest stage,
so no stage queues. A group ticks every max(tick, P x issue) even while the others idle,
and a group with no stream yet (starting, or prompts only) takes the first gap of the
longest issue between the other groups' next turns: so the turns, and the tokens,
promised to a group's streams do not move when other groups fill (measured before these
rules: tokens up to 3.4 s later than promised, as groups that ticked alone at `tick`
slowed to P x issue). Busy groups take turns earliest first, ties to the lower group. Each group's
rate, max(tick, P x issue), is the compiler's `pipelined_tokens_per_s`
(scheduler/compiler.py), which reads the same `issue_s`.

With P = 1 this is the unpipelined engine's schedule, and `Pipeline.predict` gives what
`simulate.predict_arrival` gives (tests/scheduler/test_pipeline.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from scheduler.program import ProgramView
from scheduler.simulate import NEW_ID, rebind
from scheduler.ticks import PREFILL, Seq, StepKey, TickPlan, TickScheduler, slice_sizes

TickTable = Callable[[StepKey], float]


def pipelined_tables(view: ProgramView, factors: dict[str, float], guard_s: float
                     ) -> tuple[dict[StepKey, float], dict[StepKey, float]]:
    """(tick, issue) of every step shape for the pipelined engine: every step at a key
    bucket, prefill included, ticks the deterministic cadence and holds the busiest stage
    the deterministic issue there, so all groups at a key bucket share one period,
    max(tick, P x issue), and one hold: their turns keep their spacing and never push
    each other. A prompt with no streams beside it goes in `pipeline_chunk` tokens at a
    time, a step that fits both."""
    cadence = {k: view.cadence_s(k, factors) + guard_s for k in view.key_buckets}
    issue = {k: view.issue_s(k, factors) + guard_s for k in view.key_buckets}
    # A prefill step below the smallest key bucket (ticks.MIN_PROMPT_KEYS) ticks as the bucket holding it.
    return ({key: cadence[view.holding_bucket(key.keys)] for key in view.steps},
            {key: issue[view.holding_bucket(key.keys)] for key in view.steps})


def pipeline_chunk(view: ProgramView) -> int:
    """The prefill chunk of a pipelined group: the largest prompt slice whose prefill step,
    at every key bucket, takes no longer than the cadence and holds no stage longer than
    the issue there (program seconds); the smallest slice if none does."""
    sizes = slice_sizes(view.prefill_chunk)
    fits = [p for p in sizes
            if all(view.steps[key] <= view.cadence_s(view.holding_bucket(key.keys))
                   and view.bottlenecks[key] <= view.issue_s(view.holding_bucket(key.keys))
                   for key in view.steps if key.phase == PREFILL and key.tokens == p)]
    return fits[-1] if fits else sizes[0]


def cadence_gap(issues: dict[StepKey, float]) -> float:
    """The gap a group without streams needs between other groups' turns: the longest
    paced issue of a decode or mixed step (every one at a key bucket shares it). A prefill
    step may hold its stage longer; the next step then waits in that stage, inside the
    margin of its tick."""
    return max(v for key, v in issues.items() if key.phase != PREFILL)


def group_slots(max_slots: int, groups: int) -> list[list[int]]:
    """KV slots of each group: g, g + P, g + 2P, ... (every group gets one when P <= slots)."""
    if not 1 <= groups <= max_slots:
        raise ValueError(f"pipelined groups must be in 1..max_slots={max_slots}, got {groups}")
    return [list(range(g, max_slots, groups)) for g in range(groups)]


@dataclass
class Group:
    sched: TickScheduler  # over this group's slots only
    ready_s: float = 0.0  # its next turn (its last turn + max(tick, P x issue) of that step)
    in_flight: TickPlan | None = None  # its step in the stages: planned, not yet applied
    hold_s: float = 0.0  # how long that step holds the busiest stage (its issue)
    period_s: float = 0.0  # that step's max(tick, P x issue)
    due_s: float | None = None  # a group without streams: when its next turn first fell due

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
        return Pipeline([Group(TickScheduler(len(slots), view.max_context, pipeline_chunk(view), view.buckets,
                                             max_queue, dict(view.slices), free_slots=slots))
                         for slots in group_slots(view.max_slots, groups)])

    def clone(self, now: float = 0.0) -> Pipeline:
        """An independent copy with times moved to seconds after `now` (past ones to 0)."""
        out = Pipeline([], max(0.0, self.free_s - now))
        for g in self.groups:
            sched = g.sched.clone()
            plan = None if g.in_flight is None else rebind(g.in_flight, sched)
            due = None if g.due_s is None else g.due_s - now
            out.groups.append(Group(sched, max(0.0, g.ready_s - now), plan, g.hold_s, g.period_s, due))
        return out

    def next_turn(self, gap_s: float) -> tuple[float, int] | None:
        """(when, group) of the next turn, or None when every group is idle.

        `gap_s`: the gap a group without streams waits for between the other groups' next
        turns (the longest deterministic issue: `cadence_gap`). The other groups' turns may
        leave only smaller gaps (a shorter key bucket's issue, or 3 or more groups): after
        a period of waiting the group takes its turn anyway, and may delay the next one by
        at most its issue."""
        turns = []
        for i, g in enumerate(self.groups):
            if not g.busy:
                continue
            at = max(g.ready_s, self.free_s)
            if g.in_flight is None:
                # Starting (nothing of it in the stages): it takes the first gap that
                # delays no other group's next turn, so their requests keep their promises;
                # but it waits one period at most (gaps may all be shorter), then goes.
                if g.due_s is None:
                    g.due_s = at
                limit = g.due_s + max(h.period_s for h in self.groups)
                moved = True
                while moved:
                    moved = False
                    for h in self.groups:
                        if (h is not g and h.in_flight is not None and at <= h.ready_s < at + gap_s
                                and h.ready_s + h.hold_s <= limit):
                            at, moved = h.ready_s + h.hold_s, True
                # Starting groups go in the order their oldest requests came (the
                # simulated arrival, NEW_ID, is the newest), so a later arrival does not
                # move an earlier one's promise.
                first = min((s.seq_id if s.seq_id != NEW_ID else math.inf for s in g.sched.waiting), default=math.inf)
                turns.append((at, first, i))
            else:
                turns.append((at, -1, i))
        if not turns:
            return None
        at, _, i = min(turns)
        return at, i

    def issue(self, i: int, at: float, tick_s: TickTable, issue_s: TickTable) -> TickPlan | None:
        """Group i's turn at `at`, its in-flight step applied: plans its next step (admitting
        into its free slots) and moves the clock. Returns the plan, or None (the group idles)."""
        g = self.groups[i]
        plan = g.in_flight = g.sched.schedule()
        g.due_s = None
        if plan is not None:
            g.hold_s = issue_s(plan.key)
            g.period_s = max(tick_s(plan.key), len(self.groups) * g.hold_s)
            g.ready_s = at + g.period_s
            self.free_s = at + g.hold_s
        return plan

    def waiting(self) -> int:
        return sum(len(g.sched.waiting) for g in self.groups)

    def predict(self, prompt_len: int, max_tokens: int, tick_s: TickTable, issue_s: TickTable,
                gap_s: float, first_token_only: bool = False) -> tuple[float, float, int]:
        """(TTFT, end-to-end, group) for a request arriving at time 0 (call on a `clone`
        taken at arrival; it is left untouched): the group whose first token would come
        soonest, ties to the lower group (`scheduler.fleet.pick`'s rule). The queue bound
        does not apply (the caller checks it). `first_token_only`: e2e is NaN."""
        best = None
        for i in range(len(self.groups)):
            ttft, _ = self.clone()._run(i, prompt_len, max_tokens, tick_s, issue_s, gap_s, True)
            if best is None or ttft < best[0]:
                best = (ttft, i)
        ttft, i = best
        if first_token_only:
            return ttft, math.nan, i
        return (*self.clone()._run(i, prompt_len, max_tokens, tick_s, issue_s, gap_s), i)

    def _run(self, i: int, prompt_len: int, max_tokens: int, tick_s: TickTable, issue_s: TickTable,
             gap_s: float, first_token_only: bool = False) -> tuple[float, float]:
        new = Seq(NEW_ID, prompt_len, max_tokens)
        self.groups[i].sched.waiting.append(new)
        ttft = None
        while True:
            turn = self.next_turn(gap_s)
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
