"""Pipelined stages: decode tokens/s of a 2-stage program with row groups in flight
(server/core/pipelined.py) against the unpipelined engine, and against the compiler's
prediction, in one run.

The program: MODEL over 2 of this host's CPU "devices" (a pool file: memory for half the
model each, and 1 ms links, which keep the compiler from splitting layers across them by
tensor parallelism), timed by this host's calibration; each stage a Ray actor with one
torch thread (RayExecutor, as `serve --executor ray`). Three engines over the same
program, pace and prompts, interleaved round by round (this host is shared and noisy):

    unpipelined x B     B streams: one decode batch of B (the table's `tokens_per_s` at B)
    unpipelined x B/2   B/2 streams (at B/2)
    pipelined   x B     B streams in 2 row groups of B/2 (`pipelined_tokens_per_s` at B/2)

B = max slots. All streams start together; tokens/s is counted from the moment every
stream has its 4th token to the moment the first one ends (decode only). Predictions in
wall seconds: the compiler's tokens/s divided by the time scale (the host's steps in the
actors against the calibration, measured once at start as `serve` does for real devices),
and the same formula over the engine's ticks at its final pace (the pace factors follow
the measured steps; that is what it promised the requests).

    .venv/bin/python bench/pipeline.py --model small --slots 8 --tokens 100 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ray  # noqa: E402
import torch  # noqa: E402

import scheduler  # noqa: E402
from scheduler.ticks import DECODE, StepKey, key_bucket  # noqa: E402
from server.core.build import measure_time_scale, warm_up  # noqa: E402
from server.core.engine import Engine, EngineConfig, Finished, Request  # noqa: E402
from server.runtime.executor import plan_from_program  # noqa: E402
from server.core.pipelined import PipelinedEngine  # noqa: E402
from server.runtime.ray_executor import RayExecutor  # noqa: E402
from server.runtime.sampling import GREEDY  # noqa: E402
from server.runtime.step import full_batch  # noqa: E402
from server.programs import calibration as _calibration  # noqa: E402

POOL = 'topology = "chain"\n[[devices]]\npreset = "cpu"\ncount = 2\nmemory_bytes = {memory}\nlink_latency_s = 1e-3\n'
PROMPT_LEN = 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device-memory", type=float, default=7e8, help="bytes per device: small enough for 2 stages")
    p.add_argument("--slots", type=int, default=8, help="KV slots = the largest batch (even)")
    p.add_argument("--tokens", type=int, default=100,
                   help="tokens per stream (default 100: 16 + 100 keys stay in the 128-key bucket)")
    p.add_argument("--rounds", type=int, default=2)
    return p.parse_args(argv)


def run(engine: Engine, streams: int, tokens: int) -> tuple[float, list[list[int]], dict, list[float]]:
    """(decode tokens/s, each stream's tokens, engine status, each stream's first token
    minus the one promised at admission, and last token minus its promise, in seconds)."""
    times: list[list[float]] = [[] for _ in range(streams)]
    out: list[list[int]] = [[] for _ in range(streams)]
    left = [streams]
    done = threading.Event()

    def emitter(i):
        def emit(item, tick, at):
            if isinstance(item, Finished):
                left[0] -= 1
                if not left[0]:
                    done.set()
            else:
                out[i].append(item)
                times[i].append(at)
        return emit

    engine.start()
    requests = []
    try:
        for i in range(streams):
            prompt = torch.randint(0, 512, (PROMPT_LEN,), generator=torch.Generator().manual_seed(i)).tolist()
            r = Request(f"s{i}", prompt, tokens, GREEDY, frozenset(), emitter(i))
            ttft, e2e, r.group = engine.predict_placed(len(prompt), tokens)
            r.predicted_ttft_s, r.predicted_e2e_s = ttft, e2e
            engine.submit(r)
            requests.append(r)
        if not done.wait(600):
            raise RuntimeError("streams did not finish in 600 s")
        status = engine.status()
    finally:
        engine.stop()
    start = max(t[3] for t in times)
    end = min(t[-1] for t in times)
    counted = sum(start < x <= end for t in times for x in t)
    late = [t[0] - r.arrival_s - r.predicted_ttft_s for t, r in zip(times, requests)]
    late += [t[-1] - r.arrival_s - r.predicted_e2e_s for t, r in zip(times, requests)]
    return counted / (end - start), out, status, late


def back_to_back(executor: RayExecutor, view, batch: int, in_flight: int, steps: int = 30) -> float:
    """Decode rows/s of the stage actors alone, unpaced: `steps` decode steps of `batch`
    rows at the shortest keys, `in_flight` of them in the stages at once."""
    step = full_batch(DECODE, batch, 1, view.key_buckets[0], view.max_slots)
    for _ in range(3):
        executor.step(step)
    pending = deque()
    start = time.perf_counter()
    for _ in range(steps):
        if len(pending) == in_flight:
            executor.collect(pending.popleft())
        pending.append(executor.submit(step))
    while pending:
        executor.collect(pending.popleft())
    return steps * batch / (time.perf_counter() - start)


def predicted_wall(engine: Engine, view, groups: int, batch: int) -> float:
    """The compiler's formula over the engine's own ticks at its final pace, tokens/s."""
    keys = key_bucket(PROMPT_LEN + 1, view.max_context)
    key = StepKey(DECODE, view.buckets[-1], keys, 1)
    tick = engine.tick_s(key)
    if groups == 1:
        return batch / tick
    return groups * batch / max(tick, groups * engine.issue_s(key))


def main(argv=None) -> int:
    args = parse_args(argv)
    path = Path(tempfile.mkdtemp()) / "two_cpus.toml"
    path.write_text(POOL.format(memory=args.device_memory))
    model, pool = scheduler.get_model(args.model), scheduler.parse_pool(str(path))
    options = scheduler.CompileOptions(dtype=args.dtype, max_slots=args.slots, max_context=512, prefill_chunk=64,
                                       prompt_len=PROMPT_LEN)
    calibration = _calibration(SimpleNamespace(calibration="auto", model=args.model, dtype=args.dtype,
                                               max_slots=args.slots, max_context=512, prefill_chunk=64), model, pool)
    program = scheduler.compile(model, pool, options, calibration)
    view = program.view()
    if len(view.stages) != 2:
        raise SystemExit(f"{args.model} compiled to {len(view.stages)} stages on 2 x {args.device_memory:g} B; "
                         f"pick --device-memory for 2")
    half = args.slots // 2
    table = {p["batch"]: p for p in program.data["predictions"]}
    plan = plan_from_program(view)
    ray.init(include_dashboard=False, log_to_driver=False)
    configs = [("unpipelined", 1, args.slots), ("unpipelined", 1, half), ("pipelined", 2, args.slots)]
    measured = {c: [] for c in configs}
    paced = {c: [] for c in configs}
    tokens = {}
    scale = None
    unpaced = {(1, half): [], (1, args.slots): [], (2, half): []}  # (steps in flight, batch) -> rows/s
    try:
        for rnd in range(args.rounds):
            for config in configs:
                name, groups, streams = config
                executor = RayExecutor(plan, in_flight=10)
                try:
                    if scale is None:  # one pace for every engine, measured once
                        scale = max(1.0, measure_time_scale(executor, view, view.key_buckets[:1], ("decode", "mixed"),
                                                            5, 1.0))
                    warm_up(executor, view, view.key_buckets, ("decode", "mixed", "prefill"))
                    if config == configs[0]:
                        for shape in unpaced:
                            unpaced[shape].append(back_to_back(executor, view, shape[1], shape[0]))
                        print(f"round {rnd}: stage actors back to back, unpaced, decode rows/s: " + ", ".join(
                            f"{g} x {b} in flight {unpaced[(g, b)][-1]:.1f}" for g, b in unpaced), flush=True)
                    config_ = EngineConfig(time_scale=scale)
                    engine = (PipelinedEngine(executor, view, config_, groups=2) if groups == 2
                              else Engine(executor, view, config_))
                    rate, out, status, late = run(engine, streams, args.tokens)
                finally:
                    executor.close()
                measured[config].append(rate)
                paced[config].append(predicted_wall(engine, view, groups, streams // groups))
                tokens.setdefault(streams, out)
                same = tokens[streams] == out
                promise = max(late, key=abs)
                print(f"round {rnd}: {name:11s} x {streams}: {rate:8.1f} tok/s  (first and last tokens against their "
                      f"promises: worst {promise * 1e3:+.1f} ms; overruns {status['overruns']} of "
                      f"{status['ticks']} ticks, pace x{status['pace_factor']:.1f}; same tokens as the first "
                      f"{streams}-stream run: {same})", flush=True)
                if not same:
                    raise SystemExit("tokens differ between runs: determinism broken")
    finally:
        ray.shutdown()
    base = statistics.median(measured[configs[1]])
    print(f"\n{args.model} {args.dtype} on 2 host CPU devices (2 stages, 1 torch thread each), {args.slots} slots, "
          f"prompts {PROMPT_LEN}, {args.tokens} tokens per stream, time scale {scale:.1f}, {args.rounds} rounds "
          f"(median)")
    print(f"{'engine':24s} {'measured tok/s':>15s} {'vs unpip. x' + str(half):>15s} {'compiler / scale':>17s} "
          f"{'measured/compiler':>18s} {'at final pace':>14s} {'measured/paced':>15s}")
    for config in configs:
        name, groups, streams = config
        row = table[streams // groups]
        compiler = (row["pipelined_tokens_per_s"] if groups == 2 else row["tokens_per_s"]) / scale
        m, p = statistics.median(measured[config]), statistics.median(paced[config])
        label = f"{name} x {streams}" + (f" ({groups} x {streams // groups})" if groups > 1 else "")
        print(f"{label:24s} {m:15.1f} {m / base:15.2f} {compiler:17.1f} {m / compiler:18.2f} {p:14.1f} {m / p:15.2f}")
    one = statistics.median(unpaced[(1, half)])
    print(f"\nstage actors alone, back to back (no pacing), decode rows/s at {view.key_buckets[0]} keys:")
    print(f"{'steps in flight':24s} {'measured rows/s':>15s} {'vs 1 x ' + str(half):>15s} {'compiler / scale':>17s} "
          f"{'measured/compiler':>18s}")
    for (groups, batch), rates in unpaced.items():
        row = table[batch]
        compiler = (row["pipelined_tokens_per_s"] if groups == 2 else row["tokens_per_s"]) / scale
        m = statistics.median(rates)
        print(f"{f'{groups} x {batch}':24s} {m:15.1f} {m / one:15.2f} {compiler:17.1f} {m / compiler:18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
