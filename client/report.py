"""Load-test statistics and outputs: pure functions over per-request records, then the
files (summary.json, requests.csv, PNG plots) written from them.

Everything here works on a recorded trace; nothing talks to a server.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

QUANTILES = (50, 90, 95, 99)  # percent


@dataclass
class RequestRecord:
    """One measured request. Times are seconds; start_s is from the start of the run."""
    index: int
    start_s: float
    status: str  # "OK" or the gRPC status code name
    prompt_tokens: int
    output_tokens: int  # tokens received (also for a failed stream)
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # every gap between consecutive tokens
    tpot_s: float | None = None  # mean of itl_s
    e2e_s: float | None = None
    predicted_ttft_s: float | None = None  # from the admission metadata
    predicted_tpot_s: float | None = None  # from Finished.predicted_tpot_s

    @property
    def ok(self) -> bool:
        return self.status == "OK"


def percentiles(xs) -> dict[str, float | None]:
    """mean, p50, p90, p95, p99 (linear interpolation between order statistics, numpy's
    default); None for all when xs is empty."""
    xs = np.asarray(list(xs), dtype=float)
    if xs.size == 0:
        return {"mean": None, **{f"p{q}": None for q in QUANTILES}}
    return {"mean": float(xs.mean()), **{f"p{q}": float(np.percentile(xs, q)) for q in QUANTILES}}


def meets_slo(r: RequestRecord, slo: dict[str, float]) -> bool:
    """An OK request whose ttft_s / tpot_s / e2e_s are within every given bound (seconds)."""
    return r.ok and all(getattr(r, key) is not None and getattr(r, key) <= bound for key, bound in slo.items())


def _median_ratio(pairs) -> float | None:
    ratios = [m / p for m, p in pairs if m is not None and p is not None and p > 0 and math.isfinite(p)]
    return statistics.median(ratios) if ratios else None


def summarize(records: list[RequestRecord], slo: dict[str, float], duration_s: float) -> dict:
    """Latency percentiles over OK requests, rates over `duration_s`, errors by status.

    Failed requests count in `requests` and `errors`, never in latencies or throughput.
    Goodput is OK requests meeting every SLO, per second. Prediction error is the median
    of measured / predicted per request (1.0 = the plan was exact)."""
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.status] = errors.get(r.status, 0) + 1
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": dict(sorted(errors.items())),
        "duration_s": duration_s,
        "requests_per_s": per_s(len(ok)),
        "output_tokens_per_s": per_s(sum(r.output_tokens for r in ok)),
        "goodput_requests_per_s": per_s(sum(meets_slo(r, slo) for r in ok)),
        "slo": slo,
        "ttft_s": percentiles(r.ttft_s for r in ok),
        "itl_s": percentiles(g for r in ok for g in r.itl_s),
        "tpot_s": percentiles(r.tpot_s for r in ok if r.itl_s),
        "e2e_s": percentiles(r.e2e_s for r in ok),
        "ttft_measured_over_predicted": _median_ratio((r.ttft_s, r.predicted_ttft_s) for r in ok),
        "tpot_measured_over_predicted": _median_ratio((r.tpot_s, r.predicted_tpot_s) for r in ok if r.itl_s),
    }


CSV_FIELDS = ("index", "start_s", "status", "prompt_tokens", "output_tokens", "ttft_s", "tpot_s", "e2e_s",
              "predicted_ttft_s", "predicted_tpot_s", "itl_s")


def write_outputs(out: Path, summary: dict, records: list[RequestRecord], config: dict, caption: str = "") -> None:
    """summary.json (config, summary, records), requests.csv and the latency PNGs. The
    PNGs carry the run in their metadata: `caption` (the line the tool printed for it) as
    Description, the config as Comment, so a picture in the docs names the run it shows."""
    out.mkdir(parents=True, exist_ok=True)
    # Shallow rows: `asdict` deep-copies every gap list (3 of `lockstep simulate`'s 10 s
    # for 10,000 requests went there).
    rows = [{f.name: getattr(r, f.name) for f in fields(r)} for r in records]
    doc = {"config": config, "summary": summary, "requests": rows}
    (out / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
    with open(out / "requests.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r, row in zip(records, rows):
            row = {**row, "itl_s": " ".join(f"{g:.6f}" for g in r.itl_s)}
            w.writerow(["" if row[k] is None else row[k] for k in CSV_FIELDS])
    metadata = {"Description": caption, "Comment": json.dumps(config, sort_keys=True)}
    plot_cdfs(records, out / "latency_cdf.png", metadata)
    plot_itl_over_time(records, out / "itl_over_time.png", metadata)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdfs(records: list[RequestRecord], path: Path, metadata: dict | None = None) -> None:
    plt = _pyplot()
    ok = [r for r in records if r.ok]
    series = {"TTFT": [r.ttft_s for r in ok], "ITL": [g for r in ok for g in r.itl_s], "e2e": [r.e2e_s for r in ok]}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, xs) in zip(axes, series.items()):
        xs = np.sort(np.asarray(xs, dtype=float)) * 1e3
        if xs.size:
            ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post")
        ax.set(title=f"{name} CDF", xlabel="ms", ylabel="fraction ≤ x", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata=metadata)
    plt.close(fig)


def token_gap_times(r: RequestRecord) -> list[float]:
    """Run-relative receive time (seconds) of each token after the first, one per itl_s gap."""
    t = r.start_s + (r.ttft_s or 0.0)
    times = []
    for g in r.itl_s:
        t += g
        times.append(t)
    return times


def plot_itl_over_time(records: list[RequestRecord], path: Path, metadata: dict | None = None) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    xs = np.asarray([t for r in records if r.ok for t in token_gap_times(r)], dtype=float)
    ys = np.asarray([g for r in records if r.ok for g in r.itl_s], dtype=float) * 1e3
    # One marker path, not a scatter collection: 250,000 gaps drew in seconds as a scatter.
    ax.plot(xs, ys, linestyle="none", marker=".", markersize=2, alpha=0.5)
    ax.set(title="Inter-token latency over time", xlabel="time since start (s)", ylabel="gap (ms)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata=metadata)
    plt.close(fig)


def scrape(url: str) -> dict[tuple, float]:
    """A Prometheus endpoint's samples: {(sample name, sorted (label, value) pairs): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def run_rates(prog: str, args, rates: list[float | None],
              run: Callable[[float | None], tuple[dict, list[RequestRecord], dict]],
              line: Callable[[float | None, dict], str]) -> None:
    """One run per rate (None: closed loop), the way `lockstep load` and `lockstep simulate`
    both report: `run(rate)` gives (summary, records, extra config); each run's outputs go
    to `args.output` (with --sweep, to rate_R/ below it, plus sweep.json and sweep.png),
    with the arguments as its config, and `line(rate, summary)` is printed."""
    # Lengths (LengthDist) and paths as text; the rest is JSON already.
    config = {k: (v if isinstance(v, (int, float, str, bool, type(None), dict, list)) else str(v))
              for k, v in vars(args).items()}
    points = []
    for rate in rates:
        summary, records, extra = run(rate)
        out = args.output / f"rate_{rate:g}" if args.sweep else args.output
        text = f"{prog}: {line(rate, summary)}"
        write_outputs(out, summary, records, {**config, "rate": rate, **extra}, text)
        print(text, flush=True)
        points.append({"rate": rate, **summary})
    if args.sweep:
        write_sweep(args.output, points)
    print(f"{prog}: wrote {args.output}", flush=True)


def write_sweep(folder: Path, points: list[dict]) -> None:
    """sweep.json and sweep.png for a sweep's points (each a summary with its `rate`)."""
    (folder / "sweep.json").write_text(json.dumps(points, indent=2) + "\n")
    plot_sweep(points, folder / "sweep.png")


def plot_sweep(points: list[dict], path: Path) -> None:
    """Throughput vs latency, one point per swept rate: each `points` item has `rate` and
    a summary's fields."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    tput = [p["output_tokens_per_s"] for p in points]
    for ax, key, name in ((axes[0], "ttft_s", "TTFT"), (axes[1], "tpot_s", "TPOT")):
        for q in ("p50", "p99"):
            ys = [(p[key][q] or math.nan) * 1e3 for p in points]
            ax.plot(tput, ys, marker="o", label=q)
        for p, x in zip(points, tput):
            ax.annotate(f"{p['rate']:g}/s", (x, (p[key]["p50"] or math.nan) * 1e3), fontsize=8)
        ax.set(title=f"{name} vs throughput", xlabel="output tokens/s", ylabel=f"{name} (ms)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
