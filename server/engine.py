"""The lockstep engine: one thread that owns the program and the executor.

Each tick: drop cancelled requests, admit waiting ones into free KV slots, pick the
tick's work, run one step, (in deterministic mode) wait out the tick, then hand out the
sampled tokens and retire finished sequences: tokens leave on tick boundaries, so their
cadence does not carry the step's jitter.

Tick policy (static shapes): a tick is either
- a decode step of every running sequence, padded to the smallest compiled bucket that
  holds them, or
- one prefill chunk of the oldest admitted sequence whose prompt is not in yet.
When both are pending they alternate, so running streams keep their cadence while new
prompts go in. In deterministic mode a tick lasts the program's step time for its
phase and bucket, times `time_scale`, plus the guard band; a step that runs longer is
an overrun: counted and exported, never hidden.

Failures (docs/security.md): a step that raises is retried row by row, so the row at
fault ends with reason "error" and the others keep their tokens; an `ExecutorFailed`
(the executor itself is broken) or any error outside a step ends the loop: every
waiting and running request ends with reason "unavailable", `submit` refuses from then
on, and `on_death` tells the server, which reports it and exits non-zero.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from server.sampling import SamplingParams
from server.step import ExecutorFailed, StepBatch


@dataclass(frozen=True)
class EngineConfig:
    deterministic: bool = True  # pace ticks to the program; False: run steps back to back
    time_scale: float = 1.0  # program seconds -> wall seconds (simulated pools run slower)
    guard_band_s: float = 0.0005  # added to every paced tick, seconds
    max_queue: int = 64  # waiting requests beyond this are refused at once
    # And this fraction of the predicted step: the margin that absorbs the host's jitter
    # (gRPC and the client share its cores), so steps finish inside their tick.
    guard_band_frac: float = 0.20


@dataclass(frozen=True)
class Finished:
    """The engine's last word on a request (the client side builds the outcome from it)."""

    # length | stop | cancelled | error (this row failed) | unavailable (the engine died)
    # | shutdown (the engine was stopped with the request still in it)
    reason: str
    message: str = ""  # for error / unavailable: what happened


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
    cancelled: bool = False  # set by the client side; the engine retires it next tick
    # Engine state.
    slot: int = -1
    prefilled: int = 0
    out: list[int] = field(default_factory=list)
    admitted_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt)


class Engine:
    def __init__(self, executor, program: dict, config: EngineConfig = EngineConfig(), metrics=None):
        self.executor = executor
        self.config = config
        self.metrics = metrics
        opts = program["options"]
        self.max_slots, self.max_context = opts["max_slots"], opts["max_context"]
        self.chunk = program["prefill_chunk"]
        self.buckets = list(program["buckets"])
        self.step_s = {(s["phase"], s["batch"]): s["step_s"] for s in program["schedules"]}
        self._lock = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # admitted, in slots
        self._free_slots = list(range(self.max_slots))
        self._stop = False
        self._last_phase = "decode"
        self.accepting = True
        self.ticks = 0
        self.overruns = 0
        self._done: concurrent.futures.Future | None = None
        self.failure: BaseException | None = None  # why the loop ended, if it died
        self.on_death: Callable[[BaseException], None] | None = None  # called once, from the engine thread

    # -- client side (any thread) --------------------------------------------------
    def start(self, thread: concurrent.futures.Executor | None = None) -> None:
        """Runs the loop on `thread` (a one-worker executor that owns every torch op of
        this process; see app.LockstepServer), or on a new thread."""
        thread = thread or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lockstep-engine")
        self._done = thread.submit(self._loop)

    def tick_s(self, phase: str, batch: int) -> float:
        """Wall seconds a paced tick lasts."""
        step = self.step_s[(phase, batch)] * self.config.time_scale
        return step * (1 + self.config.guard_band_frac) + self.config.guard_band_s

    def bucket_for(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def predict(self, prompt_len: int, max_tokens: int) -> tuple[float, float]:
        """(TTFT, end-to-end) in seconds for a request arriving now, from the program and
        the queue: the static schedule makes this arithmetic, not a guess."""
        with self._lock:
            ahead = [r for r in self._running if not r.decoding] + list(self._waiting)
            decoding = sum(r.decoding for r in self._running)
            remaining = sorted(r.max_tokens - len(r.out) for r in self._running if r.decoding)
            free = len(self._free_slots) - len(self._waiting)
        chunks_ahead = sum(math.ceil((len(r.prompt) - r.prefilled) / self.chunk) for r in ahead)
        own = math.ceil(prompt_len / self.chunk)
        batch = self.bucket_for(min(decoding + len(ahead) + 1, self.max_slots))
        decode = self.tick_s("decode", batch)
        prefill = self.tick_s("prefill", 1)
        wait_slot = 0.0
        if free <= 0 and remaining:  # wait for the (1 - free)-th earliest finish
            wait_slot = remaining[min(-free, len(remaining) - 1)] * (decode + prefill)
        interleave = decode if decoding else 0.0  # a decode tick between prefill chunks
        ttft = wait_slot + (chunks_ahead + own) * (prefill + interleave)
        return ttft, ttft + (max_tokens - 1) * decode

    @property
    def up(self) -> bool:
        return self.failure is None

    def submit(self, request: Request) -> None:
        """Queues a request (the caller validated it). Raises OverflowError past max_queue
        and EngineDown once the loop has died."""
        with self._lock:
            if self.failure is not None:
                raise EngineDown(f"engine stopped: {self.failure!r}"[:300])
            if len(self._waiting) >= self.config.max_queue:
                raise OverflowError(f"queue full ({self.config.max_queue} waiting)")
            self._waiting.append(request)
            self._lock.notify()

    def status(self) -> dict:
        with self._lock:
            return {"queue_length": len(self._waiting), "running": len(self._running),
                    "slots_in_use": self.max_slots - len(self._free_slots), "max_slots": self.max_slots,
                    "ticks": self.ticks, "overruns": self.overruns, "accepting": self.accepting,
                    "max_queue": self.config.max_queue, "engine_up": self.up}

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
            return not self._waiting and not self._running

    # -- engine thread ---------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # a dead engine must not look alive: stop admitting, say why
            self._die(exc)
            raise

    def _die(self, exc: BaseException) -> None:
        traceback.print_exc()
        with self._lock:
            self.failure, self.accepting = exc, False
            ended = list(self._waiting) + self._running
            self._waiting.clear()
        message = f"engine stopped: {type(exc).__name__}: {exc}"[:300]
        for r in ended:
            self._finish(r, "unavailable", message)
        if self.on_death is not None:
            self.on_death(exc)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not self._running:
                    self._lock.wait()
                if self._stop:
                    ended = list(self._waiting) + self._running
                    self._waiting.clear()
                    for r in ended:
                        self._finish(r, "shutdown", "server is shutting down")
                    break
                self._retire_cancelled()
                self._admit()
                work = self._pick()
            if work is not None:
                self._tick(*work)

    def _retire_cancelled(self) -> None:
        for r in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(r)
            self._finish(r, "cancelled")
        for r in [r for r in self._running if r.cancelled]:
            self._finish(r, "cancelled")

    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            r = self._waiting.popleft()
            r.slot = self._free_slots.pop(0)
            r.admitted_s = time.perf_counter()
            self._running.append(r)

    def _pick(self):
        prefilling = [r for r in self._running if not r.decoding]
        decoding = [r for r in self._running if r.decoding]
        if prefilling and (not decoding or self._last_phase == "decode"):
            return "prefill", [prefilling[0]]
        if decoding:
            return "decode", decoding
        return None

    def _batch(self, phase: str, rows: list[Request]) -> StepBatch:
        if phase == "prefill":
            (r,) = rows
            tokens = r.prompt[r.prefilled:r.prefilled + self.chunk]
            return StepBatch("prefill", 1, self.chunk, (r.slot,), (tuple(tokens),), (r.prefilled,), (r.sampling,))
        positions = tuple(len(r.prompt) + len(r.out) - 1 for r in rows)
        return StepBatch("decode", self.bucket_for(len(rows)), 1, tuple(r.slot for r in rows),
                         tuple((r.out[-1],) for r in rows), positions, tuple(r.sampling for r in rows))

    def _step(self, phase: str, rows: list[Request]) -> list[tuple[Request, int]]:
        """Runs the step; returns (row, sampled id) for the rows that succeeded. A step that
        raises is run again row by row (rows are independent and rewriting a KV position
        writes the same values, so the survivors' tokens are those of the batched step);
        a row that fails alone ends with reason "error"."""
        try:
            return list(zip(rows, self.executor.step(self._batch(phase, rows)).token_ids))
        except ExecutorFailed:
            raise
        except Exception as exc:
            if len(rows) == 1:
                self._fail_row(rows[0], exc)
                return []
        done = []
        for r in rows:
            try:
                done.append((r, self.executor.step(self._batch(phase, [r])).token_ids[0]))
            except ExecutorFailed:
                raise
            except Exception as exc:
                self._fail_row(r, exc)
        return done

    def _fail_row(self, r: Request, exc: Exception) -> None:
        traceback.print_exception(exc)
        self._finish(r, "error", f"request {r.request_id!r} failed in its step: {type(exc).__name__}: {exc}"[:300])

    def _tick(self, phase: str, rows: list[Request]) -> None:
        start = time.perf_counter()
        bucket = 1 if phase == "prefill" else self.bucket_for(len(rows))
        results = self._step(phase, rows)
        measured = time.perf_counter() - start
        tick = self.tick_s(phase, bucket)
        overrun = self.config.deterministic and measured > tick
        if self.config.deterministic and not overrun:
            _sleep_until(start + tick)  # tokens leave on the tick boundary, not when the step ends
        now = time.perf_counter()
        self.ticks += 1
        self.overruns += overrun
        self._last_phase = phase
        for r, token in results:
            if phase == "prefill":
                r.prefilled = min(len(r.prompt), r.prefilled + self.chunk)
                if not r.decoding:
                    continue
            self._emit(r, token, now)
        if self.metrics is not None:
            predicted = self.step_s[(phase, bucket)] * self.config.time_scale
            self.metrics.observe_tick(phase, len(rows), measured, predicted, overrun)
            with self._lock:
                self.metrics.set_queue(len(self._running), len(self._waiting), self.max_slots - len(self._free_slots))

    def _emit(self, r: Request, token: int, now: float) -> None:
        if r.first_token_s is None:
            r.first_token_s = now
        r.last_token_s = now
        r.out.append(token)
        r.emit(token, self.ticks, now)
        if token in r.stop_ids:
            self._finish(r, "stop")
        elif len(r.out) >= r.max_tokens or len(r.prompt) + len(r.out) >= self.max_context:
            self._finish(r, "length")

    def _finish(self, r: Request, reason: str, message: str = "") -> None:
        with self._lock:  # an RLock: _retire_cancelled already holds it
            if r in self._running:
                self._running.remove(r)
                self._free_slots.append(r.slot)
                self._free_slots.sort()  # lowest free slot first: deterministic placement
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


_ids = itertools.count()


def new_request_id() -> str:
    return f"req-{next(_ids)}"
