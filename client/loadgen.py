"""`lockstep load`: a load generator for a Lockstep server.

Closed loop (no --rate): `concurrency` workers each send their next request as soon as
the previous one ends. Open loop (--rate): requests arrive on a Poisson (or gamma,
--burstiness) schedule regardless of completions, with --concurrency as an optional cap
on requests in flight. A run ends after --requests requests or --duration-s seconds,
whichever comes first; requests in flight then finish and are recorded. Warm-up requests
run first and are left out of every statistic.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from client.aio import AsyncLockstepClient
from client.client import LockstepError, NotReady, temperature_arg
from client.connect import add_security_args, security_from_args
from client.report import RequestRecord, run_rates, summarize


def arrival_times(rate: float, n: int, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (seconds from 0) of n requests at mean `rate` per second.

    Gaps are gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate always;
    burstiness 1 is a Poisson process (exponential gaps), < 1 burstier, > 1 more regular."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate and burstiness must be > 0, got rate={rate}, burstiness={burstiness}")
    return np.cumsum(rng.gamma(burstiness, 1.0 / (rate * burstiness), size=n))


@dataclass(frozen=True)
class LengthDist:
    """A token count: fixed ("32"), normal ("normal:MEAN:STD", rounded) or uniform
    ("uniform:LO:HI", inclusive); draws are at least 1."""
    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "LengthDist":
        parts = text.split(":")
        try:
            if len(parts) == 1:
                return cls("fixed", int(parts[0]))
            if len(parts) == 3 and parts[0] in ("normal", "uniform"):
                return cls(parts[0], float(parts[1]), float(parts[2]))
        except ValueError:
            pass
        raise ValueError(f"length must be N, normal:MEAN:STD or uniform:LO:HI, got {text!r}")

    def draw(self, rng: np.random.Generator) -> int:
        if self.kind == "fixed":
            return max(1, int(self.a))
        if self.kind == "normal":
            return max(1, int(round(rng.normal(self.a, self.b))))
        return max(1, int(rng.integers(int(self.a), int(self.b), endpoint=True)))


_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_slo(text: str) -> dict[str, float]:
    """"ttft=200ms,tpot=20ms" -> {"ttft_s": 0.2, "tpot_s": 0.02}; keys ttft, tpot, e2e."""
    slo = {}
    for item in filter(None, text.split(",")):
        m = re.fullmatch(r"(ttft|tpot|e2e)=([0-9.]+)(us|ms|s)", item.strip())
        if not m:
            raise ValueError(f"SLO items are ttft|tpot|e2e=NUMBER(us|ms|s), got {item!r}")
        slo[f"{m[1]}_s"] = float(m[2]) * _UNITS_S[m[3]]
    return slo


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt: list[int]  # token ids
    output_len: int


def make_specs(n: int, prompt_len: LengthDist, output_len: LengthDist, vocab: int,
               rng: np.random.Generator) -> list[RequestSpec]:
    specs = []
    for i in range(n):
        p = prompt_len.draw(rng)
        specs.append(RequestSpec(i, rng.integers(0, vocab, size=p).tolist(), output_len.draw(rng)))
    return specs


async def run_one(client: AsyncLockstepClient, spec: RequestSpec, t0: float, args) -> RequestRecord:
    start = time.perf_counter()
    rec = RequestRecord(spec.index, start - t0, "OK", len(spec.prompt), 0)
    try:
        gen = await client.generate(spec.prompt, spec.output_len, timeout=args.request_timeout_s,
                                    temperature=args.temperature, seed=args.seed + spec.index)
    except LockstepError as exc:
        rec.status = exc.code.name
        rec.e2e_s = time.perf_counter() - start
        return rec
    rec.output_tokens = len(gen.tokens)
    rec.e2e_s = (gen.tokens[-1].recv_s if gen.tokens else time.perf_counter()) - start
    if gen.tokens:
        rec.ttft_s, rec.itl_s, rec.tpot_s = gen.ttft_s, gen.itl_s, gen.tpot_s
    rec.predicted_ttft_s = gen.predicted_ttft_s
    rec.predicted_tpot_s = gen.finished.predicted_tpot_s if gen.finished is not None else None
    return rec


async def closed_loop(client, specs, concurrency: int, deadline: float, t0: float, args, bar) -> list:
    records, pending = [], iter(specs)

    async def worker():
        for spec in pending:  # a shared iterator: each spec goes to one worker
            if time.perf_counter() >= deadline:
                return
            records.append(await run_one(client, spec, t0, args))
            bar.update()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


async def open_loop(client, specs, arrivals, cap: int, deadline: float, t0: float, args, bar) -> list:
    records, tasks = [], []
    limit = asyncio.Semaphore(cap) if cap > 0 else None

    async def one(spec):
        if limit is None:
            records.append(await run_one(client, spec, t0, args))
        else:
            async with limit:
                records.append(await run_one(client, spec, t0, args))
        bar.update()

    for spec, at in zip(specs, arrivals):
        delay = t0 + at - time.perf_counter()
        if t0 + at >= deadline:
            break
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(spec)))
    await asyncio.gather(*tasks)
    return records


async def run_load(args, rate: float | None) -> tuple[list[RequestRecord], float]:
    """One run at `rate` (None: closed loop). Returns (records in start order, duration_s)."""
    rng = np.random.default_rng(args.seed)
    async with AsyncLockstepClient(args.target, args.security) as client:
        await client.wait_ready(args.connect_timeout_s)
        vocab = (await client.model_info(timeout=args.connect_timeout_s)).vocab_size
        warm = make_specs(args.warmup, args.prompt_len, args.output_len, vocab, rng)
        specs = make_specs(args.requests, args.prompt_len, args.output_len, vocab, rng)
        with tqdm(total=len(warm), desc="warm-up", file=sys.stderr, disable=not warm) as bar:
            await closed_loop(client, warm, max(1, args.concurrency or 1), float("inf"), 0.0, args, bar)
        desc = "closed loop" if rate is None else f"{rate:g} req/s"
        with tqdm(total=len(specs), desc=desc, file=sys.stderr) as bar:
            t0 = time.perf_counter()
            deadline = t0 + args.duration_s if args.duration_s else float("inf")
            if rate is None:
                records = await closed_loop(client, specs, args.concurrency or 1, deadline, t0, args, bar)
            else:
                arrivals = arrival_times(rate, len(specs), args.burstiness, rng)
                records = await open_loop(client, specs, arrivals, args.concurrency or 0, deadline, t0, args, bar)
            duration = time.perf_counter() - t0
    return sorted(records, key=lambda r: (r.start_s, r.index)), duration


def load_at(args, rate: float | None) -> tuple[dict, list[RequestRecord], dict]:
    """One run at `rate` (None: closed loop): (summary, records, no extra config)."""
    records, duration = asyncio.run(run_load(args, rate))
    return summarize(records, args.slo, duration), records, {}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lockstep load", description=__doc__.splitlines()[0])
    add_load_args(p)
    add_security_args(p)
    return p


def add_load_args(p, target_required: bool = True) -> None:
    """`lockstep load`'s flags (`lockstep simulate` takes them too, with the same defaults)."""
    p.add_argument("--target", required=target_required, help="server address, HOST:PORT")
    p.add_argument("--concurrency", type=int, default=0,
                   help="closed loop: workers (default 1); open loop: most requests in flight (default no cap)")
    p.add_argument("--requests", type=int, default=100, help="measured requests per run")
    p.add_argument("--output", type=Path, required=True, help="folder for summary.json, requests.csv, PNGs")
    p.add_argument("--rate", type=float, default=None, help="open loop: mean arrivals per second")
    p.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson, < 1 burstier")
    p.add_argument("--sweep", default="", help="comma-separated rates: one open-loop run per rate")
    p.add_argument("--duration-s", type=float, default=0.0, help="stop sending after this long (0: no limit)")
    p.add_argument("--warmup", type=int, default=0, help="requests run first and left out of the stats")
    p.add_argument("--prompt-len", type=LengthDist.parse, default=LengthDist.parse("32"),
                   help="N, normal:MEAN:STD or uniform:LO:HI tokens")
    p.add_argument("--prompt-len-dist", dest="prompt_len", type=LengthDist.parse, help="alias of --prompt-len")
    p.add_argument("--output-len", type=LengthDist.parse, default=LengthDist.parse("32"),
                   help="max_tokens per request: N, normal:MEAN:STD or uniform:LO:HI")
    p.add_argument("--output-len-dist", dest="output_len", type=LengthDist.parse, help="alias of --output-len")
    p.add_argument("--seed", type=int, default=0, help="seeds lengths, prompts, arrivals and sampling")
    p.add_argument("--temperature", type=temperature_arg, default=0.0)
    p.add_argument("--slo", type=parse_slo, default={}, help="e.g. ttft=200ms,tpot=20ms (for goodput)")
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--connect-timeout-s", type=float, default=30.0)


def _line(rate: float | None, summary: dict) -> str:
    ms = lambda x: "-" if x is None else f"{x * 1e3:.1f}"  # noqa: E731
    return (f"{'closed loop' if rate is None else f'{rate:g} req/s'}: {summary['ok']}/{summary['requests']} OK, errors {summary['errors'] or '{}'}; "
            f"{summary['requests_per_s']:.2f} req/s, {summary['output_tokens_per_s']:.1f} tok/s, "
            f"goodput {summary['goodput_requests_per_s']:.2f} req/s; "
            f"TTFT p50/p99 {ms(summary['ttft_s']['p50'])}/{ms(summary['ttft_s']['p99'])} ms, "
            f"TPOT p50/p99 {ms(summary['tpot_s']['p50'])}/{ms(summary['tpot_s']['p99'])} ms")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ValueError as exc:  # bad lengths, SLOs, rates, TLS and token files
        parser.error(str(exc))
    except NotReady as exc:  # refused, a TLS handshake that failed, nobody there
        parser.exit(2, f"lockstep load: error: {exc}\n")
    except LockstepError as exc:  # the first call refused (UNAUTHENTICATED without the token)
        parser.exit(2, f"lockstep load: error: {args.target} answered {exc}\n")


def burstiness(args) -> float:
    """The gamma shape of the arrivals: --burstiness, or 1 (Poisson) with --arrival poisson."""
    return 1.0 if args.arrival == "poisson" else args.burstiness


def _run(args) -> int:
    args.burstiness = burstiness(args)
    args.security = security_from_args(args)
    rates = [float(r) for r in args.sweep.split(",") if r.strip()] if args.sweep else [args.rate]
    run_rates("lockstep load", args, rates, lambda rate: load_at(args, rate), _line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
