"""Compile time at scale: llama-2-70b int8 on 576 LPU-like chips, and a ~1.1T-parameter
dense model (`dense-1t`) int8 on 10,440 of them (the size of Groq's largest system).

Prints, per case, the median and worst wall time over --repeats compiles in this process
(the first, cold, run included in the worst), the ratio to the goal (under 1 s and under
10 s), and the plan hash of every run (they must all be equal: determinism).

    .venv/bin/python bench/compile_scale.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import scheduler

CASES = [
    # (model, pool, dtype, objective, goal seconds)
    ("llama-2-70b", "lpu:576", "int8", "latency", 1.0),
    ("llama-2-70b", "lpu:576", "int8", "throughput", 1.0),
    ("dense-1t", "lpu:10440", "int8", "latency", 10.0),
    ("dense-1t", "lpu:10440", "int8", "throughput", 10.0),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'model':<12} {'pool':<10} {'objective':<10} {'params':>8} {'devices':>8} "
          f"{'median s':>9} {'worst s':>8} {'goal s':>7} {'median/goal':>11}  plan")
    for model_name, pool_text, dtype, objective, goal in CASES:
        model, pool = scheduler.get_model(model_name), scheduler.parse_pool(pool_text)
        options = scheduler.CompileOptions(dtype=dtype, objective=objective)
        times, hashes = [], set()
        for _ in range(args.repeats):
            start = time.perf_counter()
            program = scheduler.compile(model, pool, options)
            times.append(time.perf_counter() - start)
            hashes.add(program.plan_hash)
        assert len(hashes) == 1, f"non-deterministic plan: {hashes}"
        median = statistics.median(times)
        print(f"{model_name:<12} {pool_text:<10} {objective:<10} {model.num_params / 1e9:>7.0f}B "
              f"{program.data['devices_used']:>8} {median:>9.3f} {max(times):>8.3f} {goal:>7.1f} "
              f"{median / goal:>11.3f}  {program.plan_hash[:12]}")


if __name__ == "__main__":
    main()
