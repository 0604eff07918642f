"""Routing by prediction against round-robin and least-outstanding-requests, on the same
replicas and the same bursty load (gamma arrivals, mixed prompt lengths).

    hop   what routing costs a lone request: through the router against straight to a replica;
    sim   the fleet simulation (scheduler/fleet.py, as `lockstep simulate --replicas`), at
          scale: e.g. 16 replicas of llama-2-70b int8 on lpu:576;
    real  `--replicas` engines of a real model on this host behind one in-process router;
          the same `lockstep load` run against it once per policy per round, policies
          interleaved (this host is shared and noisy), the router's policy switched
          between runs, so every policy sees the same replicas.

Each prints TTFT p50/p99, TPOT p99 and goodput under the SLO per policy, and ratios to
routing by prediction.

    .venv/bin/python bench/routing.py sim --replicas 16 --model llama-2-70b --dtype int8 --pool lpu:576 \\
        --rate 16 --requests 2000
    .venv/bin/python bench/routing.py real --replicas 2 --model small --rate 3 --requests 60 --rounds 2
    .venv/bin/python bench/routing.py hop --replicas 2 --model small --rate 1 --requests 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scheduler.fleet import POLICIES  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("where", choices=("sim", "real", "hop"))
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--model", default="small")
    p.add_argument("--pool", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--rate", type=float, required=True, help="mean arrivals per second")
    p.add_argument("--burstiness", type=float, default=0.25, help="gamma shape (< 1: bursty; default 0.25)")
    p.add_argument("--prompt-len", default="uniform:32:1024")
    p.add_argument("--output-len", default="uniform:32:256")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--slo", default="ttft=500ms,tpot=25ms")
    p.add_argument("--rounds", type=int, default=1, help="real: runs of every policy, interleaved")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the figures here too")
    return p.parse_args(argv)


def row(name: str, s: dict) -> dict:
    return {"policy": name, "ok": s["ok"], "requests": s["requests"], "ttft_p50_s": s["ttft_s"]["p50"],
            "ttft_p99_s": s["ttft_s"]["p99"], "tpot_p99_s": s["tpot_s"]["p99"],
            "goodput_rps": s["goodput_requests_per_s"], "rps": s["requests_per_s"]}


def report(title: str, rows: list[dict]) -> None:
    print(title)
    print(f"{'policy':<20}{'ok':>10}{'ttft_p50':>10}{'ttft_p99':>10}{'tpot_p99':>10}{'goodput':>9}{'req/s':>8}")
    for r in rows:
        print(f"{r['policy']:<20}{r['ok']:>5}/{r['requests']:<4}{r['ttft_p50_s'] * 1e3:>10.1f}"
              f"{r['ttft_p99_s'] * 1e3:>10.1f}{r['tpot_p99_s'] * 1e3:>10.2f}{r['goodput_rps']:>9.2f}{r['rps']:>8.2f}")
    base = next(r for r in rows if r["policy"].startswith("prediction"))
    for r in rows:
        if r is base or not r["policy"].split()[0] == r["policy"]:
            continue
        print(f"{r['policy'] + ' / prediction':<40} ttft_p99 {r['ttft_p99_s'] / base['ttft_p99_s']:.2f}x  "
              f"goodput {r['goodput_rps'] / base['goodput_rps'] if base['goodput_rps'] else float('nan'):.2f}x")


def load_args(args) -> list[str]:
    return ["--rate", str(args.rate), "--burstiness", str(args.burstiness), "--prompt-len", args.prompt_len,
            "--output-len", args.output_len, "--requests", str(args.requests), "--seed", str(args.seed),
            "--slo", args.slo]


def sim(args) -> list[dict]:
    rows = []
    for policy in POLICIES:
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "client.simulate", "--model", args.model, "--dtype", args.dtype,
                            "--pool", args.pool, "--max-context", str(args.max_context),
                            "--prefill-chunk", str(args.prefill_chunk), "--replicas", str(args.replicas),
                            "--route", policy, *load_args(args), "--output", out],
                           check=True, cwd=REPO, stdout=subprocess.DEVNULL)
            s = json.loads((Path(out) / "summary.json").read_text())["summary"]
        rows.append(row(policy, s) | {"wall_s": time.perf_counter() - started})
    report(f"simulated: {args.replicas} replicas of {args.model} {args.dtype} on {args.pool}, {args.requests} "
           f"requests at {args.rate:g}/s, gamma shape {args.burstiness}, prompts {args.prompt_len}, "
           f"outputs {args.output_len}, SLO {args.slo}", rows)
    return rows


def real(args) -> list[dict]:
    import ray

    router, info, loop, server = start_fleet(args)
    print(f"{args.replicas} replicas of {args.model} at {', '.join(info['replicas'])}; router {info['grpc']}; "
          f"time scale {info['time_scale']:.3f}", flush=True)
    runs: dict[str, list[dict]] = {p: [] for p in POLICIES}
    try:
        for k in range(args.rounds):
            for policy in POLICIES:
                router.policy = policy  # between runs: the same replicas, idle, for every policy
                with tempfile.TemporaryDirectory() as out:
                    subprocess.run([sys.executable, "-m", "client.loadgen", "--target", info["grpc"],
                                    "--arrival", "gamma", *load_args(args), "--output", out],
                                   check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    s = json.loads((Path(out) / "summary.json").read_text())["summary"]
                runs[policy].append(row(f"{policy} #{k + 1}", s))
                print(f"  round {k + 1} {policy}: TTFT p99 {s['ttft_s']['p99'] * 1e3:.1f} ms, "
                      f"goodput {s['goodput_requests_per_s']:.2f}/s", flush=True)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(5.0), loop).result(60)
        ray.shutdown()
    # Per policy: the median of its rounds.
    rows = []
    for policy, rs in runs.items():
        med = {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in rs[0] if k != "policy"}
        rows.append({"policy": policy, **med})
    report(f"real: {args.replicas} replicas of {args.model} {args.dtype} on this host, {args.requests} requests at "
           f"{args.rate:g}/s, gamma shape {args.burstiness}, prompts {args.prompt_len}, outputs {args.output_len}, "
           f"SLO {args.slo}; median of {args.rounds} interleaved rounds", rows)
    return rows + [r for rs in runs.values() for r in rs]


def start_fleet(args):
    """`--replicas` replicas of `--model` behind an in-process router: (router, server
    info, event loop, server)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray on loopback only
    import ray

    from server.app import LockstepServer
    from server.cli import build_parser
    from server.frontend.router import RoutedAdmission, replica_config
    from server.serve import build_config

    serve = build_parser().parse_args(
        ["serve", "--model", args.model, "--pool", args.pool, "--dtype", args.dtype,
         "--max-context", str(args.max_context), "--prefill-chunk", str(args.prefill_chunk), "--calibration", "auto",
         "--port", "0", "--metrics-port", "0", "--http-port", "-1", "--replicas", str(args.replicas)])
    config, _ = build_config(serve)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    router = RoutedAdmission(replica_config(config, args.replicas, False, os.cpu_count() or 1), args.replicas)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server = LockstepServer(config, router=router, router_bundle={"CPU": 1})
    info = asyncio.run_coroutine_threadsafe(server.start(), loop).result(600)
    return router, info, loop, server


def hop(args) -> list[dict]:
    """What the router costs a lone request: the same requests, one at a time, straight to
    replica 0 and through the router (which then also picks replica 0: ties go to the
    lowest index), alternating; TTFT and inter-token gaps as the client measures them."""
    import ray
    import numpy as np

    from client.client import LockstepClient

    router, info, loop, server = start_fleet(args)
    via = {"replica 0 direct": router.replicas[0].target, "through the router": info["grpc"]}
    seen: dict[str, dict[str, list[float]]] = {k: {"ttft": [], "itl": []} for k in via}
    try:
        clients = {k: LockstepClient(t) for k, t in via.items()}
        for i in range(args.requests):
            for name, client in (clients.items() if i % 2 else reversed(list(clients.items()))):
                g = client.generate([1 + i % 50, 2, 3, 4], 16, seed=i)
                seen[name]["ttft"].append(g.ttft_s)
                seen[name]["itl"].extend(g.itl_s)
        for c in clients.values():
            c.close()
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(5.0), loop).result(60)
        ray.shutdown()
    rows = []
    print(f"{args.model}, {args.requests} lone requests each way (4-token prompts, 16 tokens), alternating")
    print(f"{'path':<22}{'ttft_p50':>10}{'ttft_p99':>10}{'itl_p50':>10}{'itl_p99':>10}")
    for name, m in seen.items():
        q = {f"{k}_p{p}_ms": float(np.percentile(v, p)) * 1e3 for k, v in m.items() for p in (50, 99)}
        rows.append({"path": name, **q})
        print(f"{name:<22}{q['ttft_p50_ms']:>10.2f}{q['ttft_p99_ms']:>10.2f}{q['itl_p50_ms']:>10.2f}"
              f"{q['itl_p99_ms']:>10.2f}")
    d, r = rows
    print(f"router - direct: TTFT p50 {r['ttft_p50_ms'] - d['ttft_p50_ms']:+.2f} ms, "
          f"ITL p50 {r['itl_p50_ms'] - d['itl_p50_ms']:+.2f} ms")
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = {"sim": sim, "real": real, "hop": hop}[args.where](args)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
