"""`lockstep simulate`: a load test of a compiled program without a server.

Compiles the model onto the pool, then runs the engine's own tick scheduler over the
program's paced tick times (scheduler/simulate.py) for the same loads as `lockstep load`
(closed loop at --concurrency, or open loop at --rate with gamma arrivals, or a --sweep of
rates), and writes the same outputs: summary.json, requests.csv, latency PNGs, and for a
sweep sweep.json, sweep.png and a capacity table (tokens/s per user against requests/s).

    lockstep simulate --model llama-2-70b --dtype int8 --pool lpu:576 --sweep 0.5,1,2,4 \\
        --prompt-len 128 --output-len 128 --output out/sim
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import scheduler
from client.loadgen import LengthDist, arrival_times, make_specs, parse_slo
from client.report import RequestRecord, run_rates, summarize
from scheduler.errors import FitError, SpecError
from scheduler.program import ProgramView
from scheduler.fleet import POLICIES, simulate_fleet
from scheduler.simulate import SimRequest, paced_ticks, simulate_load


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lockstep simulate", description=__doc__.splitlines()[0])
    p.error = lambda message: p.exit(2, f"lockstep simulate: error: {message}\n")  # one line, exit 2
    p.add_argument("--model", required=True, help="preset name or path to a HF config.json")
    p.add_argument("--pool", required=True, help="e.g. lpu:576, h100:8, cpu")
    p.add_argument("--dtype", default="bf16", help="weight dtype (default bf16)")
    p.add_argument("--calibration", help="calibration JSON from `lockstep calibrate`, or 'auto': the one "
                                         "`lockstep serve` caches for these flags on this host")
    p.add_argument("--max-slots", type=int, default=8)
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--itl-target-ms", type=float, default=0.0, help="as for compile")
    p.add_argument("--max-queue", type=int, default=64, help="as for serve (default 64)")
    p.add_argument("--guard-band-pct", type=float, default=20.0, help="tick margin over the step (default 20)")
    p.add_argument("--guard-band-ms", type=float, default=1.5, help="and this per tick (default 1.5, as serve)")
    p.add_argument("--throughput", action="store_true", help="ticks paced per step, not one tick for every batch")
    p.add_argument("--pace", type=_pace, default=None,
                   help="wall seconds per program second of a tick, as a server's lockstep_pace_factor: "
                        "F, or PHASE=F,... for prefill, decode, mixed (default: 1 + the guard band)")
    p.add_argument("--replicas", type=int, default=1, help="engines behind a router, as serve --replicas "
                                                           "(open loop only; default 1)")
    p.add_argument("--route", default="prediction", choices=POLICIES,
                   help="with --replicas > 1: the router's policy, as serve --route (default prediction)")
    p.add_argument("--concurrency", type=int, default=0, help="closed loop: clients (default 1); open loop: cap")
    p.add_argument("--rate", type=float, default=None, help="open loop: mean arrivals per second")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson, < 1 burstier")
    p.add_argument("--sweep", default="", help="comma-separated rates: one open-loop run per rate")
    p.add_argument("--requests", type=int, default=1000, help="requests per run (default 1000)")
    p.add_argument("--prompt-len", type=LengthDist.parse, default=LengthDist.parse("128"))
    p.add_argument("--output-len", type=LengthDist.parse, default=LengthDist.parse("128"))
    p.add_argument("--seed", type=int, default=0, help="as for lockstep load: the same lengths and arrivals")
    p.add_argument("--warmup", type=int, default=0, help="as for lockstep load (its draws come first)")
    p.add_argument("--slo", type=parse_slo, default={}, help="e.g. ttft=200ms,tpot=20ms (for goodput)")
    p.add_argument("--output", type=Path, required=True, help="folder for the outputs")
    return p


PHASES = ("prefill", "decode", "mixed")


def _pace(text: str) -> dict[str, float]:
    try:
        if "=" not in text:
            out = {p: float(text) for p in PHASES}
        else:
            out = {k.strip(): float(v) for k, v in (item.split("=", 1) for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"pace must be F or PHASE=F,... , got {text!r}") from None
    if set(out) - set(PHASES) or not all(0 < f < float("inf") for f in out.values()):
        raise argparse.ArgumentTypeError(f"pace factors must be finite and > 0 for {', '.join(PHASES)}, got {text!r}")
    return out


def _records(results) -> list[RequestRecord]:
    out = []
    for r in results:
        itl = r.itl_s
        out.append(RequestRecord(r.index, r.arrival_s, r.status, r.prompt_len, len(r.token_s), r.ttft_s, itl,
                                 sum(itl) / len(itl) if itl else None, r.e2e_s))
    return out


def run(args, program: ProgramView, rate: float | None) -> tuple[dict, list[RequestRecord]]:
    # The same draws as `lockstep load --seed S --warmup W` (its warm-up requests, then the
    # measured ones, then the arrivals), so both see the same lengths and arrival times.
    rng = np.random.default_rng(args.seed)
    vocab = program.model.vocab_size
    make_specs(args.warmup, args.prompt_len, args.output_len, vocab, rng)
    specs = make_specs(args.requests, args.prompt_len, args.output_len, vocab, rng)
    lengths = [(len(spec.prompt), spec.output_len) for spec in specs]
    arrivals = arrival_times(rate, args.requests, args.burstiness, rng) if rate else [None] * args.requests
    # A request's prompt + output must fit the context, as the server requires.
    ctx = program.max_context
    requests = [SimRequest(min(p, ctx - 1), max(1, min(m, ctx - min(p, ctx - 1))), None if a is None else float(a))
                for (p, m), a in zip(lengths, arrivals)]
    factor = 1 + args.guard_band_pct / 100
    factors = {**{p: factor for p in PHASES}, **(args.pace or {})}
    ticks = paced_ticks(program, factors, args.guard_band_ms / 1e3, not args.throughput)
    if args.replicas > 1:
        scheds = [program.tick_scheduler(args.max_queue) for _ in range(args.replicas)]
        results, duration = simulate_fleet(scheds, requests, ticks.__getitem__, args.route)
    else:
        sched = program.tick_scheduler(args.max_queue)
        results, duration = simulate_load(sched, requests, ticks.__getitem__, args.concurrency or (0 if rate else 1))
    records = _records(results)
    return summarize(records, args.slo, duration), records


def _line(rate, s: dict) -> str:
    ms = lambda x: "-" if x is None else f"{x * 1e3:.1f}"  # noqa: E731
    per_user = 1 / s["tpot_s"]["p50"] if s["tpot_s"]["p50"] else 0.0
    return (f"{'closed loop' if rate is None else f'{rate:g} req/s':>12}: {s['ok']}/{s['requests']} OK, "
            f"{s['requests_per_s']:.2f} req/s, {s['output_tokens_per_s']:.1f} tok/s, {per_user:.1f} tok/s/user, "
            f"TTFT p50/p99 {ms(s['ttft_s']['p50'])}/{ms(s['ttft_s']['p99'])} ms, "
            f"TPOT p50/p99 {ms(s['tpot_s']['p50'])}/{ms(s['tpot_s']['p99'])} ms")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        for name in ("requests", "max_slots", "max_context", "prefill_chunk"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
        if args.replicas > 1 and (args.rate is None and not args.sweep or args.concurrency):
            raise ValueError("--replicas > 1 simulates open-loop arrivals: give --rate or --sweep, no --concurrency")
        if args.concurrency < 0 or args.max_queue < 0 or not args.guard_band_pct >= 0 or not args.guard_band_ms >= 0:
            raise ValueError("--concurrency, --max-queue and the guard bands must be >= 0")
        rates = [float(r) for r in args.sweep.split(",") if r.strip()] if args.sweep else [args.rate]
        if any(r is not None and not 0 < r < float("inf") for r in rates) or not 0 < args.burstiness < float("inf"):
            raise ValueError("rates and --burstiness must be finite and > 0")
        options = scheduler.CompileOptions(dtype=args.dtype, max_slots=args.max_slots, max_context=args.max_context,
                                           prefill_chunk=args.prefill_chunk, prompt_len=min(128, args.max_context - 1),
                                           itl_target_ms=args.itl_target_ms)
        calibration = None
        if args.calibration == "auto":
            from server.serve import _calibration  # the serve path's cache (imports the runtime)

            model, pool = scheduler.get_model(args.model), scheduler.parse_pool(args.pool)
            calibration = _calibration(args, model, pool)
        elif args.calibration:
            calibration = scheduler.Calibration.load(args.calibration)
        program = scheduler.compile(scheduler.get_model(args.model), scheduler.parse_pool(args.pool), options,
                                    calibration).view()
    except (ValueError, SpecError, FitError) as exc:
        parser.error(str(exc))
    fleet = f", {args.replicas} replicas routed by {args.route}" if args.replicas > 1 else ""
    print(f"lockstep simulate: {args.model} on {program.pool}, plan {program.plan_hash[:16]}, "
          f"{args.requests} requests per run{fleet}", flush=True)
    run_rates("lockstep simulate", args, rates, lambda rate: (*run(args, program, rate), {"plan_hash": program.plan_hash}),
              _line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
