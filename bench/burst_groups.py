"""How bursts of simultaneous arrivals go in: `--rounds` bursts of 8 (bench/peer_vllm.py's
client and burst, 1 s apart) against one fresh `lockstep serve --model smollm2-135m
--no-ray` with a tick log, then, per burst, from the log: the arrivals' spread at the
door, the prefill and mixed ticks until all eight have their first token, and the latest
first token promised. A burst "trickled" when its later prompts went in as mixed-step
slices beside the first ones' streams instead of by prefill steps of its group
(docs/architecture.md, "Arrival groups": the window closed on its first step's first
token before they reached the core).

    .venv/bin/python bench/burst_groups.py [--rounds 10] [--lockstep-flags "--window-grace-ms 2"]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import peer_vllm  # bench/peer_vllm.py: a script's own folder is on sys.path


def bursts(log: list[dict], n: int, size: int = 8) -> list[dict]:
    """Per burst (the last `n` x `size` requests of the log, in arrival order): the door's
    spread, the latest promised first token (ms from the first arrival), and the ticks
    with a prompt slice until all its first tokens were made."""
    ticks = [r for r in log if "tick" in r]
    reqs = sorted((r for r in log if "id" in r), key=lambda r: r["arrival_ms"])[-n * size:]
    out = []
    for g in range(n):
        group = reqs[g * size:(g + 1) * size]
        a0 = group[0]["arrival_ms"]
        made = max(r["arrival_ms"] + r["made_ms"][0] for r in group if r["made_ms"])
        steps = [t for t in ticks if a0 < t["end_ms"] <= made + 1e-6 and t["phase"] in ("prefill", "mixed")]
        out.append({"spread_ms": group[-1]["arrival_ms"] - a0,
                    "promised_ms": max(r["arrival_ms"] + r["ttft_ms"] for r in group) - a0,
                    "prefill": sum(t["phase"] == "prefill" for t in steps),
                    "mixed": sum(t["phase"] == "mixed" for t in steps)})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--lockstep-flags", default="", help="more `lockstep serve` flags")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "ticks.jsonl"
        proc, url, _ = peer_vllm.start_lockstep(["--tick-log", str(log_path), *args.lockstep_flags.split()],
                                                Path(tmp) / "serve.log")
        try:
            peer_vllm.closed(url, 1, 3)  # warm: the first streams of a fresh server
            peer_vllm.burst(url, 8, args.rounds)
        finally:
            peer_vllm.stop(proc)
        log = [json.loads(line) for line in log_path.read_text().splitlines()]
    rows = bursts(log, args.rounds)
    print(f"{'burst':>5s} {'door spread ms':>14s} {'prefill ticks':>13s} {'mixed ticks':>11s} "
          f"{'last promised ms':>16s}")
    for i, b in enumerate(rows):
        print(f"{i:5d} {b['spread_ms']:14.1f} {b['prefill']:13d} {b['mixed']:11d} {b['promised_ms']:16.1f}")
    promised = sorted(b["promised_ms"] for b in rows)
    print(f"trickled (a mixed tick before the last first token): {sum(b['mixed'] > 0 for b in rows)} of {len(rows)}; "
          f"last first token promised p50 {promised[len(promised) // 2]:.0f} ms, max {promised[-1]:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
