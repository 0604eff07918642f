"""`lockstep simulate` against `lockstep load` on the same server and load shapes: is the
one timing model (the tick scheduler over the program's paced tick times) what the server
really does?

Starts `lockstep serve --model small --pool cpu --no-ray` (deterministic mode, this
host's cached calibration), drives it with `lockstep load` (closed loop 1 and 8, Poisson
2 req/s, and bursty gamma arrivals at 2 req/s, shape 0.25), then runs `lockstep simulate`
with exactly the serve command's flags plus the load command's (nothing else: simulate
reads the pace serve runs at, recorded at start and at each re-pace), and prints TTFT
and ITL p50/p99 side by side with simulated/measured ratios, and the server's pace factors
before and after each run. Goal: p50 within 10%, p99 within 20%.

Each load is simulated twice: just after it runs (`after`: from the pace the load left,
the server's re-paces during it included; the goal is judged on it, as in every earlier
run) and just before (`before`: the pace the server makes the load's first promises at).
The two apart show how far a re-pace during a load moves the simulation: first tokens
near saturation move with it (BENCHMARKS.md, "Simulated against measured").

    .venv/bin/python bench/simulate_vs_measured.py [--requests 24] [--dtype auto] [--out out/sim-vs-load]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from client.report import scrape
from server.serve import PACE_RECORD_S

REPO = Path(__file__).resolve().parents[1]
SERVE_FLAGS = ["--model", "small", "--pool", "cpu", "--max-slots", "8", "--max-context", "1024",
               "--prefill-chunk", "64"]


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare", REPO / "bench" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pace_factors(metrics_url: str) -> str:
    """The server's pace factors, and what else of its pace simulate reads from serve's record
    (the prefill shapes paced apart, the first tokens' tail factor, the cold allowance)."""
    from server.programs import recorded_pace

    samples = scrape(metrics_url)
    factors = {dict(labels)["phase"]: v for (name, labels), v in samples.items() if name == "lockstep_pace_factor"}
    text = ",".join(f"{k}={v:.6f}" for k, v in sorted(factors.items()))
    plan = next((dict(labels).get("plan_hash") for (name, labels), _ in samples.items()
                 if name == "lockstep_server_info"), None)
    pace = recorded_pace(plan) if plan else None
    if pace is not None:
        shapes = ",".join(f"{n}:{f:.3f}" for n, f in sorted(pace.shapes.items())) or "-"
        tail = "-" if pace.tail is None else f"{pace.tail:.3f}"
        text += f"; recorded: prefill shapes {shapes}, tail {tail}, cold {pace.cold_s * 1e3:.1f} ms"
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--prompt-len", default="32")
    p.add_argument("--output-len", default="32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", help="serve's --dtype (default auto, serve's own default)")
    p.add_argument("--out", type=Path, default=REPO / "out" / "sim-vs-load")
    args = p.parse_args()
    compare = _compare_module()
    loads = [("c=1", ["--concurrency", "1"]), ("c=8", ["--concurrency", "8"]), ("2 req/s", ["--rate", "2"]),
             ("bursty", ["--rate", "2", "--arrival", "gamma", "--burstiness", "0.25"])]
    serve = [*SERVE_FLAGS, "--dtype", args.dtype, "--no-ray", "--port", "0", "--http-port", "0", "--metrics-port", "0"]
    cmd = [sys.executable, "-m", "server.cli", "serve", *serve]
    proc, target, metrics_url = compare._start(cmd, "lockstep serve: ready", args.out / "serve.log", 600)
    rows = []
    try:
        for label, extra in loads:
            name = label.replace(" ", "_").replace("/", "per").replace("=", "")
            common = ["--prompt-len", args.prompt_len, "--output-len", args.output_len, "--seed", str(args.seed),
                      "--requests", str(args.requests), *extra]
            load_out = args.out / "load" / name
            load = ["--target", target, "--warmup", "2", *common]

            def simulate(when: str) -> tuple[str, dict]:
                time.sleep(2 * PACE_RECORD_S)  # serve records a moved pace within PACE_RECORD_S
                pace, sim_out = pace_factors(metrics_url), args.out / f"simulate-{when}" / name
                # Exactly serve's flags and load's: no pace, no time scale given.
                subprocess.run([sys.executable, "-m", "server.cli", "simulate", *serve, *load, "--output",
                                str(sim_out)], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
                return pace, json.loads((sim_out / "summary.json").read_text())["summary"]

            before = simulate("before")
            subprocess.run([sys.executable, "-m", "client.loadgen", *load, "--output", str(load_out)], cwd=REPO,
                           check=True, stderr=subprocess.DEVNULL)
            after = simulate("after")
            rows.append((label, json.loads((load_out / "summary.json").read_text())["summary"], before, after))
    finally:
        compare._stop(proc)
    print(f"prompt {args.prompt_len} tok, output {args.output_len} tok, {args.requests} requests per load, "
          f"seed {args.seed}")
    print(f"{'load':<8} {'metric':<9} {'measured ms':>12} {'after ms':>9} {'after/meas':>11}  {'goal':<18} "
          f"{'before ms':>10} {'before/meas':>12}")
    met = {"after": 0, "before": 0}
    for label, m, (pace_before, before), (pace_after, after) in rows:
        for metric in ("ttft_s", "itl_s"):
            for q, limit in (("p50", 0.10), ("p99", 0.20)):
                a, b, c = m[metric][q], after[metric][q], before[metric][q]
                ratio, early = (b / a, c / a) if a else (float("nan"), float("nan"))
                met["after"] += abs(ratio - 1) <= limit
                met["before"] += abs(early - 1) <= limit
                ok = "met" if abs(ratio - 1) <= limit else "MISSED"
                print(f"{label:<8} {metric[:-2] + ' ' + q:<9} {a * 1e3:>12.1f} {b * 1e3:>9.1f} {ratio:>11.2f}  "
                      f"{f'within {limit:.0%}: {ok}':<18} {c * 1e3:>10.1f} {early:>12.2f}")
        print(f"{'':<8} server's pace before the run: {pace_before}")
        print(f"{'':<8} server's pace after the run:  {pace_after}")
    print(f"within bounds: {met['after']} of {4 * len(rows)} after each run, {met['before']} before")
    return 0


if __name__ == "__main__":
    sys.exit(main())
