"""Decode step benchmarks, measured side by side in one run.

1. Bare decode step (LocalExecutor.step: pad, run all layers, sample) for `tiny` and
   `small` at batch 1 and 8, against the memory roofline: weight bytes / measured memory
   read bandwidth. Ratio = roofline / measured (1.0 would be every byte at full speed).
2. Calibrated predictions: `lockstep calibrate`'s measurement, then the compiler's
   predicted step time against freshly measured steps at contexts between the
   calibrated points, and predicted vs measured prefill (TTFT) for a few prompt lengths.
3. Decode attention per row against one call per layer (server/runtime/model.py), and
   linears one call each against q, k, v and gate, up as one (`--only fused`).
4. RayExecutor (one actor per stage, Ray Compiled Graph) against LocalExecutor, same plan.
5. Eager against compiled steps (`--only compiled`): decode against the memory floor, a
   64-token prefill against the matmul rate.

    .venv/bin/python bench/decode.py [--steps 40] [--skip-ray] [--only roofline|attention|prompts|fused|compiled]
    .venv/bin/python bench/decode.py --only compiled --models smollm2-135m --dtypes fp32,bf16 --rounds 5
    .venv/bin/python bench/decode.py --only predictions --models smollm2-135m --dtypes bf16 --rounds 5
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time

import torch

import scheduler
from scheduler.compiler import CompileOptions, plan
from scheduler.cost import Calibration
from scheduler.ticks import slice_shape
from server.runtime.calibrate import Calibrator, measure_memory_bandwidth
from server.runtime.executor import LocalExecutor, make_executor
from server.runtime.model import TORCH_DTYPES
from server.runtime.stage import RuntimePlan, StageSpec
from server.runtime.sampling import GREEDY
from server.runtime.step import StepBatch


def decode_batch(bucket: int, context: int) -> StepBatch:
    rows = range(bucket)
    return StepBatch("decode", bucket, 1, tuple(rows), tuple((7,) for _ in rows),
                     tuple(context - 1 for _ in rows), tuple(GREEDY for _ in rows))


def decode_read_bytes(spec, dtype: str) -> int:
    """What a decode step reads: every block, the final norm and the LM head's whole matrix
    (tied or not), but of the input embedding only the rows looked up (~0)."""
    params = spec.num_layers * spec.block_params + spec.hidden_size + spec.embed_params
    return params * TORCH_DTYPES[dtype].itemsize


def median_step(executor, batch: StepBatch, steps: int) -> float:
    for _ in range(3):
        executor.step(batch)
    return statistics.median(executor.step(batch).step_time_s for _ in range(steps))


def one_stage_plan(model, dtype: str, slots: int, max_context: int, stages: int = 1) -> RuntimePlan:
    n = model.num_layers + 2
    cuts = [round(i * n / stages) for i in range(stages + 1)]
    specs = tuple(StageSpec(i, cuts[i], cuts[i + 1], "cpu") for i in range(stages))
    return RuntimePlan(model, dtype, slots, max_context, specs)


def roofline(args) -> None:
    """Memory read bandwidth measured right before and after each set of decode steps (not
    between steps: a 256 MB sweep would evict what the step keeps in cache)."""
    print(f"\n## Bare decode step vs memory roofline ({torch.get_num_threads()} threads, context 128; "
          f"bandwidth = reads of a 256 MB tensor, measured just before and after the steps)")
    print(f"{'model':<12} {'dtype':<5} {'batch':>5} {'weights MB':>10} {'read GB/s':>9} {'roofline ms':>11} "
          f"{'measured ms':>11} {'roofline/measured':>17}")
    from server.runtime import gguf

    for name in args.models.split(","):
        model = scheduler.get_model(gguf.resolve(name, "")[0])  # presets and the packaged smollm2-135m
        for dtype in args.dtypes.split(","):
            executor = LocalExecutor(one_stage_plan(model, dtype, 8, 512))
            weight_bytes = decode_read_bytes(model, dtype)
            for bucket in (1, 8):
                batch = decode_batch(bucket, 128)
                before = measure_memory_bandwidth(repeats=5)
                measured = median_step(executor, batch, args.steps)
                bandwidth = (before + measure_memory_bandwidth(repeats=5)) / 2
                ideal = weight_bytes / bandwidth
                print(f"{model.name[:12]:<12} {dtype:<5} {bucket:>5} {weight_bytes / 1e6:>10.1f} {bandwidth / 1e9:>9.1f} "
                      f"{ideal * 1e3:>11.3f} {measured * 1e3:>11.3f} {ideal / measured:>17.2f}")
            executor.close()


def attention(args) -> None:
    """One-token rows' attention one call per row against one call per key bucket and
    layer (server/runtime/model.BATCHED_DECODE), same executor, rounds alternating; the
    figure is each side's best round median."""
    from server.runtime import model as runtime_model

    from server.runtime import gguf

    model, _ = gguf.resolve("smollm2-135m", "")  # the packaged model's converted folder
    spec = scheduler.get_model(model)  # its shape, random weights: the cost is the shape's
    print(f"\n## Decode attention: per row vs one call per layer ({spec.name} fp32 shape, random weights, "
          f"{torch.get_num_threads()} threads)")
    print(f"{'batch':>5} {'keys':>5} {'per row ms':>10} {'batched ms':>10} {'batched/per row':>15}")
    executor = LocalExecutor(one_stage_plan(spec, "fp32", 8, 1024))
    try:
        for bucket in (1, 2, 4, 8):
            for context in (128, 1024):
                batch = decode_batch(bucket, context)
                best = {}
                for _ in range(3):
                    for batched in (False, True):
                        runtime_model.BATCHED_DECODE = batched
                        t = median_step(executor, batch, max(5, args.steps // 4))
                        best[batched] = min(best.get(batched, t), t)
                print(f"{bucket:>5} {context:>5} {best[False] * 1e3:>10.1f} {best[True] * 1e3:>10.1f} "
                      f"{best[True] / best[False]:>15.2f}")
    finally:
        runtime_model.BATCHED_DECODE = True
        executor.close()


def prompts(args) -> None:
    """A step's prompt slices one call each against one call per layer
    (server/runtime/model.BATCHED_PROMPTS), one executor per dtype, rounds alternating; the
    figure is each side's median over the rounds."""
    from server.runtime import gguf
    from server.runtime import model as runtime_model
    from server.runtime.step import full_batch

    spec = scheduler.get_model(gguf.resolve("smollm2-135m", "")[0])  # its shape, random weights
    print(f"\n## Prompt attention: one call per slice vs one per layer ({spec.name} shape, random weights, "
          f"{torch.get_num_threads()} threads; 64-token prefill steps of k packed prompts)")

    def packed(k: int, at: int = 0) -> StepBatch:
        return StepBatch("prefill", 1, 64, tuple(range(k)), tuple((5,) * (64 // k) for _ in range(k)),
                         tuple(at for _ in range(k)), tuple(GREEDY for _ in range(k)))

    shapes = {"1 prompt x 64": packed(1), "2 prompts x 32": packed(2), "4 prompts x 16": packed(4),
              "4 x 16 at 200 keys": packed(4, 200), "mixed 8 + 16": full_batch("mixed", 8, 16, 128, 8)}
    dtypes = args.dtypes.split(",")
    print(f"{'step':<20}" + "".join(f"{dt + ' per slice':>16}{dt + ' one call':>15}" for dt in dtypes))
    samples = {}
    try:
        for dt in dtypes:
            executor = LocalExecutor(one_stage_plan(spec, dt, 8, 1024))
            for _ in range(5):
                for batched in (False, True):
                    runtime_model.BATCHED_PROMPTS = batched
                    for name, batch in shapes.items():
                        executor.step(batch)
                        samples.setdefault((dt, batched, name), []).extend(
                            executor.step(batch).step_time_s for _ in range(4))
            executor.close()
    finally:
        runtime_model.BATCHED_PROMPTS = True
    for name in shapes:
        print(f"{name:<20}" + "".join(f"{statistics.median(samples[dt, False, name]) * 1e3:>16.1f}"
                                      f"{statistics.median(samples[dt, True, name]) * 1e3:>15.1f}" for dt in dtypes))


def fused(args) -> None:
    """Prepacked linears one call each against q, k, v as one and gate, up as one
    (server/runtime/model.FUSED_LINEARS), two executors side by side, rounds alternating;
    the figure is each side's best round median."""
    from server.runtime import gguf
    from server.runtime import model as runtime_model
    from server.runtime.step import full_batch

    model, _ = gguf.resolve("smollm2-135m", "")
    spec = scheduler.get_model(model)  # its shape, random weights: the cost is the shape's
    print(f"\n## Fused linears: one call each vs q, k, v and gate, up as one ({spec.name} fp32 shape, random "
          f"weights, {torch.get_num_threads()} threads, 128 keys)")
    print(f"{'step':<12} {'one each ms':>11} {'fused ms':>8} {'fused/one each':>14}")
    executors = {}
    try:
        for fuse in (False, True):
            runtime_model.FUSED_LINEARS = fuse
            executors[fuse] = LocalExecutor(one_stage_plan(spec, "fp32", 8, 1024))
        shapes = {"decode b1": decode_batch(1, 128), "decode b8": decode_batch(8, 128),
                  "prefill 32": full_batch("prefill", 1, 32, 128, 8), "prefill 64": full_batch("prefill", 1, 64, 128, 8)}
        for name, batch in shapes.items():
            best = {}
            for _ in range(4):
                for fuse, executor in executors.items():
                    t = median_step(executor, batch, max(5, args.steps // 3))
                    best[fuse] = min(best.get(fuse, t), t)
            print(f"{name:<12} {best[False] * 1e3:>11.1f} {best[True] * 1e3:>8.1f} {best[True] / best[False]:>14.3f}")
    finally:
        runtime_model.FUSED_LINEARS = True
        for executor in executors.values():
            executor.close()


def predictions(args) -> None:
    """Calibration and verification interleaved step by step (round-robin), so both
    see the same drift of this shared host; then predicted (from the calibration) vs
    measured (the verification steps, at contexts between the calibrated points).
    Default: `small` fp32 eager at context 2048, 256-token chunks; `--only predictions`
    takes --models (the first), --dtypes (the first), --max-context, --prefill-chunk and
    --compiled-steps (serve's shapes: smollm2-135m bf16 1024 64 on)."""
    if args.only == "predictions":
        name, dtype = args.models.split(",")[0], args.dtypes.split(",")[0]
        max_context, chunk, compiled = args.max_context, args.prefill_chunk, args.compiled_steps == "on"
    else:
        name, dtype, max_context, chunk, compiled = "small", "fp32", 2048, 256, False
    from server.runtime import gguf

    name, checkpoint = gguf.resolve(name, "")  # smollm2-135m: its real weights
    model = scheduler.get_model(checkpoint or name)
    print(f"\n## Calibrated predictions ({model.name} {dtype}{' compiled' if compiled else ''}, cpu:1, max context "
          f"{max_context}, prefill chunk {chunk}; {args.rounds} rounds of calibration and verification steps in "
          f"shuffled order, medians)")
    cal = Calibrator(model, dtype, 8, max_context, chunk, checkpoint=checkpoint, compiled=compiled)
    contexts = [c for c in (100, 300, 700, 1500, 2048) if c <= max_context] or [max_context]
    if max_context not in contexts:
        contexts.append(max_context)
    decode_points = [(b, c) for b in (1, 8) for c in contexts]
    prompts = tuple(p for p in (25, 64, 256, 1000) if p < max_context)  # 25: the peer benchmark's prompt
    measured: dict[tuple, list[float]] = {}
    start = time.perf_counter()
    for point in cal.points():  # warm-up
        cal.run(cal.batch(point.phase, point.batch, point.tokens))
    tasks = [("calibrate", p) for p in cal.points()] + [("decode", p) for p in decode_points] + \
        [("prefill", p) for p in prompts]
    for r in range(args.rounds):
        # A fresh seeded order each round: no point always follows the heavy prefill steps.
        for kind, what in random.Random(r).sample(tasks, len(tasks)):
            if kind == "calibrate":
                cal.sample(what)
            elif kind == "decode":
                measured.setdefault(("decode", *what), []).append(cal.run(decode_batch(*what)))
            else:
                measured.setdefault(("prefill", 1, what), []).append(prefill_time(cal.executor, what, chunk))
    doc = cal.document()
    cal.close()
    print(f"calibration and measurement took {time.perf_counter() - start:.0f} s")
    calibration = Calibration.from_json(doc)
    options = CompileOptions(dtype=dtype, max_context=max_context, prefill_chunk=chunk)
    program = scheduler.compile(model, scheduler.parse_pool("cpu:1"), options, calibration)
    timeline = plan(model, scheduler.parse_pool("cpu:1"), options, calibration)
    (stage,) = timeline.stages
    print(f"{'phase':<8} {'batch':>5} {'context':>7} {'predicted ms':>12} {'measured ms':>11} {'predicted/measured':>18}")
    errors = []
    for (phase, bucket, tokens), times in sorted(measured.items()):
        if phase == "decode":
            predicted = timeline.stage_time(stage, bucket, 1, tokens - 1) + timeline.feedback_time(bucket)
        else:  # one stage: Timeline.ttft's pipelining is its steps' sum
            predicted = predicted_prefill(timeline, stage, tokens, chunk)
        got = statistics.median(times)
        errors.append(predicted / got)
        print(f"{phase:<8} {bucket:>5} {tokens:>7} {predicted * 1e3:>12.3f} {got * 1e3:>11.3f} {predicted / got:>18.3f}")
    worst = max(abs(e - 1) for e in errors)
    print(f"worst |predicted/measured - 1| = {worst:.3f} (issue 20: <= 0.03 compiled, on a GPU <= 0.05); "
          f"program decode step at batch 1 = {program.schedule('decode', 1)['step_s'] * 1e3:.3f} ms "
          f"(at max context)")


def prompt_steps(prompt: int, chunk: int) -> list[tuple[int, int, int]]:
    """A prompt alone, as the engine runs it: (tokens, their step's static shape, position)
    per prefill step, whole chunks and then the rest in the smallest slice shape that holds
    it (scheduler/ticks.py: slice_shape; a 1000-token prompt's last 40 tokens go in a 48-token
    step, not a 64 one)."""
    return [(n, slice_shape(n, chunk), k * chunk)
            for k in range(math.ceil(prompt / chunk)) for n in (min(chunk, prompt - k * chunk),)]


def prefill_time(executor, prompt: int, chunk: int) -> float:
    return sum(executor.step(StepBatch("prefill", 1, shape, (0,), ((5,) * n,), (start,), (GREEDY,))).step_time_s
               for n, shape, start in prompt_steps(prompt, chunk))


def predicted_prefill(timeline, stage, prompt: int, chunk: int) -> float:
    """The timing model's time for prompt_steps' steps: each at its static shape (a padded
    step costs its shape's tokens), attending what comes before it."""
    return sum(timeline.stage_time(stage, 1, shape, start) for _, shape, start in prompt_steps(prompt, chunk))


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


def compiled_steps(args) -> None:
    """Eager against compiled steps (server/runtime/compiled.py), one executor each, same
    plan and weights, rounds alternating; medians over the rounds. Decode at batch 1 and 8
    (128 keys) against the memory floor (weight bytes / read bandwidth measured before and
    after the rounds), a 64-token prefill step (one slice at position 0) against the host's
    matmul rate in the same dtype (a 2048 x 2048 matmul, measured the same way). A prefill
    token costs 2 x a block's parameters FLOPs per block and the head runs for its last
    token only (bench/prefill.py's count). The packages are built (or loaded from the disk
    cache) first: `compile s`."""
    from dataclasses import replace

    from server.runtime import gguf
    from server.runtime.calibrate import measure_matmul_flops
    from server.runtime.step import full_batch

    for name in args.models.split(","):
        spec = scheduler.get_model(gguf.resolve(name, "")[0])  # its shape, random weights
        head = spec.vocab_size * spec.hidden_size  # the LM head's matrix
        block_flops = 2 * spec.num_layers * spec.block_params  # per token
        print(f"\n## Eager vs compiled steps ({spec.name}, random weights, {torch.get_num_threads()} threads, "
              f"{args.rounds} rounds)")
        print(f"{'dtype':<5} {'step':<16} {'eager ms':>9} {'compiled ms':>11} {'compiled/eager':>14} {'floor ms':>8} "
              f"{'eager of floor':>14} {'compiled of floor':>17}")
        for dtype in args.dtypes.split(","):
            plan = one_stage_plan(spec, dtype, 8, 1024)
            start = time.perf_counter()
            executors = {"eager": LocalExecutor(plan), "compiled": LocalExecutor(replace(plan, compiled=True))}
            note = executors["compiled"].runners[0].compile_note
            print(f"{dtype:<5} compiled steps {note} (executor built in {time.perf_counter() - start:.1f} s)")
            shapes = {"decode b1": decode_batch(1, 128), "decode b8": decode_batch(8, 128),
                      "prefill 64": full_batch("prefill", 1, 64, 64, 8)}
            samples: dict = {}
            bandwidth = [measure_memory_bandwidth(repeats=5)]
            flops = [measure_matmul_flops(TORCH_DTYPES[dtype])]
            for _ in range(args.rounds):
                for kind, executor in executors.items():
                    for shape, batch in shapes.items():
                        executor.step(batch)
                        samples.setdefault((kind, shape), []).extend(executor.step(batch).step_time_s for _ in range(3))
            bandwidth.append(measure_memory_bandwidth(repeats=5))
            flops.append(measure_matmul_flops(TORCH_DTYPES[dtype]))
            floor = decode_read_bytes(spec, dtype) / statistics.mean(bandwidth)
            rate = statistics.mean(flops)
            for shape in shapes:
                eager_s, compiled_s = (statistics.median(samples[k, shape]) for k in executors)
                if shape.startswith("decode"):
                    share = f"{floor * 1e3:>8.2f} {floor / eager_s:>14.2f} {floor / compiled_s:>17.2f}"
                else:  # prefill: of the matmul rate
                    work = block_flops * 64 + 2 * head
                    share = (f"{'matmul':>8} {work / eager_s / rate:>14.2f} {work / compiled_s / rate:>17.2f}")
                print(f"{dtype:<5} {shape:<16} {eager_s * 1e3:>9.2f} {compiled_s * 1e3:>11.2f} "
                      f"{compiled_s / eager_s:>14.2f} {share}")
            print(f"{dtype:<5} decode b8 / b1: eager {statistics.median(samples['eager', 'decode b8']) / statistics.median(samples['eager', 'decode b1']):.2f}, "
                  f"compiled {statistics.median(samples['compiled', 'decode b8']) / statistics.median(samples['compiled', 'decode b1']):.2f}; "
                  f"read {statistics.mean(bandwidth) / 1e9:.1f} GB/s, {dtype} matmul {rate / 1e9:.0f} GFLOP/s")
            for executor in executors.values():
                executor.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40, help="timed steps per figure (median)")
    parser.add_argument("--rounds", type=int, default=12, help="round-robin rounds of calibration and verification")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--only", choices=("roofline", "attention", "prompts", "fused", "compiled", "predictions"),
                        help="run this part alone")
    parser.add_argument("--max-context", type=int, default=1024, help="predictions: as serve's")
    parser.add_argument("--prefill-chunk", type=int, default=64, help="predictions: as serve's")
    parser.add_argument("--compiled-steps", choices=("on", "off"), default="on", help="predictions: as serve's")
    parser.add_argument("--models", default="tiny,small", help="roofline, compiled: models (presets or smollm2-135m)")
    parser.add_argument("--dtypes", default="fp32", help="roofline, prompts, compiled: weight dtypes, e.g. fp32,bf16")
    args = parser.parse_args()
    if args.only == "roofline":
        return roofline(args)
    if args.only == "prompts":
        return prompts(args)
    if args.only == "attention":
        return attention(args)
    if args.only == "fused":
        return fused(args)
    if args.only == "compiled":
        return compiled_steps(args)
    if args.only == "predictions":
        return predictions(args)
    roofline(args)
    attention(args)
    fused(args)
    predictions(args)
    if not args.skip_ray:
        ray_vs_local(args)


if __name__ == "__main__":
    main()
