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
import random
import sys
from dataclasses import replace

import numpy as np

from client.connect import add_security_args
from client.loadgen import add_load_args, arrival_times, burstiness, make_specs
from client.report import RequestRecord, run_rates, summarize
from scheduler.errors import FitError, SpecError
from scheduler.program import ProgramView
from scheduler.fleet import simulate_fleet
from scheduler.simulate import Pace, SimRequest, simulate_load


def build_parser() -> argparse.ArgumentParser:
    """Serve's flags and `lockstep load`'s, with their defaults: a serve command line plus a
    load command line simulate the server that serve would run under that load (flags that
    do not change ticks, such as ports, TLS or --target, are accepted and ignored)."""
    from server.cli import add_runtime_args, add_serving_args
    from server.programs import add_program_args

    p = argparse.ArgumentParser(prog="lockstep simulate", description=__doc__.splitlines()[0])
    p.error = lambda message: p.exit(2, f"lockstep simulate: error: {message}\n")  # one line, exit 2
    add_program_args(p)
    add_serving_args(p)
    add_runtime_args(p)
    add_load_args(p, target_required=False)  # its --seed seeds the draws (serve's weight seed changes no tick)
    add_security_args(p, token_file=False)  # load's --tls-ca, --tls-server-name; serve's --auth-token-file is above
    p.add_argument("--pace", type=_pace, default=None,
                   help="pace factors instead of time scale x (1 + guard band): F or PHASE=F,... (phases: "
                        "prefill, decode, mixed)")
    return p


PHASES = ("prefill", "decode", "mixed")


def _pace(text: str) -> Pace:
    try:
        if "=" not in text:
            out = {p: float(text) for p in PHASES}
        else:
            out = {k.strip(): float(v) for k, v in (item.split("=", 1) for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"pace must be F or PHASE=F,... , got {text!r}") from None
    if set(out) - set(PHASES) or not all(0 < f < float("inf") for f in out.values()):
        raise argparse.ArgumentTypeError(f"pace factors must be finite and > 0 for {', '.join(PHASES)}, got {text!r}")
    return Pace(out)


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
    # As serve's pacers start: the time scale x (1 + the guard band); or the pace given, or
    # the one serve last ran at (its prefill shapes, tails and cold allowance with it).
    factor = args.time_scale * (1 + args.guard_band_pct / 100)
    given = args.pace or Pace({})
    pace = replace(given, factors={**{p: factor for p in PHASES}, **given.factors})
    # Ticks follow the work; in deterministic mode the promised cadences bound them, as in
    # serve (whose --guard-band-ms is spent from the streams' lead, in no tick).
    ticks, tails = pace.tables(program)
    # Tokens leave as late as serve's last ones left (its record: first tokens, later ones),
    # drawn with the load's seed.
    (first, later), draws = args.delivery_late, random.Random(args.seed)

    def late(k: int) -> float:
        return draws.choice(later if k and later else first or later)

    promises = None if args.throughput else ticks.__getitem__
    if args.replicas > 1:
        scheds = [program.tick_scheduler(args.max_queue, promises, args.alone_tpot == "own", args.join_share) for _ in range(args.replicas)]
        results, duration = simulate_fleet(scheds, requests, ticks.__getitem__, args.route)
    else:
        sched = program.tick_scheduler(args.max_queue, promises, args.alone_tpot == "own", args.join_share)
        results, duration = simulate_load(sched, requests, ticks.__getitem__, args.concurrency or (0 if rate else 1),
                                          window_s=0.0 if args.throughput else args.admission_window_ms / 1e3,
                                          tail_s=None if args.throughput or not tails else tails.get,
                                          cold_s=0.0 if args.throughput else pace.cold_s,
                                          lead_s=0.0 if args.throughput or not args.start_lead_quantile else pace.lead_s,
                                          late_s=late if first or later else None,
                                          window_grace_s=0.0 if args.throughput else args.window_grace_ms / 1e3)
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
        from server.cli import check_promise_flags

        check_promise_flags(args)
        if args.replicas > 1 and (args.rate is None and not args.sweep or args.concurrency):
            raise ValueError("--replicas > 1 simulates open-loop arrivals: give --rate or --sweep, no --concurrency")
        if args.concurrency < 0 or args.max_queue < 0 or not (args.guard_band_pct or 0) >= 0 or not (args.guard_band_ms or 0) >= 0:
            raise ValueError("--concurrency, --max-queue and the guard bands must be >= 0")
        if not 0 <= args.time_scale < float("inf"):
            raise ValueError(f"--time-scale must be finite and >= 0 (0: what serve measured), got {args.time_scale}")
        rates = [float(r) for r in args.sweep.split(",") if r.strip()] if args.sweep else [args.rate]
        if any(r is not None and not 0 < r < float("inf") for r in rates) or not 0 < args.burstiness < float("inf"):
            raise ValueError("rates and --burstiness must be finite and > 0")
        from server.programs import (compile_program, recorded_delivery, recorded_guard_band, recorded_pace,
                                     recorded_time_scale)

        program = compile_program(args)[0].view()
        args.burstiness = burstiness(args)  # as lockstep load
        # Nothing of the pace given: as serve last ran this program here, its pace whole, and
        # its tokens handed out as late as its last ones left (none recorded: on time).
        args.delivery_late = ([], [])
        if not args.time_scale and args.guard_band_pct is None and args.pace is None:
            args.pace = recorded_pace(program.plan_hash)
            args.delivery_late = recorded_delivery(program.plan_hash)
        if not args.time_scale:  # as serve: measured there; the last measurement for this program
            args.time_scale = recorded_time_scale(program.plan_hash) or 1.0
        if args.guard_band_pct is None:  # as serve: from the jitter measured there, else 20%
            guard = recorded_guard_band(program.plan_hash)
            args.guard_band_pct = 20.0 if guard is None else 100 * guard
    except (ValueError, SpecError, FitError) as exc:
        parser.error(str(exc))
    fleet = f", {args.replicas} replicas routed by {args.route}" if args.replicas > 1 else ""
    print(f"lockstep simulate: {program.model.name} on {program.pool}, plan {program.plan_hash[:16]}, "
          f"time scale {args.time_scale:.3f}, {args.requests} requests per run{fleet}", flush=True)
    run_rates("lockstep simulate", args, rates, lambda rate: (*run(args, program, rate), {"plan_hash": program.plan_hash}),
              _line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
