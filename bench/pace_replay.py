"""What a lone stream's cadence could be on this host: the decode steps of tick logs
(`lockstep serve --tick-log PATH`) replayed under pacing rules, each stream promised from
the decode ticks before it, as the engine promises it at admission.

A stream of the log (a one-prompt prefill tick, then its batch-1 decode ticks) is promised
one token per `factor x program step`; the factor comes from the ratios (measured /
program step time) of the last `--window` decode ticks before its prefill, under each
rule. The stream starts with `--lead` program steps of lead (its first token's tail), and
its decode steps, as they ran, spend or win lead; a token is late when its lead is below
zero. The served rule is the pacer's re-estimate (server/core/pacing.py: the 95th
percentile of the last 128 ticks + 10%); the others trade cadence for lateness. A lower
factor is more tokens per second at c=1 (tokens/s goes as 1 / factor); a late token is an
overrun. It replays the steps as they ran: a rule that paced them otherwise would not have
changed them (the engine runs its steps back to back, ahead of the promises).

    .venv/bin/python bench/pace_replay.py out/*-ticks.jsonl [--lead 0.2] [--window 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.core.pacing import quantile as _quantile  # noqa: E402  the pacer's own reading


RULES = {
    "p95 +10% (served)": lambda h: _quantile(h, 0.95) * 1.10,
    "p95": lambda h: _quantile(h, 0.95),
    "p90 +5%": lambda h: _quantile(h, 0.90) * 1.05,
    "mean +15%": lambda h: statistics.mean(h) * 1.15,
    "mean +10%": lambda h: statistics.mean(h) * 1.10,
    "median +10%": lambda h: statistics.median(h) * 1.10,
}


def streams(ticks: list[dict]) -> list[tuple[int, list[dict]]]:
    """(index of its prefill tick, its batch-1 decode ticks) for each lone stream."""
    out, start, run = [], None, None
    for i, t in enumerate(ticks):
        if t["phase"] == "prefill":
            if run:
                out.append((start, run))
            start, run = (i, []) if len(t["rows"]) == 1 else (None, None)
        elif run is not None:
            if t["phase"] == "decode" and t["key"][1] == 1:
                run.append(t)
            else:
                out.append((start, run))
                start, run = None, None
    if run:
        out.append((start, run))
    return [(s, r) for s, r in out if len(r) >= 8]


def replay(ticks: list[dict], rule, lead: float, window: int) -> dict | None:
    ratios = [(i, t["measured_ms"] / t["program_ms"]) for i, t in enumerate(ticks)
              if t["phase"] == "decode" and not t.get("cold") and t["program_ms"] > 0]
    factors, tokens, late, lateness = [], 0, 0, []
    for start, run in streams(ticks):
        history = [r for i, r in ratios if i < start][-window:]
        if len(history) < window // 2:
            continue  # the server's first streams: the pacer had not estimated yet
        factor = rule(history)
        factors.append(factor)
        ahead = lead  # program steps of lead
        for t in run:
            ahead += factor - t["measured_ms"] / t["program_ms"]
            tokens += 1
            late += ahead < 0
            lateness.append(-ahead * t["program_ms"])
    if not tokens:
        return None
    return {"streams": len(factors), "tokens": tokens, "factor": statistics.mean(factors),
            "late": late / tokens, "late_p99_ms": _quantile(lateness, 0.99)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logs", nargs="+", type=Path, help="tick logs (lockstep serve --tick-log)")
    p.add_argument("--lead", type=float, default=0.2, help="a stream's lead at its first decode step, in program "
                                                           "steps (default 0.2: its first token's tail here)")
    p.add_argument("--window", type=int, default=128, help="decode ticks a promise is paced from (default 128)")
    args = p.parse_args()
    print(f"lone streams' decode steps replayed; lead {args.lead} program steps, window {args.window} ticks")
    print(f"{'log':28s} {'rule':18s} {'streams':>7s} {'factor':>7s} {'vs served':>9s} {'late':>7s} {'late p99':>9s}")
    for path in args.logs:
        try:
            ticks = [r for r in map(json.loads, path.read_text().splitlines()) if "tick" in r]
        except (OSError, ValueError) as exc:
            print(f"pace_replay: {path}: {exc}", file=sys.stderr)
            return 2
        served = None
        for name, rule in RULES.items():
            r = replay(ticks, rule, args.lead, args.window)
            if r is None:
                print(f"{path.name:28s} no lone stream with {args.window // 2}+ decode ticks before it")
                break
            served = served or r["factor"]
            print(f"{path.name:28s} {name:18s} {r['streams']:7d} {r['factor']:7.3f} {served / r['factor']:8.2f}x "
                  f"{r['late']:7.2%} {r['late_p99_ms']:+8.1f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
