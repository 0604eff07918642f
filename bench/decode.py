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
from server.calibrate import calibrate, measure_memory_bandwidth
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
    name, max_context, chunk = "small", 2048, 256
    model = scheduler.get_model(name)
    print(f"\n## Calibrated predictions ({name} fp32, cpu:1, max context {max_context}, prefill chunk {chunk})")
    start = time.perf_counter()
    cal_doc = calibrate(model, "fp32", 8, max_context, chunk, repeats=args.steps // 2)
    print(f"calibration took {time.perf_counter() - start:.0f} s")
    cal = Calibration.from_json(cal_doc)
    options = CompileOptions(dtype="fp32", max_context=max_context, prefill_chunk=chunk)
    program = scheduler.compile(model, scheduler.parse_pool("cpu:1"), options, cal)
    timeline = plan(model, scheduler.parse_pool("cpu:1"), options, cal)
    (stage,) = timeline.stages
    executor = LocalExecutor(one_stage_plan(model, "fp32", 8, max_context))
    print(f"{'phase':<8} {'batch':>5} {'context':>7} {'predicted ms':>12} {'measured ms':>11} {'predicted/measured':>18}")
    errors = []
    for bucket in (1, 8):
        for context in (100, 300, 700, 1500, 2048):
            predicted = timeline.stage_time(stage, bucket, 1, context - 1) + timeline.feedback_time(bucket)
            measured = median_step(executor, decode_batch(bucket, context), args.steps)
            errors.append(predicted / measured)
            print(f"{'decode':<8} {bucket:>5} {context:>7} {predicted * 1e3:>12.3f} {measured * 1e3:>11.3f} "
                  f"{predicted / measured:>18.3f}")
    for prompt in (64, 256, 1000):
        predicted = timeline.ttft(prompt, chunk)
        measured = measure_prefill(executor, prompt, chunk, args.steps // 4)
        errors.append(predicted / measured)
        print(f"{'prefill':<8} {1:>5} {prompt:>7} {predicted * 1e3:>12.3f} {measured * 1e3:>11.3f} "
              f"{predicted / measured:>18.3f}")
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
    return statistics.median(run() for _ in range(max(repeats, 3)))


def ray_vs_local(args) -> None:
    import ray

    name = "small"
    model = scheduler.get_model(name)
    print(f"\n## RayExecutor vs LocalExecutor ({name} fp32, decode, context 128)")
    print(f"{'stages':>6} {'batch':>5} {'local ms':>9} {'ray ms':>9} {'ray/local':>9}")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for stages in (1, 2):
            plan = one_stage_plan(model, "fp32", 8, 512, stages)
            local, remote = LocalExecutor(plan), make_executor(plan, "ray")
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
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    bandwidth = measure_memory_bandwidth()
    roofline(args, bandwidth)
    predictions(args)
    if not args.skip_ray:
        ray_vs_local(args)


if __name__ == "__main__":
    main()
