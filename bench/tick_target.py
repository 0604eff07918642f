"""The mixed steps' tick target, side by side: two deterministic `lockstep serve --model
smollm2-135m` servers up at once, the default tick target (scheduler/compiler.py,
MIXED_STEP_FACTOR) and `--itl-target-ms` given, driven in turn by bench/peer_vllm.py's
open loop (2 req/s, gamma arrivals of shape 4, 24 requests; seeds 0, 1, ...).

    .venv/bin/python bench/tick_target.py [--other-ms 52.6] [--rounds 2] [--out out/tick-target]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("peer_vllm", REPO / "bench" / "peer_vllm.py")
peer = importlib.util.module_from_spec(spec)
sys.modules["peer_vllm"] = peer  # its dataclasses look their module up
spec.loader.exec_module(peer)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--other-ms", type=float, default=52.6, help="the other server's --itl-target-ms (default 52.6: "
                                                                  "1.25x smollm2-135m's batch-8 decode step here)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "out" / "tick-target")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    servers = {"default": peer.start_lockstep([], args.out / "default.log")}
    servers[f"{args.other_ms:g} ms"] = peer.start_lockstep(["--itl-target-ms", str(args.other_ms)],
                                                           args.out / "other.log")
    try:
        for _, base, _ in servers.values():
            peer.closed(base, 1, 2)  # warm-up
        for seed in range(args.rounds):
            for name, (_, base, metrics) in servers.items():
                before = peer._ticks(metrics)
                t0 = time.perf_counter()
                recs = peer.open_loop(base, 2.0, 4.0, 24, seed=seed)
                s = peer.summarize(recs, time.perf_counter() - t0)
                tpots = sorted({round((r.e2e_pred_s - r.ttft_pred_s) / (peer.OUTPUT_TOKENS - 1) * 1e3, 1)
                                for r in recs if r.e2e_pred_s})
                ticks, over = (a - b for a, b in zip(peer._ticks(metrics), before))
                print(f"{name:>8} seed {seed}: tok/s {s['tok_s']:.1f}  TTFT p50 {s['ttft_p50']:.1f}  p99 "
                      f"{s['ttft_p99']:.1f}  ITL p50 {s['itl_p50']:.1f}  p99/p50 {s['itl_ratio']:.2f}  within bound "
                      f"{s.get('within', 0):.0%}  overruns {over / max(ticks, 1):.1%}  promised TPOTs (ms) {tpots}", flush=True)
    finally:
        for proc, _, _ in servers.values():
            peer.stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
