"""Decode step benchmarks, measured side by side in one run.

1. Bare decode step (LocalExecutor.step: pad, run all layers, sample) for `tiny` and
   `small` at batch 1 and 8, against the memory roofline: weight bytes / measured memory
   read bandwidth. Ratio = roofline / measured (1.0 would be every byte at full speed).
2. Calibrated predictions: `lockstep calibrate`'s measurement, then the compiler's
   predicted step time against freshly measured steps at contexts between the
   calibrated points, and predicted vs measured prefill (TTFT) for a few prompt lengths.
3. RayExecutor (one actor per stage, Ray Compiled Graph) against LocalExecutor, same plan.

    .venv/bin/python bench/decode.py [--steps 40] [--skip-ray]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import scheduler
from scheduler.compiler import CompileOptions, plan
from scheduler.cost import Calibration
from server.calibrate import calibrate, measure_memory_bandwidth, merge
from server.executor import LocalExecutor, RuntimePlan, StageSpec, make_executor
from server.sampling import GREEDY
from server.step import StepBatch


def decode_batch(bucket: int, context: int) -> StepBatch:
    rows = range(bucket)
    return StepBatch("decode", bucket, 1, tuple(rows), tuple((7,) for _ in rows),
                     tuple(context - 1 for _ in rows), tuple(GREEDY for _ in rows))


def median_step(executor, batch: StepBatch, steps: int) -> float:
    for _ in range(3):
        executor.step(batch)
    return statistics.median(executor.step(batch).step_time_s for _ in range(steps))


def one_stage_plan(model, dtype: str, slots: int, max_context: int, stages: int = 1) -> RuntimePlan:
    n = model.num_layers + 2
    cuts = [round(i * n / stages) for i in range(stages + 1)]
    specs = tuple(StageSpec(i, cuts[i], cuts[i + 1], "cpu") for i in range(stages))
    return RuntimePlan(model, dtype, slots, max_context, specs)


def roofline(args, bandwidth: float) -> None:
    print(f"\n## Bare decode step vs memory roofline (read bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"{torch.get_num_threads()} threads, context 128)")
    print(f"{'model':<6} {'batch':>5} {'weights MB':>10} {'roofline ms':>11} {'measured ms':>11} {'roofline/measured':>17}")
    for name in ("tiny", "small"):
        model = scheduler.get_model(name)
        executor = LocalExecutor(one_stage_plan(model, "fp32", 8, 512))
        weight_bytes = model.num_params * 4
        for bucket in (1, 8):
            measured = median_step(executor, decode_batch(bucket, 128), args.steps)
            ideal = weight_bytes / bandwidth
            print(f"{name:<6} {bucket:>5} {weight_bytes / 1e6:>10.1f} {ideal * 1e3:>11.3f} "
                  f"{measured * 1e3:>11.3f} {ideal / measured:>17.2f}")
        executor.close()


def predictions(args) -> None:
    """Calibration and verification interleaved in rounds, so both see the host's drift."""
    name, max_context, chunk = "small", 2048, 256
    model = scheduler.get_model(name)
    print(f"\n## Calibrated predictions ({name} fp32, cpu:1, max context {max_context}, prefill chunk {chunk}; "
          f"{args.rounds} rounds of calibrate-then-measure, medians)")
    executor = LocalExecutor(one_stage_plan(model, "fp32", 8, max_context))
    decode_points = [(b, c) for b in (1, 8) for c in (100, 300, 700, 1500, 2048)]
    prompts = (64, 256, 1000)
    docs, measured = [], {}
    start = time.perf_counter()
    for _ in range(args.rounds):
        docs.append(calibrate(model, "fp32", 8, max_context, chunk, repeats=max(args.steps // 4, 3)))
        for bucket, context in decode_points:
            t = median_step(executor, decode_batch(bucket, context), max(args.steps // 4, 3))
            measured.setdefault(("decode", bucket, context), []).append(t)
        for prompt in prompts:
            measured.setdefault(("prefill", 1, prompt), []).append(measure_prefill(executor, prompt, chunk, 3))
    print(f"calibration and measurement took {time.perf_counter() - start:.0f} s")
    cal = Calibration.from_json(merge(docs))
    options = CompileOptions(dtype="fp32", max_context=max_context, prefill_chunk=chunk)
    program = scheduler.compile(model, scheduler.parse_pool("cpu:1"), options, cal)
    timeline = plan(model, scheduler.parse_pool("cpu:1"), options, cal)
    (stage,) = timeline.stages
    print(f"{'phase':<8} {'batch':>5} {'context':>7} {'predicted ms':>12} {'measured ms':>11} {'predicted/measured':>18}")
    errors = []
    for (phase, bucket, tokens), times in measured.items():
        if phase == "decode":
            predicted = timeline.stage_time(stage, bucket, 1, tokens - 1) + timeline.feedback_time(bucket)
        else:
            predicted = timeline.ttft(tokens, chunk)
        got = statistics.median(times)
        errors.append(predicted / got)
        print(f"{phase:<8} {bucket:>5} {tokens:>7} {predicted * 1e3:>12.3f} {got * 1e3:>11.3f} {predicted / got:>18.3f}")
    worst = max(abs(e - 1) for e in errors)
    print(f"worst |predicted/measured - 1| = {worst:.3f} (goal <= 0.05); "
          f"program decode tick at batch 1 = {program.schedule('decode', 1)['step_s'] * 1e3:.3f} ms")
    executor.close()


def measure_prefill(executor, prompt: int, chunk: int, repeats: int) -> float:
    def run() -> float:
        start = time.perf_counter()
        for k in range(math.ceil(prompt / chunk)):
            n = min(chunk, prompt - k * chunk)
            executor.step(StepBatch("prefill", 1, chunk, (0,), ((5,) * n,), (k * chunk,), (GREEDY,)))
        return time.perf_counter() - start
    run()
    return statistics.median(run() for _ in range(repeats))


def ray_vs_local(args) -> None:
    import ray

    name = "small"
    model = scheduler.get_model(name)
    print(f"\n## RayExecutor vs LocalExecutor ({name} fp32, decode, context 128)")
    print(f"{'stages':>6} {'batch':>5} {'local ms':>9} {'ray ms':>9} {'ray/local':>9}  (actor threads = cores / stages)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for stages in (1, 2):
            plan = one_stage_plan(model, "fp32", 8, 512, stages)
            # Each actor gets its share of the cores, as the LocalExecutor has them all.
            threads = max(1, torch.get_num_threads() // stages)
            local, remote = LocalExecutor(plan), make_executor(plan, "ray", threads_per_actor=threads)
            for bucket in (1, 8):
                batch = decode_batch(bucket, 128)
                t_local = median_step(local, batch, args.steps)
                t_ray = median_step(remote, batch, args.steps)
                print(f"{stages:>6} {bucket:>5} {t_local * 1e3:>9.3f} {t_ray * 1e3:>9.3f} {t_ray / t_local:>9.3f}")
            remote.close()
            local.close()
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40, help="timed steps per figure (median)")
    parser.add_argument("--rounds", type=int, default=3, help="calibrate-then-measure rounds (medians)")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    bandwidth = measure_memory_bandwidth()
    roofline(args, bandwidth)
    predictions(args)
    if not args.skip_ray:
        ray_vs_local(args)


if __name__ == "__main__":
    main()
