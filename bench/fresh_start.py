"""A fresh server's first streams: does the start-up pace hold its first promises?

Starts `lockstep serve` (smollm2-135m, `--no-ray`, `--tick-log`) and sends it `--requests`
streaming completions one after another over its OpenAI door with `bench/peer_vllm.py`'s
prompt (32 tokens each, `ignore_eos`), nothing before them: the first ticks a user's
first requests get. Then, per request, from the tick log: its prefill step, its decode
steps' median and worst, the decode tick's paced time when it ran, how many of its ticks
overran (a token made after its promised time), and the TPOT it was promised. The pace
starts from a quiet measurement (the time scale x the start-up band; server/core/build.py,
START_GUARD) and follows the served steps after 128 decode ticks (4 requests here).

    .venv/bin/python bench/fresh_start.py [--requests 6] [--out out/fresh-start] [serve flags ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import peer_vllm  # bench/peer_vllm.py: a script's own folder is on sys.path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--out", type=Path, default=Path("out/fresh-start"))
    args, serve_flags = p.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "ticks.jsonl").resolve()
    log.unlink(missing_ok=True)
    proc, base, _ = peer_vllm.start_lockstep(["--tick-log", str(log), *serve_flags], args.out / "serve.log")
    try:
        for _ in range(args.requests):
            if (rec := peer_vllm.one(base)).error:  # the peer bench's own streaming client
                raise RuntimeError(rec.error)
    finally:
        peer_vllm.stop(proc)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    ticks = [x for x in lines if "tick" in x]
    served = [x for x in lines if "request" in x]
    print(f"{'request':>7} {'prefill ms':>10} {'decode p50 ms':>13} {'decode max ms':>13} {'decode paced ms':>15} "
          f"{'overruns':>8} {'TPOT promised ms':>16}")
    overruns = 0
    for i, r in enumerate(served):  # one request at a time: its ticks end between its arrival and its last token
        own = [t for t in ticks if r["arrival_ms"] < t["end_ms"] <= r["arrival_ms"] + r["made_ms"][-1] + 0.01]
        decode = [t for t in own if t["phase"] == "decode"]
        steps = [t["measured_ms"] for t in decode]
        over = sum(t["overrun"] for t in own)
        overruns += over
        print(f"{i:>7} {own[0]['measured_ms']:>10.1f} {statistics.median(steps):>13.1f} {max(steps):>13.1f} "
              f"{statistics.median(t['paced_ms'] for t in decode):>15.2f} {over:>8} {r['tpot_ms']:>16.2f}")
    print(f"{overruns} of {len(ticks)} ticks overran; tick log {log}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
