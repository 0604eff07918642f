"""Prefill speed: a prompt slice's step against the host's matmul throughput and against
transformers eager on the same model and weights, measured in rounds in one process.

Per round, in turn: Lockstep's prefill step of one 64-token slice (LocalExecutor, packed
rows, at position 0), `transformers`' LlamaForCausalLM forward over the same 64 tokens
(eager, no cache reuse, the same seeded weights: bench/peer_rayserve.build_hf_model), and
the step's block linears alone (every one in order, on 64 rows of random
activations), and a 2048 x 2048 matmul in the same dtype (fp32, or bf16 on oneDNN's AMX / AVX-512 kernels). Medians over the rounds. A prefill token costs about 2 x a
block's parameters FLOPs per block (attention over <= 64 keys is small), and the LM head
runs once (both sides compute logits for the last token only), so

    achieved FLOP/s = (2 x block params x blocks x tokens + 2 x head params) / step seconds,

and its share of the matmul's.

    .venv/bin/python bench/prefill.py [--model small] [--tokens 64] [--rounds 9] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from pathlib import Path

import torch

import scheduler
from server.runtime.calibrate import _median_time, measure_matmul_flops
from server.runtime.executor import LocalExecutor
from server.runtime.stage import RuntimePlan, StageSpec
from server.runtime.model import TORCH_DTYPES, Linear
from server.runtime.sampling import GREEDY
from server.runtime.step import StepBatch

REPO = Path(__file__).resolve().parents[1]


def _peer():
    spec = importlib.util.spec_from_file_location("peer_rayserve", REPO / "bench" / "peer_rayserve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="weights and compute (default fp32)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = scheduler.get_model(args.model)
    n = args.tokens
    plan = RuntimePlan(spec, args.dtype, 8, max(1024, n), (StageSpec(0, 0, spec.num_layers + 2, "cpu"),), seed=0)
    ours = LocalExecutor(plan)
    step = StepBatch("prefill", 1, n, (0,), (tuple(range(1, n + 1)),), (0,), (GREEDY,))
    _, hf = _peer().build_hf_model(args.model, seed=0, dtype=args.dtype)
    ids = torch.arange(1, n + 1)[None]

    def hf_forward():
        with torch.inference_mode():
            hf(ids, use_cache=False, logits_to_keep=1)  # logits for the last token only, as Lockstep

    # The step's linears alone, every block's in order on n rows of random activations
    # (weights streamed from memory as in the step): the ceiling the rest of the step
    # (attention, norms, RoPE, the head's one row) is measured against.
    linears = [m for m in ours.runners[0].model.modules() if isinstance(m, Linear) and m is not
               getattr(ours.runners[0].model, "lm_head", None)]
    inputs = {w: torch.randn(n, w).to(TORCH_DTYPES[args.dtype]) for w in {m.in_features for m in linears}}

    def linears_only():
        for m in linears:
            m(inputs[m.in_features])

    for _ in range(3):  # warm-up: first steps of a shape are much slower (oneDNN primitives)
        ours.step(step)
        hf_forward()
        linears_only()
    samples = {"lockstep": [], "transformers": [], "matmul_flops": [], "linears": []}
    for _ in range(args.rounds):
        samples["lockstep"].append(_median_time(lambda: ours.step(step), 3, warmup=0))
        samples["linears"].append(_median_time(linears_only, 3, warmup=0))
        samples["transformers"].append(_median_time(hf_forward, 3, warmup=0))
        samples["matmul_flops"].append(measure_matmul_flops(TORCH_DTYPES[args.dtype], repeats=3))
    ours_s, hf_s = statistics.median(samples["lockstep"]), statistics.median(samples["transformers"])
    peak = statistics.median(samples["matmul_flops"])
    flops = 2 * n * spec.num_layers * spec.block_params + 2 * spec.head_params  # blocks per token, head once
    print(f"{args.model}: {spec.num_params / 1e6:.0f}M params, {n}-token prefill, {args.dtype}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds (medians)")
    print(f"{'':<14} {'step ms':>9} {'tokens/s':>9} {'GFLOP/s':>8} {'of matmul':>10}")
    for name, seconds in (("lockstep", ours_s), ("transformers", hf_s)):
        print(f"{name:<14} {seconds * 1e3:>9.1f} {n / seconds:>9.0f} {flops / seconds / 1e9:>8.0f} "
              f"{flops / seconds / peak:>10.0%}")
    lin_s, lin_flops = statistics.median(samples["linears"]), 2 * n * spec.num_layers * spec.block_params
    print(f"{'its linears':<14} {lin_s * 1e3:>9.1f} {'':>9} {lin_flops / lin_s / 1e9:>8.0f} {lin_flops / lin_s / peak:>10.0%}")
    print(f"{'matmul 2048²':<14} {'':>9} {'':>9} {peak / 1e9:>8.0f} {'100%':>10}")
    print(f"lockstep / transformers step time: {ours_s / hf_s:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
