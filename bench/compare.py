"""Lockstep against the Ray Serve baseline peer, side by side under identical load.

Starts each server in turn on loopback - `lockstep serve --model M --pool cpu --no-ray`,
then bench/peer_rayserve.py (same model, same seeded weights, Ray Serve + transformers) -
and drives each with the same `lockstep load` runs: closed loop at concurrency 1 and 8 and
one open-loop Poisson rate, with the same requests, lengths, seed and SLO. Prints one
table: output tokens/s, TTFT p50/p99, ITL p50/p99, ITL p99/p50, goodput, and Lockstep's
tick overruns (from its /metrics, warm-up included), per server and load, with Lockstep/baseline ratio rows (for latencies < 1 means Lockstep is faster; for
throughput and goodput > 1 means Lockstep is better).

    .venv/bin/python bench/compare.py [--model small] [--requests-c1 16] [--requests-c8 32]
        [--rate 2] [--requests-rate 24] [--prompt-len 32] [--output-len 32] [--slo ttft=...,tpot=...]
        [--dtype fp32|bf16] [--out out/compare] [--only lockstep|peer]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _start(cmd: list[str], marker: str, log: Path, timeout_s: float) -> tuple[subprocess.Popen, str, str]:
    """Starts cmd, waits for a stdout line starting with `marker`, returns (proc, grpc target,
    metrics URL or ""). The rest of stdout / stderr goes to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    logf = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=logf, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    found: list[str] = []

    def pump():
        for line in proc.stdout:
            logf.write(line)
            logf.flush()
            if not found and line.startswith(marker):
                metrics = line.split("metrics=")[1].split()[0] if "metrics=" in line else ""
                found.append((line.split("grpc=")[1].split()[0], metrics))
    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not found:
        if proc.poll() is not None:
            raise SystemExit(f"compare: {cmd[1:3]} exited with {proc.returncode} before ready; see {log}")
        if time.monotonic() > deadline:
            _stop(proc)
            raise SystemExit(f"compare: {cmd[1:3]} not ready in {timeout_s:g} s; see {log}")
        time.sleep(0.2)
    return proc, *found[0]


def _stop(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
            proc.wait()


def loads(args) -> list[tuple[str, list[str]]]:
    """(label, loadgen arguments) for each load, the same for both servers."""
    return [
        ("c=1", ["--concurrency", "1", "--requests", str(args.requests_c1)]),
        ("c=8", ["--concurrency", "8", "--requests", str(args.requests_c8)]),
        (f"{args.rate:g} req/s", ["--rate", str(args.rate), "--requests", str(args.requests_rate)]),
    ]


def ticks_and_overruns(metrics_url: str) -> tuple[float, float]:
    """(ticks, overruns) so far, summed over phases, from a Lockstep server's /metrics."""
    from client.report import scrape

    samples = scrape(metrics_url)
    return tuple(sum(v for (name, _), v in samples.items() if name == want)
                 for want in ("lockstep_ticks_total", "lockstep_tick_overruns_total"))


def run_loads(name: str, target: str, args, metrics_url: str = "") -> dict[str, dict]:
    common = ["--target", target, "--prompt-len", args.prompt_len, "--output-len", args.output_len,
              "--seed", str(args.seed), "--warmup", str(args.warmup), "--temperature", "0"]
    if args.slo:
        common += ["--slo", args.slo]
    out = {}
    for label, extra in loads(args):
        folder = args.out / name / label.replace(" ", "_").replace("/", "per").replace("=", "")
        cmd = [sys.executable, "-m", "client.loadgen", *common, *extra, "--output", str(folder)]
        print(f"compare: {name} {label}", flush=True)
        before = ticks_and_overruns(metrics_url) if metrics_url else None
        subprocess.run(cmd, cwd=REPO, check=True, stderr=subprocess.DEVNULL)
        out[label] = json.loads((folder / "summary.json").read_text())["summary"]
        if before is not None:  # warm-up requests included: the server cannot tell them apart
            ticks, overruns = (b - a for a, b in zip(before, ticks_and_overruns(metrics_url)))
            out[label]["server_ticks"], out[label]["server_overruns"] = ticks, overruns
    return out


def _row(server: str, load: str, s: dict) -> list[str]:
    ms = lambda x: "-" if x is None else f"{x * 1e3:.1f}"
    itl = s["itl_s"]
    jit = itl["p99"] / itl["p50"] if itl["p50"] and itl["p99"] is not None else None
    overruns = (f"{s['server_overruns']:.0f}/{s['server_ticks']:.0f}" if s.get("server_ticks") else "-")
    return [server, load, f"{s['ok']}/{s['requests']}", f"{s['output_tokens_per_s']:.1f}",
            ms(s["ttft_s"]["p50"]), ms(s["ttft_s"]["p99"]), ms(itl["p50"]), ms(itl["p99"]),
            "-" if jit is None else f"{jit:.2f}", f"{s['goodput_requests_per_s']:.2f}", overruns]


def _ratio_row(load: str, a: dict, b: dict) -> list[str]:
    def r(x, y):
        return "-" if x is None or y in (None, 0) else f"{x / y:.2f}x"
    ja = a["itl_s"]["p99"] / a["itl_s"]["p50"] if a["itl_s"]["p50"] else None
    jb = b["itl_s"]["p99"] / b["itl_s"]["p50"] if b["itl_s"]["p50"] else None
    return ["Lockstep/baseline", load, "", r(a["output_tokens_per_s"], b["output_tokens_per_s"]),
            r(a["ttft_s"]["p50"], b["ttft_s"]["p50"]), r(a["ttft_s"]["p99"], b["ttft_s"]["p99"]),
            r(a["itl_s"]["p50"], b["itl_s"]["p50"]), r(a["itl_s"]["p99"], b["itl_s"]["p99"]),
            r(ja, jb), r(a["goodput_requests_per_s"], b["goodput_requests_per_s"]), ""]


HEADER = ["server", "load", "ok", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
          "ITL p99/p50", "goodput req/s", "overruns/ticks"]


def table(results: dict[str, dict[str, dict]], labels: list[str]) -> str:
    rows = []
    for label in labels:
        for name, title in (("lockstep", "Lockstep"), ("peer", "Ray Serve+HF")):
            if label in results.get(name, {}):
                rows.append(_row(title, label, results[name][label]))
        if all(label in results.get(n, {}) for n in ("lockstep", "peer")):
            rows.append(_ratio_row(label, results["lockstep"][label], results["peer"][label]))
    widths = [max(len(str(r[i])) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(HEADER), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="compare", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--requests-c1", type=int, default=16)
    p.add_argument("--requests-c8", type=int, default=32)
    p.add_argument("--rate", type=float, default=2.0, help="open-loop Poisson rate, req/s")
    p.add_argument("--requests-rate", type=int, default=24)
    p.add_argument("--prompt-len", default="32")
    p.add_argument("--output-len", default="32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="both servers' weights (default fp32)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--slo", default="ttft=1s,tpot=100ms", help="for goodput, as `lockstep load --slo`")
    p.add_argument("--out", type=Path, default=REPO / "out" / "compare")
    p.add_argument("--only", choices=("lockstep", "peer"), help="run one server only")
    p.add_argument("--ready-timeout-s", type=float, default=300)
    p.add_argument("--lockstep-args", default="", help="extra `lockstep serve` flags, e.g. \"--throughput\"")
    args = p.parse_args(argv)

    servers = {
        "lockstep": ([sys.executable, "-m", "server.cli", "serve", "--model", args.model, "--pool", "cpu",
                      "--no-ray", "--dtype", args.dtype, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--http-port", "0",
                      *args.lockstep_args.split()],
                     "lockstep serve: ready"),
        "peer": ([sys.executable, str(REPO / "bench" / "peer_rayserve.py"), "--model", args.model,
                  "--seed", "0", "--dtype", args.dtype, "--duration-s", "0"], "peer ready"),
    }
    results: dict[str, dict[str, dict]] = {}
    t0 = time.monotonic()
    for name, (cmd, marker) in servers.items():
        if args.only and name != args.only:
            continue
        print(f"compare: starting {name}", flush=True)
        proc, target, metrics_url = _start(cmd, marker, args.out / f"{name}.log", args.ready_timeout_s)
        try:
            results[name] = run_loads(name, target, args, metrics_url if name == "lockstep" else "")
        finally:
            _stop(proc)
    labels = [label for label, _ in loads(args)]
    text = table(results, labels)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                                       "results": results}, indent=2) + "\n")
    (args.out / "compare.txt").write_text(text + "\n")
    print(f"\nprompt {args.prompt_len} tok, output {args.output_len} tok, seed {args.seed}, SLO {args.slo or '-'}; "
          f"{time.monotonic() - t0:.0f} s in all\n{text}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
