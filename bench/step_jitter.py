"""The host's own step jitter: one decode step shape run back to back on a bare
LocalExecutor (no server, no client), with a pause after each step like a paced tick's
slack. Prints p50 and p95/p50, p99/p50, max/p50 per run: what any pace factor must cover
before serving adds anything.

    .venv/bin/python bench/step_jitter.py [--model small] [--batch 8] [--steps 300] [--runs 3] [--slack-ms 12]
"""

from __future__ import annotations

import argparse
import time

import scheduler
from server.runtime.executor import LocalExecutor
from server.runtime.stage import RuntimePlan, StageSpec
from server.runtime.sampling import GREEDY
from server.runtime.step import StepBatch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--slack-ms", type=float, default=12.0, help="pause after each step (a paced tick's slack)")
    args = p.parse_args()
    spec = scheduler.get_model(args.model)
    ex = LocalExecutor(RuntimePlan(spec, args.dtype, max(8, args.batch), 512,
                                   (StageSpec(0, 0, spec.num_layers + 2, "cpu"),)))
    b = args.batch
    batch = StepBatch("decode", b, 1, tuple(range(b)), tuple((7,) for _ in range(b)), tuple(127 for _ in range(b)),
                      tuple(GREEDY for _ in range(b)))
    for _ in range(5):
        ex.step(batch)
    print(f"{args.model} {args.dtype} decode batch {b}, 128 keys: {args.runs} runs of {args.steps} steps, "
          f"{args.slack_ms:g} ms pause after each")
    for _ in range(args.runs):
        times = []
        for _ in range(args.steps):
            times.append(ex.step(batch).step_time_s)
            time.sleep(args.slack_ms / 1e3)
        s = sorted(times)
        q = lambda f: s[min(len(s) - 1, int(f * len(s)))]
        m = q(0.5)
        print(f"p50 {m * 1e3:.1f} ms  p95/p50 {q(0.95) / m:.3f}  p99/p50 {q(0.99) / m:.3f}  max/p50 {s[-1] / m:.3f}")
    ex.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
