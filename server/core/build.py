"""Building the engine core: the executor on this host's devices, the time scale measured,
every step shape warmed up, and the engine (plain or pipelined) over them. The same
function serves the core's own process (server/core/process.py) and an engine on a thread
of the front end's process (tests); it runs on the thread that will run every torch op.
"""

from __future__ import annotations

import os
import statistics
import sys

import torch

from scheduler.program import ProgramView
from server.config import ServeConfig
from server.core.affinity import available
from server.core.engine import Engine, EngineConfig
from server.core.pipelined import PipelinedEngine
from server.runtime.executor import make_executor
from server.runtime.stage import plan_from_program
from server.runtime.step import ExecutorFailed, full_batch

# The engine thread dispatches ~1,000 torch ops a step and needs the GIL back at once after
# each; the default 5 ms switch interval lets another thread hold it that long while the
# step waits (ticks then overrun).
SWITCH_INTERVAL_S = 0.0002


def _shapes(program: ProgramView, keys: tuple[int, ...], phases: tuple[str, ...]):
    """(program seconds, a StepBatch of that shape with every row real) for the program's
    steps of these phases at these key buckets; rows end at the bucket's last key."""
    for key, predicted in sorted(program.steps.items()):
        if key.phase in phases and key.keys in keys:
            yield predicted, full_batch(key.phase, key.batch, key.tokens, key.keys, program.max_slots)


def measure_time_scale(executor, program: ProgramView, keys: tuple[int, ...], phases: tuple[str, ...],
                       repeats: int = 5, margin: float = 1.1, warmup: int = 8) -> float:
    """Runs the program's step shapes of these phases at these key buckets on the host and
    returns the smallest factor by which their program times must be slowed so the host
    keeps up: max over steps of measured / predicted (median of `repeats`), times
    `margin`. Each step shape first runs `warmup` times untimed: a fresh executor's first
    steps of a shape take 100x longer (measured: 250 ms, then 3 ms, for `tiny`: oneDNN
    primitives, first touches)."""
    return measure_steps(executor, program, keys, phases, repeats, warmup)[0] * margin


def measure_steps(executor, program: ProgramView, keys: tuple[int, ...], phases: tuple[str, ...],
                  repeats: int = 5, warmup: int = 8) -> tuple[float, float]:
    """(time scale, jitter) of these step shapes on this host: the scale as in
    `measure_time_scale` (no margin); the jitter, the median over the shapes of a shape's
    second slowest of `repeats` runs over their median, less 1 (the guard band a paced
    tick needs for its step to finish inside it; the slowest run, or the worst shape, is
    one hiccup: it gave 30% where the steps served later varied by 5-10%).

    The shapes' runs are interleaved (one run of each shape per round), so a slow spell of
    this shared host lands on every shape's median alike, not on the median of the one
    shape measured then, which as the worst shape sets every promise until the pacer's
    first re-estimate (measured in a block per shape, two starts of compiled smollm2-135m
    steps a minute apart came out at 1.41 and 1.09)."""
    shapes = list(_shapes(program, keys, phases))
    for _, step in shapes:
        for _ in range(warmup):
            executor.step(step)
    times: list[list[float]] = [[] for _ in shapes]
    for _ in range(repeats):
        for i, (_, step) in enumerate(shapes):
            times[i].append(executor.step(step).step_time_s)
    worst, jitters = 0.0, []
    for (predicted, _), runs in zip(shapes, times):
        runs.sort()
        median = statistics.median(runs)
        worst = max(worst, median / predicted)
        jitters.append(runs[-2] / median - 1 if len(runs) > 1 else 0.0)
    return worst, statistics.median(jitters) if jitters else 0.0


def warm_up(executor, program: ProgramView, keys: tuple[int, ...], phases: tuple[str, ...], runs: int = 2) -> None:
    """Runs each of the program's step shapes of these phases at these key buckets `runs` times, untimed."""
    for _, step in _shapes(program, keys, phases):
        for _ in range(runs):
            executor.step(step)




# The start-up guard band, when measured: each of JITTER_REPEATS runs of the decode and mixed
# shapes at the shortest context; the second slowest over the median, within START_GUARD..
# MAX_GUARD. It paces the first ticks only: re-paced from served steps, a phase takes their
# quantile + MIN_GUARD (EngineConfig.pace_margin), their jitter being in the quantile already.
# The floor: measured quiet at start, the jitter is 3-10%, but the same steps served beside
# a client and the front end run slower than that measurement: 10-35% (bench/peer_vllm.py:
# prefill 87-112 ms against 85 paced), and on the fifteenth session's host the first 128
# served decode ticks' 95th percentile was 1.29x the start-up scale (their median 1.04x).
# With a 10% floor a fresh server's first streams came late (a lone stream promised 19.6 ms
# a token, served at 18.4 ms median, 23 of its first 128 ticks overran; `make demo` 21 and
# 50 of 146); with 30%, 1 of them (its first decode step), and the pace the served steps
# then set was lower (21.8 ms against 23.4: the lead lets each step start after its held
# token is sent; docs/architecture.md, "Where it falls short"). Decode and mixed ticks
# only: the first prefill ticks keep the measured jitter, at least MIN_GUARD (none of a
# fresh server's prefill steps overran at 10%, and at 25% c=1's first tokens were promised
# 1.1x vLLM's, against 0.9-0.97x, through bench/peer_vllm.py's c=1 load).
JITTER_REPEATS = 9
MIN_GUARD, START_GUARD, MAX_GUARD = 0.10, 0.25, 0.30


def build_engine(config: ServeConfig, program: ProgramView, metrics=None) -> tuple[Engine, object, float]:
    """(engine, executor, time scale), built and measured on the calling thread, not started."""
    cfg = config
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    plan = plan_from_program(program, seed=cfg.seed, checkpoint=cfg.checkpoint, compiled=cfg.compiled)
    # Every torch op runs on this one thread: building, warm-up, then the engine loop.
    # Measured: a step run from a second thread that uses torch is ~30% slower (28.8 ->
    # 37.9 ms for `small`), as each thread gets its own OpenMP team and the two teams
    # fight over 2 cores; with one torch thread it costs nothing. Ray sets OMP_NUM_THREADS
    # to an actor's num_cpus (1 in a replica): a local executor owns the host's cores, so
    # it takes them back (prefill of `small` ran 2x slower).
    torch.set_num_threads(cfg.torch_threads or len(available()))  # one per CPU it may run on
    groups = len(program.stages) if cfg.pipeline else 1
    options = {"in_flight": max(groups, 10)} if cfg.executor == "ray" else {}
    executor = make_executor(plan, cfg.executor, **options)
    keys = program.key_buckets
    prefill_scale = 0.0  # 0: the time scale
    guard = cfg.guard_band_frac if cfg.guard_band_frac is not None else EngineConfig.guard_band_frac
    margin = None  # the served pace's margin: the band (given), or MIN_GUARD when the band is measured here
    prefill_guard = None  # the first prefill ticks' band, when measured here (None: the band)
    if program.simulated and not cfg.time_scale:
        # The chip's times against the host's, at the shortest and the longest contexts.
        scale = measure_time_scale(executor, program, (keys[0], keys[-1]), ("decode", "mixed", "prefill"))
    else:
        # Real devices run at their own speed: 1, unless the host, serving, runs slower than
        # its calibration said; then ticks stretch to what it keeps up with, and the factor
        # is reported, rather than every tick overrunning. Decode and mixed steps (the
        # cadence) at the shortest context, where most ticks run.
        measured, jitter = measure_steps(executor, program, keys[:1], ("decode", "mixed"), JITTER_REPEATS)
        scale = cfg.time_scale or max(1.0, measured)
        if cfg.guard_band_frac is None:  # the guard band from the jitter measured here, not a flat 20%
            guard = min(MAX_GUARD, max(START_GUARD, jitter))
            prefill_guard = min(MAX_GUARD, max(MIN_GUARD, jitter))
            margin = MIN_GUARD  # the first ticks' margin only: served steps measure their own jitter
        # Prefill shapes get their own scale (their predictions err differently: measured
        # 1.5x against decode's 1.2x for smollm2-135m here; at decode's scale every first
        # token came ~10 ms past its promise, bench/peer_vllm.py). Their first runs also
        # build their oneDNN primitives (the demo's first prefill tick overran).
        prefill_scale = 0.0 if cfg.time_scale else max(1.0, measure_steps(executor, program, keys[:1], ("prefill",),
                                                                          3, warmup=2)[0])
    if cfg.pace_margin is not None:  # `serve --pace-margin-pct`
        margin = cfg.pace_margin
    engine_config = EngineConfig(deterministic=cfg.deterministic, time_scale=scale, guard_band_s=cfg.guard_band_s,
                                 max_queue=cfg.max_queue, guard_band_frac=guard,
                                 adaptive_pacing=cfg.adaptive_pacing, alone_own_step=cfg.alone_own_step,
                                 join_share=cfg.join_share, start_lead_quantile=cfg.start_lead_quantile,
                                 admission_window_s=cfg.admission_window_s,
                                 window_grace_s=cfg.window_grace_s, pace_quantile=cfg.pace_quantile,
                                 prefill_quantile=cfg.prefill_quantile, prefill_tail_once=cfg.prefill_tail_once,
                                 prefill_scale=prefill_scale, pace_margin=margin, prefill_guard_frac=prefill_guard)
    if cfg.pipeline:
        engine = PipelinedEngine(executor, program, engine_config, metrics, groups=groups)
    else:
        engine = Engine(executor, program, engine_config, metrics)
    if cfg.tick_log:
        engine.open_tick_log(cfg.tick_log)
    if hasattr(executor, "watch"):  # stage actors: a dead one ends the engine at once
        executor.watch(lambda why: engine.fail(ExecutorFailed(why)))
    return engine, executor, scale
