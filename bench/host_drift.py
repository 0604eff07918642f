"""How this host's speed moves by itself, minute to minute: memory read bandwidth and a
small bf16 matmul, measured over and over with nothing else running (no server, no
client), reported per window.

A decode step streams its weights: its time follows the read bandwidth. Every paced
promise has to cover the slow spells this shows; a peer that makes no promises (vLLM)
just runs slower in them.

    .venv/bin/python bench/host_drift.py [--seconds 120] [--window-s 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--window-s", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (serve uses one per core)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    big = torch.randn(64 << 20)  # 256 MB of fp32: past every cache
    w = torch.randn(1536, 576, dtype=torch.bfloat16)  # smollm2-135m's down projection, [in, out]
    x = torch.randn(8, 1536, dtype=torch.bfloat16)  # a batch-8 decode step's rows
    print(f"{args.threads} threads; per {args.window_s:g} s window: read bandwidth (sum of 256 MB) and a "
          f"[8 x 1536] x [1536 x 576] bf16 matmul, medians")
    print(f"{'t s':>6} {'read GB/s':>10} {'matmul us':>10}")
    bws, mms = [], []
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        bw, mm = [], []
        end = time.perf_counter() + args.window_s
        while time.perf_counter() < end:
            t = time.perf_counter()
            big.sum()
            bw.append(big.numel() * 4 / (time.perf_counter() - t) / 1e9)
            t = time.perf_counter()
            for _ in range(100):
                x @ w
            mm.append((time.perf_counter() - t) / 100 * 1e6)
        bws.append(statistics.median(bw))
        mms.append(statistics.median(mm))
        print(f"{time.perf_counter() - start:>6.0f} {bws[-1]:>10.1f} {mms[-1]:>10.1f}", flush=True)
    print(f"windows: {len(bws)}; read bandwidth {min(bws):.1f}-{max(bws):.1f} GB/s (max/min {max(bws) / min(bws):.2f}, "
          f"median {statistics.median(bws):.1f}); matmul {min(mms):.1f}-{max(mms):.1f} us "
          f"(max/min {max(mms) / min(mms):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
