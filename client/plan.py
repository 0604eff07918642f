"""`lockstep plan`: the cheapest pool and replica count that meets a latency SLO at a rate.

For each pool size on a geometric grid of chip counts (those the model fits on), the
compiler's program is run in the serving simulation (scheduler/simulate.py, the engine's
own tick scheduler over the program's paced tick times): one replica's capacity is the
highest arrival rate at which its TTFT and inter-token latency percentiles stay within
the SLO (bisection). The rate needs ceil(rate / capacity) replicas; the cheapest pools
(fewest chips in all) are then checked as whole fleets, routed by prediction
(scheduler/fleet.py), adding a replica until the fleet meets the SLO. Prints the curve it
searched and the answer; writes plan.json and plan.png to --output.

    lockstep plan --model llama-2-70b --dtype int8 --device lpu --rate 10 \\
        --slo ttft=500ms,itl=50ms --prompt-len 512 --output-len 128 --output out/plan
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import scheduler
from server.programs import AUTO_DTYPE_HELP, MODEL_HELP, resolve_dtype, resolve_model
from client.loadgen import _UNITS_S, LengthDist, arrival_times
from client.simulate import PHASES
from scheduler.errors import FitError, SpecError
from scheduler.fleet import simulate_fleet
from scheduler.program import ProgramView
from scheduler.simulate import SimRequest, paced_ticks, simulate_load

BISECTIONS = 8  # capacity to within (hi - lo) / 2^8 of the bracket
VERIFY = 2  # cheapest pools checked as whole fleets
PATIENCE = 2  # bigger pools tried after the chips per req/s stopped improving


def parse_slo(text: str) -> dict[str, float]:
    """"ttft=500ms,itl=50ms" -> {"ttft": 0.5, "itl": 0.05}: bounds on the percentile."""
    slo = {}
    for item in filter(None, text.split(",")):
        m = re.fullmatch(r"(ttft|itl)=([0-9.]+)(us|ms|s)", item.strip())
        if not m or not float(m[2]) > 0:
            raise argparse.ArgumentTypeError(f"SLO items are ttft|itl=NUMBER(us|ms|s) > 0, got {item!r}")
        slo[m[1]] = float(m[2]) * _UNITS_S[m[3]]
    if not slo:
        raise argparse.ArgumentTypeError("--slo needs ttft=... and/or itl=...")
    return slo


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lockstep plan", description=__doc__.splitlines()[0])
    p.error = lambda message: p.exit(2, f"lockstep plan: error: {message}\n")  # one line, exit 2
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--device", required=True, help="device preset, e.g. lpu, h100")
    p.add_argument("--dtype", default="auto", help="weight dtype, as serve (default auto: " + AUTO_DTYPE_HELP + ")")
    p.add_argument("--rate", type=float, required=True, help="mean arrivals per second to serve")
    p.add_argument("--slo", type=parse_slo, required=True, help="e.g. ttft=500ms,itl=50ms")
    p.add_argument("--quantile", type=float, default=99.0, help="the SLO bounds this percentile (default 99)")
    p.add_argument("--prompt-len", type=LengthDist.parse, default=LengthDist.parse("512"))
    p.add_argument("--output-len", type=LengthDist.parse, default=LengthDist.parse("128"))
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrivals (1: Poisson)")
    p.add_argument("--requests", type=int, default=200, help="simulated requests per trial (default 200)")
    p.add_argument("--max-chips", type=int, default=4096, help="largest pool per replica tried (default 4096)")
    p.add_argument("--growth", type=float, default=1.25, help="ratio between pool sizes tried (default 1.25)")
    p.add_argument("--max-replicas", type=int, default=64, help="most replicas a plan may use (default 64)")
    p.add_argument("--max-slots", type=int, default=8)
    p.add_argument("--max-context", type=int, default=1024)  # serve's defaults (server/programs.py)
    p.add_argument("--prefill-chunk", type=int, default=64)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--guard-band-pct", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="folder for plan.json and plan.png")
    return p


@dataclass
class Point:
    chips: int  # per replica
    stages: int
    lone_ttft_s: float  # one request alone, its TTFT and ITL
    lone_itl_s: float
    capacity_rps: float  # one replica's highest rate within the SLO (0: not even alone)
    estimate: int = 0  # replicas for the rate from that capacity: ceil(rate / capacity)
    replicas: int = 0  # the fewest whose fleet meets the SLO (checked for the cheapest; else the estimate)
    total_chips: int = 0
    fleet_ttft_s: float | None = None  # that fleet at the rate
    fleet_itl_s: float | None = None
    meets: bool | None = None


class Trial:
    """One pool's program in the simulation, for the same seeded lengths and arrivals."""

    def __init__(self, args, view: ProgramView):
        self.args, self.view = args, view
        factor = 1 + args.guard_band_pct / 100
        # As serve paces: ticks follow the work, promised cadences bound them.
        self.ticks = paced_ticks(view, {p: factor for p in PHASES}).__getitem__
        rng = np.random.default_rng(args.seed)
        ctx = view.max_context
        self.lengths = []
        for _ in range(args.requests):
            p = min(args.prompt_len.draw(rng), ctx - 1)
            self.lengths.append((p, max(1, min(args.output_len.draw(rng), ctx - p))))
        self.gaps = arrival_times(1.0, args.requests, args.burstiness, rng)  # at 1/s; scaled per rate

    def requests(self, rate: float) -> list[SimRequest]:
        return [SimRequest(p, m, float(t / rate)) for (p, m), t in zip(self.lengths, self.gaps)]

    def latency(self, results) -> tuple[float, float, bool]:
        """(TTFT, ITL) at the quantile, and whether none was refused."""
        q = self.args.quantile
        ok = [r for r in results if r.status == "OK"]
        ttft = float(np.percentile([r.ttft_s for r in ok], q)) if ok else math.inf
        gaps = [g for r in ok for g in r.itl_s]
        itl = float(np.percentile(gaps, q)) if gaps else 0.0
        return ttft, itl, len(ok) == len(results)

    def meets(self, ttft: float, itl: float, all_ok: bool) -> bool:
        slo = self.args.slo
        return all_ok and ttft <= slo.get("ttft", math.inf) and itl <= slo.get("itl", math.inf)

    def one(self, rate: float) -> tuple[float, float, bool]:
        results, _ = simulate_load(self.view.tick_scheduler(self.args.max_queue, self.ticks), self.requests(rate), self.ticks)
        return self.latency(results)

    def fleet(self, rate: float, replicas: int) -> tuple[float, float, bool]:
        scheds = [self.view.tick_scheduler(self.args.max_queue, self.ticks) for _ in range(replicas)]
        results, _ = simulate_fleet(scheds, self.requests(rate), self.ticks, "prediction")
        return self.latency(results)

    def capacity(self, floor: float) -> tuple[float, float, float]:
        """(lone TTFT, lone ITL, the highest rate one replica serves within the SLO); the
        rate is 0 when it is below `floor` (more replicas than a plan may use)."""
        lone = simulate_load(self.view.tick_scheduler(self.args.max_queue, self.ticks), [SimRequest(*self.lengths[0], 0.0)],
                             self.ticks)[0][0]
        lone_ttft, lone_itl = lone.ttft_s, max(lone.itl_s, default=0.0)
        if not self.meets(*self.one(floor)):
            return lone_ttft, lone_itl, 0.0
        lo, hi = floor, floor * 2
        while self.meets(*self.one(hi)):
            lo, hi = hi, hi * 2
        for _ in range(BISECTIONS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.meets(*self.one(mid)) else (lo, mid)
        return lone_ttft, lone_itl, lo


def grid(args) -> list[int]:
    counts, c = [], 1.0
    while c <= args.max_chips:
        if not counts or round(c) > counts[-1]:
            counts.append(round(c))
        c *= args.growth
    return counts


def plan(args) -> tuple[list[Point], Point | None]:
    model = resolve_model(args)  # presets, the packaged model, HF configs and GGUF files, as serve
    scheduler.get_device(args.device)  # a clear error for an unknown one, before the search
    args.dtype = resolve_dtype(args.dtype, scheduler.parse_pool(f"{args.device}:1"))
    options = scheduler.CompileOptions(dtype=args.dtype, max_slots=args.max_slots, max_context=args.max_context,
                                       prefill_chunk=args.prefill_chunk, prompt_len=min(128, args.max_context - 1))
    points, trials = [], {}
    floor = args.rate / args.max_replicas  # a replica serving less would need too many
    best_cost, since_best = math.inf, 0
    for chips in grid(args):
        try:
            view = scheduler.compile(model, scheduler.parse_pool(f"{args.device}:{chips}"), options).view()
        except FitError:
            continue
        trial = trials[chips] = Trial(args, view)
        lone_ttft, lone_itl, cap = trial.capacity(floor)
        p = Point(chips, len(view.stages), lone_ttft, lone_itl, cap)
        if cap > 0:
            p.estimate = p.replicas = math.ceil(args.rate / cap)
            p.total_chips = chips * p.replicas
        points.append(p)
        # A bigger pool adds stages, not speed, once its steps stop shrinking: stop when
        # the chips needed have not improved for PATIENCE pools in a row.
        if p.total_chips and p.total_chips < best_cost:
            best_cost, since_best = p.total_chips, 0
        elif best_cost < math.inf:
            since_best += 1
            if since_best >= PATIENCE:
                break
    if not points:
        raise FitError(f"{args.model} {args.dtype} fits on no pool of up to {args.max_chips} x {args.device}")
    # The cheapest, checked as whole fleets at the rate, routed by prediction: the fewest
    # replicas that meet the SLO together (often fewer than rate / one replica's capacity:
    # routing spreads the bursts).
    best = None
    for p in sorted((p for p in points if p.capacity_rps > 0), key=lambda p: (p.total_chips, p.chips))[:VERIFY]:
        fleet = _fewest_replicas(args, trials[p.chips], p.replicas)
        if fleet is not None:
            p.replicas, (p.fleet_ttft_s, p.fleet_itl_s) = fleet
            p.total_chips, p.meets = p.chips * p.replicas, True
        else:
            p.meets = False
        if p.meets and (best is None or (p.total_chips, p.chips) < (best.total_chips, best.chips)):
            best = p
    return points, best


def _fewest_replicas(args, trial: Trial, guess: int) -> tuple[int, tuple[float, float]] | None:
    """The fewest replicas (bisection below `guess`, or counting up from it) whose fleet
    meets the SLO at the rate, with its (TTFT, ITL); None past --max-replicas."""
    seen: dict[int, tuple[float, float, bool]] = {}

    def ok(k: int) -> bool:
        seen[k] = seen.get(k) or trial.fleet(args.rate, k)
        return trial.meets(*seen[k])

    hi = guess
    while not ok(hi):
        hi += 1
        if hi > args.max_replicas:
            return None
    # Down in steps of 20% to the first fleet that fails, then bisection between: an
    # overloaded fleet's simulation is the slow one (long queues to predict over), so
    # only the one next to the answer is run.
    lo = 1
    while hi > 1:
        k = min(hi - 1, math.floor(hi * 0.8))
        if not ok(k):
            lo = k + 1
            break
        hi = k
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return hi, seen[hi][:2]


def table(args, points: list[Point], best: Point | None) -> str:
    ms = lambda x: "-" if x is None else f"{x * 1e3:.1f}"  # noqa: E731
    q = f"p{args.quantile:g}"
    lines = [f"{'chips':>7}{'stages':>7}{'lone TTFT':>11}{'lone ITL':>10}{'req/s/replica':>15}{'estimate':>9}"
             f"{'replicas':>9}{'total chips':>12}{'fleet TTFT ' + q:>16}{'fleet ITL ' + q:>15}  meets"]
    for p in points:
        mark = "  <- plan" if p is best else ""
        lines.append(f"{p.chips:>7}{p.stages:>7}{ms(p.lone_ttft_s):>11}{ms(p.lone_itl_s):>10}"
                     f"{p.capacity_rps:>15.2f}{p.estimate or '-':>9}{p.replicas or '-':>9}{p.total_chips or '-':>12}"
                     f"{ms(p.fleet_ttft_s):>16}{ms(p.fleet_itl_s):>15}  "
                     f"{'-' if p.meets is None else 'yes' if p.meets else 'no'}{mark}")
    return "\n".join(lines)


def plot(args, points: list[Point], best: Point | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    served = [p for p in points if p.capacity_rps > 0]
    ax.plot([p.chips for p in served], [p.chips * p.estimate for p in served], "o-",
            label=f"chips for {args.rate:g} req/s: rate / one replica's capacity")
    checked = [p for p in points if p.meets]
    ax.plot([p.chips for p in checked], [p.total_chips for p in checked], "D", color="green",
            label="chips: the fewest replicas whose fleet meets the SLO")
    if best is not None:
        ax.plot([best.chips], [best.total_chips], "r*", markersize=14,
                label=f"plan: {best.replicas} x {args.device}:{best.chips}")
    ax.set_xlabel(f"{args.device} chips per replica")
    ax.set_ylabel("chips in all")
    ax2 = ax.twinx()
    ax2.plot([p.chips for p in points], [p.capacity_rps for p in points], "s--", color="gray",
             label="req/s per replica within the SLO")
    ax2.set_ylabel("req/s per replica")
    ax.set_title(f"{args.model} {args.dtype} on {args.device}: SLO "
                 + ", ".join(f"{k} p{args.quantile:g} <= {v * 1e3:g} ms" for k, v in args.slo.items()))
    lines = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
    ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], loc="upper center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.rate < math.inf or not 0 < args.burstiness < math.inf:
        parser.error("--rate and --burstiness must be finite and > 0")
    if not 0 < args.quantile <= 100 or not args.growth > 1 or min(args.requests, args.max_chips,
                                                                      args.max_replicas) < 1:
        parser.error("--quantile must be in (0, 100], --growth > 1, --requests, --max-chips and --max-replicas >= 1")
    started = time.perf_counter()
    try:
        points, best = plan(args)
    except (ValueError, SpecError, FitError) as exc:
        parser.error(str(exc))
    print(table(args, points, best))
    took = time.perf_counter() - started
    if best is None:
        print(f"lockstep plan: no pool of up to {args.max_chips} x {args.device}, in up to {args.max_replicas} "
              f"replicas, meets the SLO at {args.rate:g} req/s ({took:.1f} s)")
    else:
        print(f"lockstep plan: {best.replicas} replicas x {args.device}:{best.chips} ({best.total_chips} chips) "
              f"serve {args.rate:g} req/s with TTFT p{args.quantile:g} {best.fleet_ttft_s * 1e3:.1f} ms and ITL "
              f"p{args.quantile:g} {best.fleet_itl_s * 1e3:.1f} ms (searched {len(points)} pools in {took:.1f} s)")
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        doc = {"args": {k: v if isinstance(v, (int, float, str, dict, type(None))) else str(v)
                        for k, v in vars(args).items()},
               "points": [asdict(p) for p in points], "plan": None if best is None else asdict(best)}
        (args.output / "plan.json").write_text(json.dumps(doc, indent=2) + "\n")
        plot(args, points, best, args.output / "plan.png")
        print(f"lockstep plan: wrote {args.output}")
    return 0 if best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
