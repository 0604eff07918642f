"""What serving costs on top of the bare step, measured side by side in one run.

1. Bare: the LocalExecutor alone (same program, same weights): decode step p50 at batch 1,
   and the prompt's prefill time (its TTFT without a server).
2. Through gRPC: `lockstep serve --no-ray` as its own process on loopback, one stream at
   a time: inter-token latency p50 / bare decode step p50 (goal <= 1.05) and TTFT /
   bare prefill (goal <= 1.10), in throughput mode (back-to-back steps) and in
   deterministic mode (paced ticks).
3. Jitter: 8 concurrent streams, p99 / p50 of the inter-token gaps once every stream is
   decoding (goal <= 1.10 in deterministic mode), deterministic against throughput mode.

The bare figures are taken before and after the servers run and averaged, to cancel the
drift of this shared machine.

    .venv/bin/python bench/serve_overhead.py [--model small] [--tokens 64]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import statistics
import subprocess
import sys

from client.client import LockstepClient
from scheduler.program import ProgramView
from server.runtime.executor import LocalExecutor
from server.runtime.stage import plan_from_program
from server.runtime.sampling import GREEDY
from server.serve import build_config
from server.cli import build_parser
from server.runtime.step import StepBatch


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def serve_args(args, mode: list[str]) -> list[str]:
    return ["serve", "--model", args.model, "--pool", "cpu", "--max-slots", "8", "--max-context",
            str(args.max_context), "--prefill-chunk", str(args.chunk), "--port", "0", "--metrics-port", "0", "--http-port", "0",
            "--no-ray", *mode]


def bare(program: ProgramView, prompt: list[int], tokens: int, chunk: int) -> tuple[float, float]:
    """(decode step p50, prefill seconds) of one sequence on the bare executor."""
    executor = LocalExecutor(plan_from_program(program))
    prefill, decode = [], []
    for _ in range(2):  # the first round warms up
        prefill, decode, pos, last = [], [], 0, 0
        while pos < len(prompt):
            part = tuple(prompt[pos:pos + chunk])
            r = executor.step(StepBatch("prefill", 1, chunk, (0,), (part,), (pos,), (GREEDY,)))
            prefill.append(r.step_time_s)
            pos, last = pos + len(part), r.token_ids[0]
        for i in range(tokens - 1):
            r = executor.step(StepBatch("decode", 1, 1, (0,), ((last,),), (len(prompt) + i,), (GREEDY,)))
            decode.append(r.step_time_s)
            last = r.token_ids[0]
    executor.close()
    return statistics.median(decode), sum(prefill)


def start(args, mode: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "server.cli", *serve_args(args, mode)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("lockstep serve: ready"):
            return proc, line.split("grpc=")[1].split()[0]
    raise SystemExit(f"server exited with {proc.wait()}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def one_stream(target: str, prompt, tokens: int, repeats: int) -> tuple[float, float]:
    """(ITL p50, TTFT median) over `repeats` requests, one at a time."""
    with LockstepClient(target) as client:
        client.generate(prompt, 4)  # warm-up
        gens = [client.generate(prompt, tokens) for _ in range(repeats)]
    return statistics.median(g for gen in gens for g in gen.itl_s), statistics.median(g.ttft_s for g in gens)


def many_streams(target: str, prompt, tokens: int, streams: int) -> tuple[float, ...]:
    """Steady-state gaps of `streams` concurrent streams: (p50, p99, count), counting only
    gaps that start after every stream got its first token (all prefills done)."""
    with LockstepClient(target) as client:
        client.generate(prompt, 4)
        with concurrent.futures.ThreadPoolExecutor(streams) as pool:
            gens = list(pool.map(lambda i: client.generate(prompt, tokens, temperature=1.0, seed=i), range(streams)))
    steady_from = max(g.tokens[0].recv_s for g in gens)
    pairs = [(a, b) for g in gens for a, b in zip(g.tokens, g.tokens[1:]) if a.recv_s >= steady_from]
    gaps = [b.recv_s - a.recv_s for a, b in pairs]
    sent = [b.sent_unix_s - a.sent_unix_s for a, b in pairs]  # the server's cadence, without client jitter
    return percentile(gaps, 0.5), percentile(gaps, 0.99), len(gaps), percentile(sent, 0.5), percentile(sent, 0.99)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="small")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--max-context", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--guard-band-pct", type=float, default=None, help="passed to the deterministic server")
    args = parser.parse_args()
    config, program = build_config(build_parser().parse_args(serve_args(args, [])))  # calibrates once, cached
    prompt = [(7 * i + 3) % 500 for i in range(args.prompt_len)]
    step0, prefill0 = bare(program.view(), prompt, args.tokens, args.chunk)
    results = {}
    det = [] if args.guard_band_pct is None else ["--guard-band-pct", str(args.guard_band_pct)]
    for name, mode in (("throughput", ["--throughput"]), ("deterministic", det)):
        proc, target = start(args, mode)
        try:
            results[name] = (one_stream(target, prompt, args.tokens, args.repeats),
                             many_streams(target, prompt, args.tokens, args.streams))
        finally:
            stop(proc)
    step1, prefill1 = bare(program.view(), prompt, args.tokens, args.chunk)
    step, prefill = (step0 + step1) / 2, (prefill0 + prefill1) / 2
    tick = program.view().cadence_s(program.view().key_buckets[0])
    print(f"model {args.model} fp32 on cpu, prompt {args.prompt_len} tokens, {args.tokens} output tokens, "
          f"max context {args.max_context}, prefill chunk {args.chunk}")
    print(f"bare decode step p50 {step * 1e3:.2f} ms (before {step0 * 1e3:.2f}, after {step1 * 1e3:.2f}); "
          f"bare prefill {prefill * 1e3:.2f} ms; program tick (128 keys) {tick * 1e3:.2f} ms")
    print(f"\n{'mode':<14} {'ITL p50 ms':>10} {'ITL/step':>9} {'TTFT ms':>9} {'TTFT/prefill':>12} "
          f"{'8-stream p50':>12} {'p99':>8} {'p99/p50':>8} {'sent p99/p50':>12} {'gaps':>6}")
    for name, ((itl, ttft), (p50, p99, n, s50, s99)) in results.items():
        print(f"{name:<14} {itl * 1e3:>10.2f} {itl / step:>9.3f} {ttft * 1e3:>9.2f} {ttft / prefill:>12.3f} "
              f"{p50 * 1e3:>12.2f} {p99 * 1e3:>8.2f} {p99 / p50:>8.3f} {s99 / s50:>12.3f} {n:>6}")
    det, thr = results["deterministic"][1], results["throughput"][1]
    print(f"\np99/p50 at {args.streams} streams, as the client received them: deterministic {det[1] / det[0]:.3f} "
          f"vs throughput {thr[1] / thr[0]:.3f} (goal: deterministic <= 1.10); as the server sent them: "
          f"deterministic {det[4] / det[3]:.3f} vs throughput {thr[4] / thr[3]:.3f}")


if __name__ == "__main__":
    main()
