"""Compiled-step packages built with two sets of Inductor options, side by side: the build
time of each, then the same step shapes on both, rounds alternating, medians (one process,
smollm2-135m's real weights, serve's slots and context). How COMPILED_VERSION 3 dropped
autotuning (server/runtime/compiled.py: INDUCTOR_OPTIONS; BENCHMARKS.md).

    .venv/bin/python bench/compiled_options.py --dtype bf16

Each variant builds into a cache folder of its own (--cache, default a temporary one), with
a fresh Inductor cache, so its build time is a first build's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

VARIANTS = {
    "autotuned": {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"},
    "plain": {"freezing": True},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cache", default="", help="a folder for the variants' packages (default: a temporary one)")
    args = p.parse_args()
    cache = Path(args.cache or tempfile.mkdtemp(prefix="lockstep-options-"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))  # read when torch imports

    sys.path.insert(0, str(Path(__file__).parent))
    import scheduler
    from decode import decode_batch, one_stage_plan
    from server.runtime import compiled, gguf
    from server.runtime.executor import LocalExecutor
    from server.runtime.step import full_batch

    _, checkpoint = gguf.resolve("smollm2-135m", "")
    plan = replace(one_stage_plan(scheduler.get_model(checkpoint), args.dtype, 8, 1024), checkpoint=checkpoint,
                   compiled=True)
    executors = {}
    for name, options in VARIANTS.items():
        compiled.INDUCTOR_OPTIONS = options  # part of the package's key
        compiled.CACHE_DIR = cache / name
        start = time.perf_counter()
        executors[name] = LocalExecutor(plan)
        print(f"{args.dtype} {name}: {executors[name].runners[0].compile_note} "
              f"(executor in {time.perf_counter() - start:.0f} s)", flush=True)
    shapes = {"decode b1": decode_batch(1, 128), "decode b4": decode_batch(4, 128), "decode b8": decode_batch(8, 128),
              "decode b8@512": decode_batch(8, 512), "prefill 16": full_batch("prefill", 1, 16, 16, 8),
              "prefill 64": full_batch("prefill", 1, 64, 64, 8)}
    times: dict = {}
    for _ in range(args.rounds):
        for name, executor in executors.items():
            for shape, batch in shapes.items():
                executor.step(batch)
                times.setdefault((name, shape), []).extend(executor.step(batch).step_time_s for _ in range(3))
    a, b = VARIANTS
    print(f"{'step':<14} {a + ' ms':>13} {b + ' ms':>9} {b + '/' + a:>16}")
    for shape in shapes:
        x, y = (statistics.median(times[name, shape]) * 1e3 for name in (a, b))
        print(f"{shape:<14} {x:>13.1f} {y:>9.1f} {y / x:>16.2f}")


if __name__ == "__main__":
    main()
