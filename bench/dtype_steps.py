"""Step times per weight dtype: decode (batch 1 and 8, 128 keys) and prefill (32 and 64
tokens) of one model, an executor per dtype, in rounds that alternate the dtypes (this
host drifts from minute to minute; side by side is what counts). Medians.

    .venv/bin/python bench/dtype_steps.py [--model small|smollm2-135m] [--dtypes fp32,bf16] [--rounds 5] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics

import scheduler
from server.runtime.executor import LocalExecutor
from server.runtime.stage import RuntimePlan, StageSpec
from server.runtime.sampling import GREEDY
from server.runtime.step import StepBatch


def shapes() -> dict[str, StepBatch]:
    decode = lambda b: StepBatch("decode", b, 1, tuple(range(b)), tuple((7,) for _ in range(b)),
                                 tuple(127 for _ in range(b)), tuple(GREEDY for _ in range(b)))
    prefill = lambda n: StepBatch("prefill", 1, n, (0,), (tuple(range(1, n + 1)),), (0,), (GREEDY,))
    return {"decode b=1": decode(1), "decode b=8": decode(8), "prefill 32": prefill(32), "prefill 64": prefill(64)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=8, help="timed steps per shape per round")
    args = p.parse_args()
    from server.runtime import gguf

    spec = scheduler.get_model(gguf.resolve(args.model, "")[0])  # presets and the packaged smollm2-135m
    dtypes = args.dtypes.split(",")
    executors = {dt: LocalExecutor(RuntimePlan(spec, dt, 8, 1024, (StageSpec(0, 0, spec.num_layers + 2, "cpu"),)))
                 for dt in dtypes}
    batches = shapes()
    samples = {(dt, name): [] for dt in dtypes for name in batches}
    for ex in executors.values():  # first steps of a shape build oneDNN primitives
        for batch in batches.values():
            for _ in range(3):
                ex.step(batch)
    for _ in range(args.rounds):
        for dt, ex in executors.items():
            for name, batch in batches.items():
                samples[dt, name] += [ex.step(batch).step_time_s for _ in range(args.steps)]
    print(f"{args.model}: step ms, medians of {args.rounds} x {args.steps} (dtypes alternated by round)")
    print(f"{'step':<12}" + "".join(f"{dt:>10}" for dt in dtypes) + "".join(f"{dt + '/' + dtypes[0]:>12}"
                                                                           for dt in dtypes[1:]))
    for name in batches:
        ms = [statistics.median(samples[dt, name]) * 1e3 for dt in dtypes]
        print(f"{name:<12}" + "".join(f"{x:>10.1f}" for x in ms) + "".join(f"{x / ms[0]:>12.2f}" for x in ms[1:]))
    for ex in executors.values():
        ex.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
