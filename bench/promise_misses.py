"""Where a client's promise misses come from: the engine, the door, or the way between.

Starts `lockstep serve` with `--tick-log` and drives it with `bench/peer_vllm.py`'s own
streaming client (c=1, c=8, 8 simultaneous arrivals). `perf_counter` is CLOCK_MONOTONIC,
one clock for every process of the host, and each client record joins its request's line
of the tick log by the id the door sent it (`x-request-id`), so every token splits into:

- the client's send to the door's first read of the request (the promise counts from there);
- when the engine made the token against its promised time (negative: early, held);
- the client's receipt after the token could go: after max(promised, made);

and the client's miss (receipt against send + promise, as `bench/peer_vllm.py` counts it),
within max(10% of the TPOT, 5 ms). And where the token went out: the share released while
a step of the log ran, and for those and the others apart the share whose way took more
than 5 ms (a Python front end and client that wake for a token take a core from a step;
docs/architecture.md, "A step beside a delivery").

    .venv/bin/python bench/promise_misses.py [--out out/misses] [serve flags ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

import peer_vllm  # bench/peer_vllm.py: a script's own folder is on sys.path

LOADS = [("c=1", lambda url: peer_vllm.closed(url, 1, 12)), ("c=8", lambda url: peer_vllm.closed(url, 8, 32)),
         ("burst 8", lambda url: peer_vllm.burst(url, 8, 2))]


def split(ticks: list[dict], recs: list[peer_vllm.Rec]) -> dict[str, np.ndarray]:
    """Per token, in ms: `door` (client send -> the door's read), `made` (made - promised),
    `way` (client receipt - max(promised, made)), `miss` (receipt - send - promised),
    `bound` (max(10% TPOT, 5 ms)) and `inside` (1 if it was released, at max(promised,
    made), while a step of the log ran, else 0); per request, `ttft` (promised) and `first`
    (its first token made - promised); for the client records that join a request of the log."""
    t0 = ticks[0]["start"]["perf_counter_s"]
    served = {x["id"]: x for x in ticks if "request" in x}  # by the id the client got (x-request-id)
    steps = sorted((x["end_ms"] - x["measured_ms"], x["end_ms"]) for x in ticks if "tick" in x)
    ends = np.array([end for _, end in steps])
    out: dict[str, list[float]] = {k: [] for k in ("door", "made", "way", "miss", "bound", "inside", "first", "ttft")}
    for c in recs:
        r = served.get(c.request_id)
        if r is None or not c.tokens_s:
            continue
        arrival = t0 + r["arrival_ms"] / 1e3
        out["door"].append((arrival - c.send_s) * 1e3)
        out["ttft"].append(r["ttft_ms"])
        out["first"].append(r["made_ms"][0] - r["ttft_ms"])
        for k, (made, got) in enumerate(zip(r["made_ms"], c.tokens_s)):
            due = r["ttft_ms"] + k * r["tpot_ms"]
            out["made"].append(made - due)
            out["way"].append((got - arrival) * 1e3 - max(due, made))
            out["miss"].append((got - c.send_s) * 1e3 - due)
            out["bound"].append(max(0.1 * r["tpot_ms"], 5.0))
            out["inside"].append(_inside(steps, ends, r["arrival_ms"] + max(due, made)))
    return {k: np.array(v) for k, v in out.items()}


def _inside(steps: list[tuple[float, float]], ends: np.ndarray, at_ms: float) -> float:
    """1.0 if `at_ms` (since the log's start) falls within a step (its end - measured, its
    end), else 0.0; `steps` sorted, `ends` their ends."""
    i = int(np.searchsorted(ends, at_ms))
    return float(i < len(steps) and steps[i][0] <= at_ms)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/misses", help="folder for the tick log, the server's log and the client records")
    args, serve_flags = p.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "ticks.jsonl"
    log.unlink(missing_ok=True)
    proc, base, _ = peer_vllm.start_lockstep(["--tick-log", str(log.resolve()), *serve_flags], out / "serve.log")
    records = {}
    try:
        peer_vllm.closed(base, 1, 2)  # warm
        for name, load in LOADS:
            peer_vllm.settle()
            records[name] = load(base)
    finally:
        peer_vllm.stop(proc)
    time.sleep(0.5)
    (out / "client.json").write_text(json.dumps({k: [dataclasses.asdict(r) for r in v] for k, v in records.items()}))
    ticks = [json.loads(line) for line in log.read_text().splitlines()]
    print(f"per token, ms (p50 / p99); made: against its promise (negative: early, held); "
          f"way: the client's receipt after max(promised, made); {log}")
    print(f"{'load':8} {'tokens':>6} {'send->door':>13} {'made - promised':>17} {'way':>13} {'client miss':>13} "
          f"{'within bound':>13} {'late at the engine':>19} {'TTFT promised':>14} {'first made - promised':>22} "
          f"{'released in a step':>19} {'way > 5 ms: in a step / between':>32}")
    for name, recs in records.items():
        s = split(ticks, recs)
        if not len(s["miss"]):
            print(f"{name:8} no client record joined the tick log")
            continue

        def pair(x):
            return f"{np.percentile(x, 50):.1f} / {np.percentile(x, 99):.1f}"

        inside = s["inside"] > 0
        slow = [f"{np.mean(s['way'][part] > 5.0):.1%}" if part.any() else "-" for part in (inside, ~inside)]
        print(f"{name:8} {len(s['miss']):6d} {pair(s['door']):>13} {pair(s['made']):>17} {pair(s['way']):>13} "
              f"{pair(s['miss']):>13} {np.mean(np.abs(s['miss']) <= s['bound']):13.1%} "
              f"{np.mean(s['made'] > 0):19.1%} {np.percentile(s['ttft'], 50):14.1f} {pair(s['first']):>22} "
              f"{np.mean(inside):19.1%} {' / '.join(slow):>32}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
