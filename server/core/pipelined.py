"""`PipelinedEngine`: the lockstep engine with P row groups in flight across the stages.

On a multi-stage program the unpipelined engine sends one step at a time through every
stage, so each stage idles while the others work. Here the KV slots are split into P
groups (slots g, g + P, ...), each with its own tick scheduler, and their steps are in the
stages together (RayExecutor.submit / collect; Ray Compiled Graphs keep several
executions in flight). The turn clock, admission's group choice and every prediction
come from scheduler/pipeline.py, the model `lockstep compile` predicts pipelined
tokens/s with (docs/architecture.md, "Pipelined stages").

A group's turn: collect the step it had in the stages (waiting for it if need be: an
overrun), hand out its tokens, then plan and submit its next step. A row's tokens do not
depend on which group or batch it is in (rows are batch-invariant), so a request gets the
tokens the unpipelined engine gives it.

Deterministic mode only: the turns are paced, and the pacers observe each step from its
submission to its last stage's end.
"""

from __future__ import annotations

import time

from scheduler.pipeline import Pipeline, cadence_gap, pipelined_tables
from scheduler.ticks import Seq, TickPlan
from server.core.engine import Engine, EngineConfig, Request, _sleep_until
from server.runtime.step import ExecutorFailed

# The guard a pipelined turn adds to its paced time (`--guard-band-ms` unset): here it is in
# every turn, not taken from a lead as the plain engine's is (EngineConfig.guard_band_s).
PIPELINED_GUARD_S = 0.0015
# The engine thread waits on its condition until this close to a turn, then sleeps the
# rest (a submit in between may bring an earlier turn: it notifies the condition).
WAKE_EARLY_S = 0.001


class PipelinedEngine(Engine):
    # Its turns and predictions come from scheduler/pipeline.py's tables, which know no
    # first-token tail: prefill ticks keep the `prefill_quantile` pace, as before.
    prefill_tail = False
    start_lead = False  # its promises are the pipe's (`predict_placed`), with no start lead

    def __init__(self, executor, program, config: EngineConfig = EngineConfig(), metrics=None, groups: int = 2):
        if not config.deterministic:
            raise ValueError("pipelined stages are paced turns: deterministic mode only")
        if len(program.stages) < 2:
            raise ValueError(f"pipelined stages need a program of 2 or more stages; this one has {len(program.stages)}")
        self.pipe = Pipeline.for_program(program, groups, config.max_queue)  # ValueError past max_slots
        self._issues: dict = {}
        super().__init__(executor, program, config, metrics)
        self.sched = None  # the groups' schedulers replace it
        self._pending: list = [None] * groups  # per group: what executor.submit returned, or the exception it raised

    @property
    def groups(self) -> int:
        return len(self.pipe.groups)

    def _repace(self) -> None:
        factors = self.factors()  # (no prefill tails: prefill_tail off)
        # Swapped whole, as in Engine._repace: `predict` on another thread reads one pair or the other.
        self._ticks, self._issues = ticks, issues = pipelined_tables(self.program, factors, self.config.guard_band_s)
        self._gap = cadence_gap(issues)
        self._tables = (ticks, issues, self._gap)

    def issue_s(self, key) -> float:
        """Wall seconds a step of this shape holds the busiest stage, at the pace now."""
        return self._issues[key]

    # -- client side ------------------------------------------------------------------
    def predict_placed(self, prompt_len: int, max_tokens: int) -> tuple[float, float, int]:
        """(TTFT, end-to-end, group) for a request arriving now, from the groups' state and
        the steps in the stages: the group whose first token would come soonest."""
        with self._lock:
            pipe = self.pipe.clone(now=time.perf_counter())
        ticks, issues, gap = self._tables  # the pace now, read once
        return pipe.predict(prompt_len, max_tokens, ticks.__getitem__, issues.__getitem__, gap)

    def predict(self, prompt_len: int, max_tokens: int) -> tuple[float, float]:
        return self.predict_placed(prompt_len, max_tokens)[:2]

    def submit(self, request: Request) -> None:
        """Queues a request on the group admission chose (`request.group`; -1: chooses now)."""
        if not 0 <= request.group < self.groups:
            request.group = self.predict_placed(len(request.prompt), request.max_tokens)[2]
        super().submit(request)

    def _sched_for(self, request: Request):
        if self._full():  # the bound is the engine's, over all groups
            raise OverflowError(f"queue full ({self.config.max_queue} waiting)")
        return self.pipe.groups[request.group].sched

    def _sched_of(self, seq: Seq):
        return self.pipe.groups[self._requests[seq.seq_id].group].sched

    def status(self) -> dict:
        return {**super().status(), "groups": self.groups}

    def _occupancy(self) -> tuple[int, int, int]:
        scheds = [g.sched for g in self.pipe.groups]
        return (sum(len(s.running) for s in scheds), self.pipe.waiting(), sum(len(s.free_slots) for s in scheds))

    def idle(self) -> bool:
        with self._lock:
            return not any(g.busy for g in self.pipe.groups)

    # -- engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                turn = None
                while not self._stop:
                    for r in [r for r in self._requests.values() if r.cancelled]:
                        self._sched_of(r.seq).abort(r.seq)
                        self._finish(r, "cancelled")
                    turn = self.pipe.next_turn(self._gap)
                    wait = None if turn is None else turn[0] - time.perf_counter() - WAKE_EARLY_S
                    if wait is not None and wait <= 0:
                        break
                    self._lock.wait(wait)
                if self._stop:
                    break
            at, g = turn
            _sleep_until(at)
            self._turn(g, max(at, time.perf_counter()))
        self._end_all("shutdown", "server is shutting down")

    def _turn(self, g: int, at: float) -> None:
        group = self.pipe.groups[g]
        plan = group.in_flight
        if plan is not None:
            self._apply(g, plan)
        with self._lock:
            plan = self.pipe.issue(g, at, self.tick_s, self.issue_s)
            now = time.perf_counter()
            for seq in group.sched.running:
                r = self._requests[seq.seq_id]
                r.admitted_s = r.admitted_s or now
        if plan is not None:
            try:
                self._pending[g] = self.executor.submit(self._batch(plan, plan.rows))
            except ExecutorFailed:
                raise
            except Exception as exc:  # the batch's fault (LocalExecutor runs it here): retried at collect
                self._pending[g] = exc

    def _collect(self, g: int, plan: TickPlan) -> tuple[dict[int, int], float]:
        """(seq_id -> sampled id for the rows that succeeded, the step's seconds from submission)."""
        pending, self._pending[g] = self._pending[g], None
        try:
            if isinstance(pending, Exception):
                raise pending
            result = self.executor.collect(pending)
            return {s.seq_id: t for s, t in zip(plan.rows, result.token_ids)}, result.step_time_s
        except ExecutorFailed:
            raise
        except Exception as exc:
            return self._rows_alone(plan, exc), 0.0

    def _apply(self, g: int, plan: TickPlan) -> None:
        """The group's step in the stages: its tokens out, its rows advanced."""
        tokens, measured = self._collect(g, plan)
        overrun = measured > self.tick_s(plan.key)  # its tokens could not leave at the tick's end
        self._account(plan, self.pipe.groups[g].sched, tokens, measured, overrun, time.perf_counter())
