"""The lockstep engine: a thin loop, on one thread, around the tick scheduler
(scheduler/ticks.py) and the executor.

Each tick: retire cancelled requests, `schedule()` (admit into free KV slots, pick the
tick's work), run the step, `update()` and hand out the sampled tokens. In deterministic
mode ticks follow the work, back to back, and the engine runs ahead of its promises: a
token made early waits at the front end for its promised time (server/frontend/
delivery.py), so its cadence does not carry the steps' jitter; a step that would overlap
such a time starts just after it, plus the guard, while every stream keeps its lead
(`_quiet_until`). Each tick's shape has a paced duration, its program step times its
phase's pace factor (the time scale and the guard band at first, then what the host's
steps measure: server/core/pacing.py; scheduler/simulate.py, `paced_ticks`): promises are
made with it, and a token made after its promised time is an overrun: counted, exported
and logged, never hidden.

Admission predictions are the same scheduler run forward over the same tick times
(scheduler/simulate.py), so the promise and the pacing come from one model
(docs/architecture.md, "The timing model").

Failures (docs/security.md): a step that raises is retried row by row, so the row at
fault ends with reason "error" and the others keep their tokens; an `ExecutorFailed`
(the executor itself is broken) or any error outside a step ends the loop: every
waiting and running request ends with reason "unavailable", `submit` refuses from then
on, and `on_death` tells the server, which reports it and exits non-zero.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import json
import logging
import math
import os
import statistics
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from scheduler.program import ProgramView
from scheduler.simulate import (COLD_IDLE_S, COLD_WINDOW_S, START_LEAD_QUANTILE, WINDOW_GRACE_S, ArrivalWindow,
                                Pace, predict_arrival, promise_group, promised_cold)
from scheduler.ticks import DECODE, JOIN_SHARE, MIXED, PREFILL, Seq, StepKey, TickPlan, queue_is_full, slice_shape
from server.core.pacing import Pacer
from server.runtime.sampling import SamplingParams
from server.runtime.step import ExecutorFailed, StepBatch

log = logging.getLogger("lockstep.engine")

# What each phase's pace covers, over the served steps (+ the guard band). A first token
# has no lead before it: prefill ticks cover the 95th percentile. A stream's decode and
# mixed ticks run back to back ahead of their promises, and the lead they build absorbs
# a slow step, so they may follow a lower quantile (EngineConfig.pace_quantile; `serve
# --pace-quantile`): the median gave 7-26% more tokens/s at c=8, but a promise made at the
# median pace breaks when the host slows within the stream's life (this host's steps
# move by 1.5x within minutes): overruns at c=8 of 0% and 15.7% in two runs, against 2.1%
# and 0% at the 95th percentile (bench/peer_vllm.py; BENCHMARKS.md, "Pace at the median").
# The promise is the product: the 95th percentile is the default.
PREFILL_QUANTILE = 0.95
# ... but a run of prefill ticks back to back (an arrival group's prompts: 3-4 ticks at c=8)
# does not take the tail on each: the lead of one absorbs another's excess. So prefill ticks
# are paced at the median of their own, and a first token's promise adds one tick's tail:
# the longest prefill tick before it, at the PREFILL_QUANTILE pace less the median's
# (`Engine.tail_s`). A lone prompt's first token is promised as before (one tick, at the
# 95th percentile); a wave's is not paced by the worst of the last 16 on every tick
# (measured, one tick log at c=8: prefill ticks at 1.08-1.32x their program time, all
# paced at 1.79x, one c=1 tick's 1.63 x the 10% margin; the group's first tokens promised
# 706-731 ms, made by 475-508; docs/architecture.md, "The tick log").
PREFILL_TICK_QUANTILE = 0.5
# ... and from SHAPE_SAMPLES prefill ticks of one slice shape on, that shape's ticks at the
# median of its own steps: the served steps err from their program by shape (one tick log:
# a lone c=1 prompt's 32-token step at 1.2-1.4x, beside its request's parsing; a burst's
# 64-token steps at 1.08-1.23x), and one median for all paced the burst's ticks at 1.46x.
SHAPE_SAMPLES = 4
# Ticks just after an idle spell are not paced from. Measured on this host (compiled
# smollm2-135m bf16, batch-1 decode steps of 14.5 ms back to back): after 0.05 s idle none
# slower; after 0.3, 1 and 3 s idle the first 4-8 steps ran 1.2-1.7x slower (85-140 ms
# in all), then back to 14.5. Every stream arriving after a pause begins with such ticks
# (its prefill and first decode steps), and a pace fed with them (the prefill pacer
# re-paces on the median of 4) held every later first token at 2-4x its step: a peer run
# whose warm-up prefills took 80-129 ms against 33 ms of program promised c=8's first
# tokens at 842 ms against 249 in the run before (bench/peer_vllm.py; BENCHMARKS.md). Such
# ticks still count and log an overrun.
# COLD_IDLE_S: an idle spell at least this long (engine waiting for work) makes the ticks
# that start within COLD_WINDOW_S after it cold (scheduler/simulate.py, which mirrors it).
# A request promised while the engine is cold (idle, or in the cold window) gets, on its
# first token and so on every token, the median over the last COLD_SPELLS cold spells of
# how far their ticks ran past their pace (`Engine.cold_s`): measured on the fourteenth
# session's host, the c=8 load's first wave (after a quiet wait) made its first b8 decode
# step in 110 ms against 33.5 paced, and its 8 streams came late for 10 ticks, 7.9-8.6% of
# the load's ticks (bench/peer_vllm.py; docs/architecture.md, "Where it falls short").
COLD_SPELLS = 16
# ... once COLD_MIN spells are measured: the median of one or two is their worst, and a
# promise made with it idles the engine until it is due, so the next wave comes cold too
# and the allowance holds itself up. Measured: a 4 s host stall in a fresh server's warm-up
# (decode steps up to 660 ms) became a 650 ms allowance, and every c=8 wave and burst after
# it was promised 760-860 ms while its first tokens were made by 36-185 (bench/peer_vllm.py,
# out/s23-lead2; BENCHMARKS.md, "Twenty-third session").
COLD_MIN = 3
# A stream's first tokens have no lead: the first is made at its promise's prefill tick,
# and the decode ticks after it build the lead that absorbs a slow step later on. Measured
# (three tick logs of bench/peer_vllm.py's and bench/promise_misses.py's loads, made time
# against promised time by token index): 10.8-16.7% of the first two tokens of a stream
# were made late, by up to 17 and 37 ms, 1-10% of tokens 2-5, and none or ~1% from the
# eighth on, at the pace's 95th percentile or its 80th. So every promise adds a start lead
# (`Engine.start_lead_s`): the `start_lead_quantile` of how late the last START_SAMPLES
# streams' first START_TOKENS tokens would have been made without it (their worst, each; 0
# if none was late), once START_MIN streams have been measured; a stream promised cold
# (COLD_IDLE_S) is the cold allowance's, not counted (with it, a fresh server's first
# stream, 33-39 ms late at its second token, set a 33 ms lead on every c=1 request: TTFT p50
# 61 ms against 31). A first token then comes that much later, and every token after it
# keeps the stream's cadence. Most of the late starts above were cold streams: with them
# apart, the lead was 0-3 ms in the session's last runs (a warm stream's start late by up
# to 8 ms, rarely); cold streams' starts (c=8's first wave 14 ms late) are the cold
# allowance's, which measures ticks, not their streams' tokens (docs/architecture.md).
START_TOKENS = 8
START_SAMPLES = 64
START_MIN = 8
LEAD_TOLERANCE_S = 0.0005  # a lead that moved less stays: requests a moment apart get the same one
# Prefill ticks are few (one in 33 at c=1): they re-estimate from 16 of their own, every
# 16, not 128 every 64. With 128, a start-up measured in a slow minute (prefill scale
# 1.8-2.8 on this host, where served steps ran at 1.1-1.3x) held every first token late
# through a whole benchmark: c=8's TTFT p50 1666 ms against 650 in the run before.
PACE_SAMPLES = {PREFILL: 16, DECODE: 128, MIXED: 128}
# And a phase's steps that run slower than its pace re-pace it after this many of them
# (the median, Pacer.fast_window). Prefill after 4: served, a first token's prefill runs
# beside its request's parsing and the last stream's end on the front end and the client,
# and took 85-90 ms where the start-up measured 72 and paced it 80.6-82.2 (the same step
# alone, idle before it or not: 62-65 ms); with 16, a c=1 run of 12 requests (14 prefill
# ticks with its warm-up) could not re-pace prefill at all, and a late first token makes
# its stream's next tokens late until the lead is won back.
PACE_FAST = {PREFILL: 4, DECODE: 16, MIXED: 16}


@dataclass(frozen=True)
class EngineConfig:
    deterministic: bool = True  # pace ticks to the program; False: run steps back to back
    time_scale: float = 1.0  # program seconds -> wall seconds (simulated pools run slower)
    prefill_scale: float = 0.0  # the same for prefill steps, measured apart (0: time_scale)
    # Seconds after a held token's promised time before a step that would overlap it starts
    # (`align_to_deliveries`): the front end sends it and the client reads it meanwhile.
    # Spent from the streams' lead, not added to any tick: it opened every tick, and paced
    # every tick 1.5 ms longer, until the ticks followed the work (side by side: tokens/s at
    # c=1 and c=8 0.83 and 0.90 of --throughput with it in every tick, 0.91 and 0.99
    # without, as many tokens within their bound; none at all: the aligned steps started as
    # the tokens went and 42-51% were within their bound, against 85-87%; bench/peer_vllm.py's
    # loads, BENCHMARKS.md). 5 ms, not 1.5: a token's way to a client takes up to 3-4 ms
    # here with idle cores (bench/delivery_floor.py), and 8 streams' tokens fall due at one
    # instant at c=8; side by side in two runs, tokens within their bound 92-93% -> 96% at
    # c=1, 49-54% -> 59-66% at c=8, 46-60% -> 63-81% in the burst, the same at 2 req/s,
    # tokens/s within the runs' noise (BENCHMARKS.md, "A wider guard after each delivery").
    guard_band_s: float = 0.005
    max_queue: int = 64  # requests waiting beyond the free slots past this are refused at once
    # And this fraction of the predicted step: the margin that absorbs the host's jitter
    # (gRPC and the client share its cores), so steps finish inside their tick. The first
    # ticks' margin; then the pace follows the measured steps (adaptive_pacing).
    guard_band_frac: float = 0.20
    # The margin over the served steps' quantile once a phase paces from its own ticks
    # (server/core/pacing.py); None: guard_band_frac. `serve` sets it apart when it measured
    # the band at start (server/core/build.py): the quantile of the served ticks measures
    # their jitter itself, and a start-up measured in a noisy second (a band of 28.8%) held
    # every later pace 17% above the usual start's 10% through a whole benchmark.
    pace_margin: float | None = None
    # The first prefill ticks' band apart (None: guard_band_frac). `serve` sets it to the
    # measured jitter (at least MIN_GUARD, server/core/build.py), not the decode ticks' wider
    # start-up floor: a fresh server's prefill steps ran within it, and a prefill pacer
    # re-estimates only after 16 of its own ticks (16 requests at c=1).
    prefill_guard_frac: float | None = None
    adaptive_pacing: bool = True
    # The quantile of the served decode and mixed steps their pace covers (PREFILL_QUANTILE for prefill).
    pace_quantile: float = 0.95
    prefill_quantile: float = PREFILL_QUANTILE  # the same for prefill ticks (`serve --prefill-quantile`)
    # Prefill ticks at their median and one tick's tail per first token (PREFILL_TICK_QUANTILE;
    # `serve --prefill-tails one`), or every prefill tick at `prefill_quantile` (`each`).
    prefill_tail_once: bool = True
    # A request arriving alone is promised its own decode step (False: the longest tick, as
    # in company; `lockstep serve --alone-tpot company`). docs/architecture.md, "Promises per request".
    alone_own_step: bool = True
    # The share of the mixed tick's excess over the decode tick that a stream promised in
    # company pays on every token (scheduler/ticks.TickScheduler.join_share; `serve
    # --join-share`): 1.0 promises the longest tick; below it prompts go in beside streams
    # as their banked slack allows. docs/architecture.md, "Joins paid from slack".
    join_share: float = JOIN_SHARE
    # The quantile of the last streams' start lateness every promise adds as a lead (START_TOKENS;
    # `serve --start-lead-quantile`); 0: none.
    start_lead_quantile: float = START_LEAD_QUANTILE
    # A request that finds nothing running or waiting (earlier streams may still be handed
    # out) opens an admission window this long, seconds: those arriving within it join its
    # arrival group and all are promised together when it closes (at this bound, or when
    # the tick that makes a member's first token ends, whichever comes first: their prompts
    # go in meanwhile, so the window delays the promise, not the first token). 0: no windows. Measured: 8
    # simultaneous streaming clients (Python threads) reach the server over 6-29 ms; without
    # a window the first was promised its own step and the other seven waited 1.3-2.9 s
    # for its stream; with 20 ms, two of the 8 came too late once (docs/architecture.md,
    # "Arrival groups").
    admission_window_s: float = 0.050
    # Before a window closes on a member's first token, this long for the arrivals that
    # came during its step to join it (Engine._let_arrivals_in; none by default: WINDOW_GRACE_S).
    window_grace_s: float = WINDOW_GRACE_S
    # A step that would overlap a held token's promised time starts just after it, while
    # every stream keeps its lead (Engine._quiet_until). False: steps back to back.
    align_to_deliveries: bool = True


@dataclass(frozen=True)
class Finished:
    """The engine's last word on a request (the client side builds the outcome from it)."""

    # length | stop | cancelled | error (this row failed) | unavailable (the engine died)
    # | shutdown (the engine was stopped with the request still in it)
    reason: str
    message: str = ""


class EngineDown(RuntimeError):
    """`submit` after the engine loop ended."""


@dataclass(eq=False)
class Request:
    """One generation. `emit` is called from the engine thread with (token_id, tick,
    perf_counter seconds) for each token and (Finished, tick, seconds) once at the end;
    it must be cheap and thread-safe."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop_ids: frozenset[int]
    emit: Callable
    arrival_s: float = field(default_factory=time.perf_counter)
    predicted_ttft_s: float = 0.0
    predicted_e2e_s: float = 0.0
    predicted_tpot_s: float = 0.0  # (e2e - TTFT) / (max_tokens - 1) of the admission prediction; 0 for one token
    cancelled: bool = False  # set by the client side; the engine retires it next tick
    group: int = -1  # pipelined engine: the row group admission chose (-1: let submit choose)
    # Engine state.
    seq: Seq | None = None  # the scheduler's view, from submit on
    out: list[int] = field(default_factory=list)
    admitted_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    made_s: list[float] = field(default_factory=list)  # perf_counter s each token was sampled (tick log on)
    # Each phase's pace factor when it was queued (the tick log's record of what its promise was made at).
    factors: dict[str, float] = field(default_factory=dict)
    lead_s: float = 0.0  # the start lead its promise includes (Engine.start_lead_s)
    cold: bool = False  # promised cold (COLD_IDLE_S): its start is the cold allowance's to cover, not the lead's
    start_late_s: float = -math.inf  # its worst token of the first START_TOKENS against its promise less the lead

    def promise(self, ttft_s: float, e2e_s: float) -> None:
        """Records what admission promised: first token and last token, seconds from arrival."""
        self.predicted_ttft_s, self.predicted_e2e_s = ttft_s, e2e_s
        self.predicted_tpot_s = (e2e_s - ttft_s) / (self.max_tokens - 1) if self.max_tokens > 1 else 0.0

    def due_s(self, k: int) -> float:
        """When token k (0: the first) is promised, perf_counter seconds: arrival + TTFT + k x TPOT."""
        return self.arrival_s + self.predicted_ttft_s + k * self.predicted_tpot_s


class Engine:
    prefill_tail = True  # prefill ticks at their median + one tick's tail per first token (PREFILL_TICK_QUANTILE)
    start_lead = True  # promises add the lead the last streams' first tokens needed (START_TOKENS)

    def __init__(self, executor, program: ProgramView, config: EngineConfig = EngineConfig(), metrics=None):
        self.executor = executor
        self.config = config
        self.metrics = metrics
        self.program = program
        self.max_slots, self.max_context = program.max_slots, program.max_context
        self.sched = program.tick_scheduler(config.max_queue)
        self._lock = threading.Condition()  # guards sched and _requests (an RLock inside)
        self._requests: dict[int, Request] = {}  # seq_id -> request, waiting or running
        self._ids = itertools.count()
        # One pacer per phase: their predictions err differently (measured on small: decode
        # 0.95-1.01 of predicted, prefill 1.18), and one factor for all let prefill ticks
        # slow the decode cadence by 20%.
        scales = {PREFILL: config.prefill_scale or config.time_scale, DECODE: config.time_scale,
                  MIXED: config.time_scale}
        # Their margin over the measured steps' quantile is the guard band too.
        quantiles = {PREFILL: config.prefill_quantile, DECODE: config.pace_quantile, MIXED: config.pace_quantile}
        tail_once = self.prefill_tail and config.prefill_tail_once
        if tail_once:  # prefill ticks at their median, a first token's promise with one tick's tail
            quantiles[PREFILL] = min(PREFILL_TICK_QUANTILE, config.prefill_quantile)

        bands = {phase: config.guard_band_frac for phase in (PREFILL, DECODE, MIXED)}
        if config.prefill_guard_frac is not None:
            bands[PREFILL] = config.prefill_guard_frac
        self.pacers = {phase: Pacer(scales[phase] * (1 + bands[phase]), adaptive=config.adaptive_pacing,
                                    margin=config.guard_band_frac if config.pace_margin is None else config.pace_margin,
                                    quantile=quantiles[phase],
                                    min_samples=PACE_SAMPLES[phase], every=min(64, PACE_SAMPLES[phase]),
                                    fast_window=PACE_FAST[phase])
                       for phase in (PREFILL, DECODE, MIXED)}
        # The same prefill ticks at `prefill_quantile`: what one tick before a first token may take.
        self._tail = self.pacers[PREFILL].fresh(quantile=config.prefill_quantile) if tail_once else None
        self._tails: dict[StepKey, float] = {}  # prefill shape -> seconds of its tail (`tail_s`)
        # Prefill slice tokens -> the pacer of that shape's ticks (SHAPE_SAMPLES; with the tail only).
        self._shapes: dict[int, Pacer] = {}
        self._ticks: dict[StepKey, float] = {}  # wall seconds per tick shape, at the pace now
        self._cold_spells: collections.deque = collections.deque(maxlen=COLD_SPELLS)  # each past spell's excess, s
        self._start_lates: collections.deque = collections.deque(maxlen=START_SAMPLES)  # each stream's, s (>= 0)
        self._lead_s = 0.0  # the start lead promises add now (`start_lead_s`)
        self._leads = self.start_lead and config.deterministic and config.start_lead_quantile > 0
        # The pace the metrics were last told (`_report_pace`); None while the engine is built:
        # the factors go with the ready message (its tails are 0 then, the cold allowance too).
        self._reported: Pace | None = None
        self._repace()
        self._reported = self.pace()
        if config.deterministic and self.sched is not None:
            self.sched.tick_s = self.tick_s  # promised cadences bound the ticks (scheduler/ticks.py)
            self.sched.alone_own_step = config.alone_own_step
            self.sched.join_share = config.join_share
        self._last_promise = (time.perf_counter(), 0.0)  # (perf_counter s, predicted TTFT s) of the last admitted
        # seq_id -> perf_counter s of its last token's promised time: its max_tokens-th while
        # it runs, its last real one once it ended (a stop token ends a stream early).
        self._delivery_ends: dict[int, float] = {}
        self._in_flight: tuple[TickPlan, float] | None = None  # the tick running now, and when it began
        self._last_step_s = 0.0  # the last step's measured seconds (what the next one will likely take)
        self._last_tick_end = time.perf_counter()  # when the last tick (or the engine's build) ended
        self._cold_until = 0.0  # perf_counter s: ticks starting before it follow an idle spell (COLD_IDLE_S)
        self._cold_excess = 0.0  # s the cold ticks under way ran past their pace, summed
        self._in_cold = False  # the last tick was cold
        # The open admission window (its members: Requests queued, promises pending; its
        # closes_s: perf_counter s); None when no window is open.
        self._window: ArrivalWindow | None = None
        self._groups = itertools.count()
        self.on_group_close: Callable[[list[Request], list[Request]], None] | None = None  # (promised, ended), under the lock
        # Called on the engine thread, no lock held, before a step that follows one that made a
        # first token (the core process: its output thread sends that token first,
        # server/core/process.py). A first token has no lead, so `_quiet_until` never holds
        # the next step for its delivery; later tokens go out while the engine waits for
        # their promised times (the lock's wait releases the GIL) or ride with the next.
        self.before_step: Callable[[], object] | None = None
        self._first_out = False  # a tick made a first token since the last `before_step`
        self._stop = False
        self.accepting = True
        self.ticks = 0
        self.overruns = 0
        self._done: concurrent.futures.Future | None = None
        self.failure: BaseException | None = None  # why the loop ended, if it died
        self.on_death: Callable[[BaseException], None] | None = None  # called once, from the engine thread
        # `serve --tick-log`: a line-buffered text file that gets one JSON line per tick and
        # one per request that ended (docs/architecture.md, "The tick log"); None: off.
        self.tick_log = None
        self._t0 = time.perf_counter()  # the tick log's times count from here

    # -- client side (any thread) --------------------------------------------------
    def start(self, thread: concurrent.futures.Executor | None = None) -> None:
        """Runs the loop on `thread` (a one-worker executor that owns every torch op of
        this process; see app.LockstepServer), or on a new thread."""
        thread = thread or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lockstep-engine")
        self._done = thread.submit(self._loop)

    def tick_s(self, key: StepKey) -> float:
        """Wall seconds a paced tick of this step shape lasts (scheduler/simulate.py,
        `paced_ticks`): its own step times its phase's pace factor.
        Ticks follow the work; what keeps a stream's promised pace is its cadence, which
        bounds every tick while it runs (scheduler/ticks.py)."""
        return self._ticks[key]

    def tail_s(self, key: StepKey) -> float:
        """Seconds a prefill tick of this shape may run past its paced time, at the pace of
        `prefill_quantile` (0 for other phases): a first token's promise adds the longest of
        its prefill ticks' (scheduler/simulate.py, `predict_arrival`)."""
        return self._tails.get(key, 0.0)

    def factors(self) -> dict[str, float]:
        """Each phase's pace factor now."""
        return {phase: pacer.factor for phase, pacer in self.pacers.items()}

    def pace(self) -> Pace:
        """What every promise's tick times come from now (scheduler/simulate.py, `Pace`):
        the phases' factors, the prefill shapes paced from their own ticks, the tail's
        factor, the cold allowance and the start lead."""
        shapes = {n: sp.factor for n, sp in self._shapes.items() if sp.samples >= sp.min_samples}
        return Pace(self.factors(), shapes, None if self._tail is None else self._tail.factor, self._cold_allowance(),
                    self._lead_s)

    def start_lead_s(self) -> float:
        """Seconds every promise adds now: the `start_lead_quantile` of how late the last
        START_SAMPLES streams' first START_TOKENS tokens would have been made without a lead
        (Pace.lead_s); 0 before START_MIN of them, in throughput mode, or when off."""
        return self._lead_s

    def _measure_start(self, r: Request, now: float) -> None:
        """Books token len(r.out) - 1, made at `now`, into its stream's start lateness; the
        stream's worst goes into the lead once its first START_TOKENS tokens are made."""
        k = len(r.out) - 1
        r.start_late_s = max(r.start_late_s, now - (r.due_s(k) - r.lead_s))
        if k + 1 < min(START_TOKENS, r.max_tokens):
            return
        self._start_lates.append(max(0.0, r.start_late_s))
        if len(self._start_lates) >= START_MIN:
            # The lower order statistic (numpy's "lower"): of fewer than 1 / (1 - q) streams,
            # never the worst one (a host stall made one stream 630 ms late, and its lead then
            # held every first token 630 ms: c=8's TTFT p50 824 ms against 153).
            lates = sorted(self._start_lates)
            lead = lates[int(self.config.start_lead_quantile * (len(lates) - 1))]
            if abs(lead - self._lead_s) > LEAD_TOLERANCE_S:  # noise does not move every promise
                self._lead_s = lead
                self._report_pace()

    def _cold_allowance(self) -> float:
        """What a promise made cold adds (`cold_s`, Pace.cold_s): the median of the last
        COLD_SPELLS spells' excess; 0 in throughput mode or before COLD_MIN spells."""
        spells = self._cold_spells
        return statistics.median(spells) if self.config.deterministic and len(spells) >= COLD_MIN else 0.0

    def _repace(self) -> None:
        pace = self.pace()
        # Swapped whole: `predict` on another thread reads one table or the other.
        self._ticks, self._tails = pace.tables(self.program)
        self._report_pace(pace)

    def _report_pace(self, pace: Pace | None = None) -> None:
        """Tells the metrics the pace when it moved (serve records it for `lockstep simulate`)."""
        pace = pace or self.pace()
        if self.metrics is not None and self._reported is not None and pace != self._reported:
            self._reported = pace
            self.metrics.set_pace_state(pace.to_json())

    def predict(self, prompt_len: int, max_tokens: int) -> tuple[float, float]:
        """(TTFT, end-to-end) in seconds for a request arriving now: the scheduler's
        current state run forward over the paced tick times, from what is left of the
        tick in flight (a request arriving mid-tick is admitted at its end), + the cold
        allowance when cold and the start lead."""
        with self._lock:
            snapshot, in_flight = self.sched.clone(), self._in_flight
            now = time.perf_counter()
            snapshot.delivering = self._delivering(now)
            cold = self.cold_s(now)
        ticks, tails = self._ticks, self._tails  # the pace now, read once
        if snapshot.tick_s is not None:
            snapshot.tick_s = ticks.__getitem__
        tail = tails.get if self.config.deterministic and tails else None
        plan, began = in_flight or (None, now)
        ttft, e2e = predict_arrival(snapshot, prompt_len, max_tokens, ticks.__getitem__, clone=False, in_flight=plan,
                                    elapsed_s=time.perf_counter() - began, tail_s=tail)
        lead = self._lead_s
        return ttft + cold + lead, e2e + cold + lead

    def cold_s(self, now: float) -> float:
        """Under the lock: seconds a promise made at `now` adds for a start after an idle
        spell (COLD_IDLE_S): the median over the last COLD_SPELLS spells of how far their cold
        ticks ran past their pace; 0 while the engine is warm, in throughput mode, or before
        COLD_MIN spells."""
        return self._cold_allowance() if self._promised_cold(now) else 0.0

    def _promised_cold(self, now: float) -> bool:
        """Under the lock: whether a promise made at `now` is made cold (`promised_cold`)."""
        return promised_cold(now, self._cold_until, self.sched.idle(), self._last_tick_end)

    def predict_placed(self, prompt_len: int, max_tokens: int) -> tuple[float, float, int]:
        """`predict`, and where the request would go (a pipelined engine's row group; 0 here)."""
        return (*self.predict(prompt_len, max_tokens), 0)

    @property
    def up(self) -> bool:
        return self.failure is None

    def queue_full(self) -> str | None:
        """Why a request arriving now would be refused for room, or None. Checked before
        `predict` (a refusal must not pay for a simulation: in a 10x burst that made each
        refusal ~2 ms of the event loop); the message gives the promise made to the last
        request admitted instead."""
        with self._lock:
            if not self._full():
                return None
            at, ttft = self._last_promise
        return queue_full_message(self.config.max_queue, time.perf_counter() - at, ttft)

    def submit(self, request: Request) -> None:
        """Queues a request (the caller validated it). Raises OverflowError past max_queue
        and EngineDown once the loop has died."""
        with self._lock:
            if self.failure is not None:
                raise EngineDown(f"engine stopped: {self.failure!r}"[:300])
            seq = Seq(next(self._ids), len(request.prompt), request.max_tokens, request.stop_ids,
                      cadence_s=request.predicted_tpot_s if self.config.deterministic else 0.0,
                      ticks=self._ticks.__getitem__)  # the pace its promise was made at
            # What `predict` added, unless the lead moved in between (then this one stream's start is
            # measured against the newer lead: off by at most that move, once).
            request.lead_s = self._lead_s
            # Before it is queued: idle or not (a pipelined engine has no one scheduler, nor a lead).
            request.cold = self._leads and self._promised_cold(time.perf_counter())
            self._sched_for(request).add(seq)  # OverflowError when the queue is full
            request.seq = seq
            if self.tick_log is not None:
                request.factors = self.factors()
            self._requests[seq.seq_id] = request
            self._last_promise = (request.arrival_s, request.predicted_ttft_s)
            self._delivery_ends[seq.seq_id] = request.arrival_s + request.predicted_e2e_s
            self._lock.notify()

    def _delivering(self, now: float) -> bool:
        """Under the lock: whether an earlier stream is still being handed out at `now`
        (forgetting those handed out in full)."""
        for seq_id in [i for i, end in self._delivery_ends.items() if end <= now]:
            del self._delivery_ends[seq_id]
        return bool(self._delivery_ends)

    def window_closes_at(self) -> float | None:
        """When the open admission window closes (perf_counter s), or None."""
        window = self._window
        return None if window is None else window.closes_s

    def submit_windowed(self, request: Request) -> bool:
        """Under the lock: queues `request` in the open admission window, or opens one with
        it if nothing runs or waits (earlier streams may still be handed out: a closed
        loop's next wave comes back together); False (nothing queued) when neither, and the
        caller admits it as usual. Its promise comes with its group's (`close_window`).
        Raises as `submit`."""
        if not self.config.deterministic or self.config.admission_window_s <= 0 or self.sched is None:
            return False
        if self._window is None:
            if not self.sched.idle():
                return False
            now = time.perf_counter()
            self._window = ArrivalWindow(now + self.config.admission_window_s, next(self._groups), [],
                                         not self._delivering(now))
        members, group = self._window.members, self._window.group
        if self.failure is not None:
            raise EngineDown(f"engine stopped: {self.failure!r}"[:300])
        seq = Seq(next(self._ids), len(request.prompt), request.max_tokens, request.stop_ids, group=group)
        cold = self._promised_cold(time.perf_counter())  # at its arrival, not at the window's close
        self.sched.add(seq)  # OverflowError when the queue is full
        request.seq, request.cold = seq, cold
        self._requests[seq.seq_id] = request
        members.append(request)
        self._lock.notify()
        return True

    def close_window(self, ended: bool = False) -> list[Request]:
        """Under the lock: promises the open window's members together (one run forward of
        the scheduler with all of them: scheduler/simulate.promise_group), from what is left
        of the tick in flight (`ended`: its step has run, as when it made a member's first
        token); tells `on_group_close`; returns the members promised."""
        if self._window is None:
            return []
        members, alone = self._window.members, self._window.alone
        self._window = None
        live = [r for r in members if r.seq.seq_id in self._requests]
        if live:
            ticks, tails = self._ticks, self._tails
            snapshot = self.sched.clone()
            snapshot.tick_s = ticks.__getitem__
            now = time.perf_counter()
            plan, began = self._in_flight or (None, now)
            promises = promise_group(snapshot, [r.seq for r in live], ticks.__getitem__, alone, in_flight=plan,
                                     elapsed_s=now - began, tail_s=tails.get if tails else None,
                                     ended=ended and plan is not None)
            cold, lead = self.cold_s(now), self._lead_s
            for r in live:
                ttft, cadence = promises[r.seq.seq_id]
                r.lead_s = lead
                # Promises count from each one's arrival (+ a cold start's allowance, + the start lead).
                offset = now - r.arrival_s + cold + lead
                r.promise(offset + ttft, offset + ttft + (r.max_tokens - 1) * cadence)
                r.seq.cadence_s, r.seq.ticks = r.predicted_tpot_s, ticks.__getitem__
                if self.tick_log is not None:
                    r.factors = self.factors()
                self._delivery_ends[r.seq.seq_id] = r.arrival_s + r.predicted_e2e_s
                self._last_promise = (r.arrival_s, r.predicted_ttft_s)
        if self.on_group_close is not None:
            self.on_group_close(live, [r for r in members if r not in live])
        return live

    def status(self) -> dict:
        with self._lock:
            running, waiting, free = self._occupancy()
            return {"queue_length": waiting, "running": running,
                    "slots_in_use": self.max_slots - free, "max_slots": self.max_slots,
                    "ticks": self.ticks, "overruns": self.overruns, "accepting": self.accepting,
                    "max_queue": self.config.max_queue, "engine_up": self.up,
                    "pace_factor": self.pacers[DECODE].factor,
                    "repaces": sum(p.repaces for p in self.pacers.values())}

    def wake(self) -> None:
        with self._lock:
            self._lock.notify()

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._done is not None:
            concurrent.futures.wait([self._done], timeout_s)

    def idle(self) -> bool:
        with self._lock:
            return self.sched.idle()

    def fail(self, exc: BaseException) -> None:
        """From any thread, once: the engine stops for `exc` (its loop raised it, or the
        executor broke while no step ran: a stage actor died). Every request ends
        "unavailable", `submit` refuses from then on, the loop ends, `on_death` is told."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure, self.accepting, self._stop = exc, False, True
            self._lock.notify()
        traceback.print_exception(exc)
        self._end_all("unavailable", f"engine stopped: {type(exc).__name__}: {exc}"[:300])
        if self.on_death is not None:
            self.on_death(exc)

    # -- engine thread ---------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # a dead engine must not look alive: stop admitting, say why
            self.fail(exc)
            raise

    def _end_all(self, reason: str, message: str) -> None:
        with self._lock:
            for r in list(self._requests.values()):
                self._sched_of(r.seq).abort(r.seq)
                self._finish(r, reason, message)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop and self.sched.idle():
                    self._lock.wait()
                if self._stop:
                    break
                quiet = self._quiet_until(time.perf_counter())
                if quiet is not None:  # a submit, cancel or stop wakes it at once
                    self._lock.wait(max(0.0, quiet + self.config.guard_band_s - time.perf_counter()))
                    if self._stop:
                        break
                for r in [r for r in self._requests.values() if r.cancelled]:
                    self.sched.abort(r.seq)
                    self._finish(r, "cancelled")
                plan = self.sched.schedule()
                now = time.perf_counter()
                self._in_flight = None if plan is None else (plan, now)
                for seq in self.sched.running:
                    r = self._requests[seq.seq_id]
                    r.admitted_s = r.admitted_s or now
            if plan is not None:
                if self.before_step is not None and self._first_out:
                    self._first_out = False
                    self.before_step()
                self._tick(plan)
        if self.failure is None:  # else fail() ended them "unavailable"
            self._end_all("shutdown", "server is shutting down")

    def _quiet_until(self, now: float) -> float | None:
        """Under the lock: when the next step should start if not now (perf_counter s), or
        None. Ticks follow the work, so the engine runs ahead of its promises and a held
        token goes out while a step runs: the front end's and the client's work for it then
        takes a core from the step's two threads, and the step waits for the slower one.
        When the next step would overlap the next promised token time (of a token already
        made) and every stream keeps two paced ticks of lead past it, the step starts just
        after it instead (`guard_band_s` after): a sent token's work runs beside no step.
        Measured side by side (bench/peer_vllm.py's loads, one server each way in one run;
        BENCHMARKS.md): the served steps set a pace 3.7-3.9% lower at every load (ITL
        p50), tokens/s 0.5-6% higher, first tokens 4-19% sooner, more tokens within their
        bound at every load."""
        if not self.config.deterministic or not self.config.align_to_deliveries or self.sched.waiting:
            return None
        step = self._last_step_s
        due = math.inf  # the next promised time of a token made, not yet due
        lead = math.inf  # the least time to the promise of the next token to make
        for seq in self.sched.running:
            r = self._requests[seq.seq_id]
            if not r.predicted_ttft_s or not r.out or not seq.decoding:
                return None  # a first token has no lead (nor a stream promised nothing)
            lead = min(lead, r.due_s(len(r.out)) - now)
            if r.predicted_tpot_s > 0:
                k = max(0, math.ceil((now - r.due_s(0)) / r.predicted_tpot_s))  # the next token due
                if k < len(r.out):
                    due = min(due, r.due_s(k))
        if due - now > step or lead - (due - now) < 2 * step:
            return None
        return due

    def _batch(self, plan: TickPlan, rows: tuple[Seq, ...]) -> StepBatch:
        """The step of `plan`, for `rows` (all of its rows, or one of them when a failed step
        is retried row by row)."""
        reqs, kept = [], []
        decode_tokens, decode_positions, slice_tokens, slice_positions = [], [], [], []
        for i, seq in enumerate(plan.rows):
            if seq not in rows:
                continue
            r = self._requests[seq.seq_id]
            reqs.append(r)
            kept.append(seq)
            if plan.is_slice(i):
                start, n = plan.span(i)
                slice_tokens.append(tuple(r.prompt[start:start + n]))
                slice_positions.append(start)
            else:
                decode_tokens.append((r.out[-1],))
                decode_positions.append(len(r.prompt) + len(r.out) - 1)
        slots, sampling = tuple(s.slot for s in kept), tuple(r.sampling for r in reqs)
        if not decode_tokens:  # a prefill step, or a mixed step's slices alone in a retry
            return StepBatch(PREFILL, 1, plan.shape if plan.phase == PREFILL else slice_shape(
                sum(map(len, slice_tokens)), self.program.prefill_chunk), slots, tuple(slice_tokens),
                tuple(slice_positions), sampling)
        if not slice_tokens:
            return StepBatch(DECODE, self._bucket_for(len(decode_tokens)), 1, slots, tuple(decode_tokens),
                             tuple(decode_positions), sampling)
        return StepBatch(MIXED, self._bucket_for(len(decode_tokens)), plan.shape, slots,
                         (*decode_tokens, *slice_tokens), (*decode_positions, *slice_positions), sampling)

    def _bucket_for(self, rows: int) -> int:
        return next(b for b in self.program.buckets if b >= rows)

    def _step(self, plan: TickPlan) -> dict[int, int]:
        """Runs the plan; returns seq_id -> sampled id for the rows that succeeded."""
        try:
            ids = self.executor.step(self._batch(plan, plan.rows)).token_ids
            return {s.seq_id: t for s, t in zip(plan.rows, ids)}
        except ExecutorFailed:
            raise
        except Exception as exc:
            return self._rows_alone(plan, exc)

    def _rows_alone(self, plan: TickPlan, exc: Exception) -> dict[int, int]:
        """After the plan's batched step raised `exc`: runs it again row by row (rows are
        independent and rewriting a KV position writes the same values, so the survivors'
        tokens are those of the batched step); a row that fails alone ends with reason "error"."""
        if len(plan.rows) == 1:
            self._fail_row(plan.rows[0], exc)
            return {}
        done = {}
        for seq in plan.rows:
            try:
                done[seq.seq_id] = self.executor.step(self._batch(plan, (seq,))).token_ids[0]
            except ExecutorFailed:
                raise
            except Exception as exc:
                self._fail_row(seq, exc)
        return done

    def _sched_for(self, request: Request):
        """Under the lock: the tick scheduler `request` goes to (the pipelined engine has
        one per row group)."""
        return self.sched

    def _sched_of(self, seq: Seq):
        """The tick scheduler `seq` is in (while its request is in the engine)."""
        return self.sched

    def _fail_row(self, seq: Seq, exc: Exception) -> None:
        traceback.print_exception(exc)
        with self._lock:
            r = self._requests[seq.seq_id]
            self._sched_of(seq).abort(seq)
            self._finish(r, "error", f"request {r.request_id!r} failed in its step: {type(exc).__name__}: {exc}"[:300])

    def _tick(self, plan: TickPlan) -> None:
        step_start = time.perf_counter()
        if step_start - self._last_tick_end >= COLD_IDLE_S:
            self._end_cold_spell()  # one spell per idle spell, even with no warm tick between
            self._cold_until = step_start + COLD_WINDOW_S
        cold = step_start < self._cold_until
        tokens = self._step(plan)
        measured = time.perf_counter() - step_start
        self._last_step_s = measured
        window = self._window  # read once: the core's input thread may close it meanwhile
        if window is not None and plan.samples_for(window.group):
            with self._lock:  # promises before tokens: the window closes now at the latest
                self._let_arrivals_in(self.config.window_grace_s)
                self.close_window(ended=True)
        now = time.perf_counter()
        # Ticks follow the work, back to back: the engine runs ahead of its promises where
        # steps are shorter than their paced ticks, and a token made early waits for its
        # promised time at the front end (server/frontend/delivery.py); an overrun is a
        # token made after it (made: when its step ended, before a window closed on it and
        # promised it from then). The lead absorbs a slow step.
        overrun = self.config.deterministic and self._late(plan, tokens, step_start + measured)
        self._account(plan, self.sched, tokens, measured, overrun, now, cold)
        self._last_tick_end = time.perf_counter()

    def _let_arrivals_in(self, seconds: float) -> None:
        """Under the lock: releases it (and the GIL) for `seconds` before a window closes on
        its first token, so that arrivals that came during the step join the window. A
        compiled step holds the GIL throughout (server/core/process.py, Outbox.flush), so the
        core's input thread reads nothing while it runs: a burst whose later arrivals reached
        the core during its first prompt's step (the door reads eight simultaneous requests
        over 0-10 ms) found the window closed as that step ended, and went in one by one as
        mixed-step slices (one tick log: the last of eight first tokens promised at 449 ms
        against 208 for the bursts that made the window; docs/architecture.md, "Arrival
        groups"). Off by default (WINDOW_GRACE_S: the groups it makes cost more than the
        trickles it saves)."""
        end = time.perf_counter() + seconds
        while (left := end - time.perf_counter()) > 0:
            self._lock.wait(left)  # a submit notifies: wait out the rest

    def _late(self, plan: TickPlan, tokens: dict[int, int], made: float) -> bool:
        """Whether any token of this tick, made at `made` (perf_counter s), comes after the
        time its request was promised it."""
        for i, seq in enumerate(plan.rows):
            r = self._requests.get(seq.seq_id)
            if r is None or seq.seq_id not in tokens or not r.predicted_ttft_s:
                continue
            if not plan.samples(i):
                continue  # a slice that does not end its prompt: no token
            if made > r.due_s(len(r.out)):
                return True
        return False

    def _account(self, plan: TickPlan, sched, tokens: dict[int, int], measured: float, overrun: bool,
                 now: float, cold: bool = False) -> None:
        """After a step of `plan` (planned by `sched`) that took `measured` seconds: counts
        it, lets its phase's pacer see it (unless `cold`: it started just after an idle
        spell, COLD_IDLE_S), hands out its tokens (at `now`) and ends the requests it
        finished."""
        self.ticks += 1
        self.overruns += overrun
        program_s = self.program.step_s(plan.key)
        paced_s = self.tick_s(plan.key)  # at the pace it ran under, before this tick re-paces
        if overrun:  # rare by design (the pace covers the 95th percentile + 10%): each one is worth a line
            log.warning("tick %d overran (a token came after its promised time): %s step took %.2f ms, paced "
                        "%.2f ms (program %.2f ms)%s", self.ticks, tuple(plan.key), measured * 1e3,
                        paced_s * 1e3, program_s * 1e3, " after an idle spell" if cold else "")
        # Rows that failed ran again alone: such a tick says nothing about the pace.
        if cold:  # how far a start after an idle spell runs past its pace (`cold_s`)
            self._cold_excess += max(0.0, measured - paced_s)
            self._in_cold = True
        elif self._in_cold:
            self._end_cold_spell()
        pacer = self.pacers[plan.phase]
        before = pacer.factor
        counts = not cold and len(tokens) == len(plan.rows)
        if self._tail is not None and plan.phase == PREFILL and counts:
            shape = self._shapes.get(plan.key.tokens)
            if shape is None:
                shape = self._shapes[plan.key.tokens] = self.pacers[PREFILL].fresh(
                    min_samples=SHAPE_SAMPLES, every=SHAPE_SAMPLES, fast_window=SHAPE_SAMPLES)
            shape_moved = shape.observe(measured, program_s) or shape.samples == shape.min_samples
            if self._tail.observe(measured, program_s) or shape_moved:
                self._repace()  # the first tokens' tails (`tail_s`), this shape's ticks
        if counts and pacer.observe(measured, program_s):
            # Phases with few ticks follow the decode pacer until they re-pace themselves:
            # prefill only slower (its start-up scale is measured apart), mixed both ways
            # (it starts from decode's measurement: a slow start-up held the company
            # cadence at 103-105 ms through a 2 req/s run while decode had come down).
            if plan.phase == DECODE:
                for phase, down in ((PREFILL, False), (MIXED, True)):
                    if self.pacers[phase].follow(pacer.factor / before, down) and self.metrics is not None:
                        self.metrics.set_pace(phase, self.pacers[phase].factor, repaced=True)
                if self._tail is not None:
                    self._tail.follow(pacer.factor / before)
            self._repace()
            if self.metrics is not None:
                self.metrics.set_pace(plan.phase, pacer.factor, repaced=True)
        if self.tick_log is not None:
            self._log_tick(plan, tokens, measured, program_s, paced_s, overrun, now, cold)
        with self._lock:
            self._in_flight = None
            for out in sched.update(plan, tokens):
                r = self._requests[out.seq.seq_id]
                if out.token is not None:
                    self._emit(r, out.token, now)
                if out.finish_reason is not None:
                    self._finish(r, out.finish_reason)
            if self.metrics is not None:
                running, waiting, free = self._occupancy()
                self.metrics.set_queue(running, waiting, self.max_slots - free)
        if self.metrics is not None:
            self.metrics.observe_tick(plan.phase, len(plan.rows), measured, program_s * self.config.time_scale, overrun)

    def _end_cold_spell(self) -> None:
        """Records the cold spell under way, if any (`cold_s` reads the last COLD_SPELLS)."""
        if self._in_cold:
            self._cold_spells.append(self._cold_excess)
            self._cold_excess, self._in_cold = 0.0, False
            self._report_pace()

    def _occupancy(self) -> tuple[int, int, int]:
        """(running, waiting, free slots), under the lock."""
        return len(self.sched.running), len(self.sched.waiting), len(self.sched.free_slots)

    def _full(self) -> bool:
        """Under the lock: whether the queue bound refuses an arrival (ticks.queue_is_full, over
        what `_occupancy` counts: every group of a pipelined engine)."""
        _, waiting, free = self._occupancy()
        return queue_is_full(waiting, free, self.config.max_queue)

    def open_tick_log(self, path: str) -> None:
        """Starts the tick log (`serve --tick-log`): appends to `path`, line-buffered (the core
        process ends by os._exit; each line goes whole), a first line saying where its times
        count from: perf_counter and Unix seconds of the engine's start (perf_counter is
        CLOCK_MONOTONIC, one clock for every process of the host)."""
        self.tick_log = open(path, "a", buffering=1, encoding="utf-8")
        self.tick_log.write(json.dumps({"start": {"perf_counter_s": self._t0, "unix_s": time.time() - (
            time.perf_counter() - self._t0), "pid": os.getpid()}}) + "\n")

    def _log_tick(self, plan: TickPlan, tokens: dict[int, int], measured: float, program_s: float, paced_s: float,
                  overrun: bool, now: float, cold: bool) -> None:
        """One tick's line of the tick log (times in ms; `end` from the engine's start)."""
        self.tick_log.write(json.dumps({
            "tick": self.ticks, "end_ms": round((now - self._t0) * 1e3, 3), "phase": plan.phase,
            "key": list(plan.key), "rows": [seq.seq_id for seq in plan.rows], "sampled": len(tokens),
            "measured_ms": round(measured * 1e3, 3), "program_ms": round(program_s * 1e3, 3),
            "paced_ms": round(paced_s * 1e3, 3), "factor": round(self.pacers[plan.phase].factor, 4),
            "overrun": overrun, "cold": cold}) + "\n")

    def _log_request(self, r: Request, reason: str) -> None:
        """A request's line of the tick log, as it ends: what it was promised (seconds from its
        arrival), the pace factors its promise was made at, and when each token was made."""
        self.tick_log.write(json.dumps({
            "request": r.seq.seq_id, "id": r.request_id, "arrival_ms": round((r.arrival_s - self._t0) * 1e3, 3),
            "prompt": len(r.prompt), "max_tokens": r.max_tokens, "reason": reason,
            "ttft_ms": round(r.predicted_ttft_s * 1e3, 3), "tpot_ms": round(r.predicted_tpot_s * 1e3, 3),
            "factors": {p: round(f, 4) for p, f in r.factors.items()}, "lead_ms": round(r.lead_s * 1e3, 3),
            "cold": r.cold,
            "made_ms": [round((t - r.arrival_s) * 1e3, 3) for t in r.made_s]}) + "\n")

    def _emit(self, r: Request, token: int, now: float) -> None:
        if r.first_token_s is None:
            r.first_token_s = now
            self._first_out = True
        r.last_token_s = now
        if self.tick_log is not None:  # only the tick log reads them
            r.made_s.append(now)
        r.out.append(token)
        if self._leads and r.predicted_ttft_s > 0 and not r.cold and len(r.out) <= START_TOKENS:
            self._measure_start(r, now)
        r.emit(token, self.ticks, now)

    def _finish(self, r: Request, reason: str, message: str = "") -> None:
        """Under the lock, once per request: it leaves the engine with its last word."""
        if self._requests.pop(r.seq.seq_id, None) is not None:
            if reason in ("length", "stop") and r.out:  # handed out until its last token's promised time
                self._delivery_ends[r.seq.seq_id] = r.due_s(len(r.out) - 1)
            else:  # cancelled, failed: nothing more is handed out
                self._delivery_ends.pop(r.seq.seq_id, None)
            if self.tick_log is not None:
                self._log_request(r, reason)
            r.emit(Finished(reason, message), self.ticks, time.perf_counter())


def _sleep_until(deadline: float) -> None:
    """Sleeps until `deadline` (perf_counter seconds). time.sleep overshoots by ~60 us
    here, so it sleeps short and spins the last 200 us (a spin on a 2-core host steals a
    core from the step, so it stays short)."""
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        if left > 0.0003:
            time.sleep(left - 0.0002)


def queue_full_message(max_queue: int, ago_s: float, ttft_s: float) -> str:
    """The refusal for room: what the last request admitted was promised, and when."""
    return (f"queue full ({max_queue} waiting); the last request admitted {ago_s:.3f} s ago was promised its "
            f"first token in {ttft_s:.3f} s")


_ids = itertools.count()


def new_request_id() -> str:
    return f"req-{next(_ids)}"
