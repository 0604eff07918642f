"""Load generator: statistics on a hand-made trace, seeded arrivals, and live runs
against an in-process server."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from client.loadgen import LengthDist, arrival_times, main, parse_slo
from client.report import RequestRecord, percentiles, summarize
from tests.server.test_app import Running


def ok(i, start, ttft, itl, pred_ttft=None, pred_tpot=None):
    tpot = sum(itl) / len(itl)
    return RequestRecord(i, start, "OK", 4, len(itl) + 1, ttft, itl, tpot, ttft + sum(itl), pred_ttft, pred_tpot)


TRACE = [
    ok(0, 0.0, 0.10, [0.01, 0.03], 0.05, 0.02),   # tpot 0.02, e2e 0.14
    ok(1, 0.5, 0.30, [0.02, 0.02], 0.10, 0.01),   # tpot 0.02, e2e 0.34
    ok(2, 1.0, 0.20, [0.05, 0.05], 0.10, 0.05),   # tpot 0.05, e2e 0.30
    RequestRecord(3, 1.5, "OUT_OF_RANGE", 4, 0),
    RequestRecord(4, 1.6, "RESOURCE_EXHAUSTED", 4, 0),
    RequestRecord(5, 1.7, "OUT_OF_RANGE", 4, 0),
]


def test_percentiles_interpolate_between_order_statistics():
    p = percentiles([1, 2, 3, 4, 5])
    assert p == {"mean": 3.0, "p50": 3.0, "p90": 4.6, "p95": 4.8, "p99": pytest.approx(4.96)}
    assert percentiles([])["p99"] is None


def test_summary_of_a_recorded_trace_equals_hand_computed_values():
    s = summarize(TRACE, {"ttft_s": 0.25, "tpot_s": 0.03}, duration_s=2.0)
    assert s["requests"] == 6 and s["ok"] == 3
    assert s["errors"] == {"OUT_OF_RANGE": 2, "RESOURCE_EXHAUSTED": 1}  # failures counted, never dropped
    assert s["requests_per_s"] == 1.5
    assert s["output_tokens_per_s"] == 4.5  # 3 tokens each, 9 over 2 s
    assert s["goodput_requests_per_s"] == 0.5  # only request 0 meets ttft<=250ms and tpot<=30ms
    assert s["ttft_s"]["mean"] == pytest.approx(0.2) and s["ttft_s"]["p50"] == pytest.approx(0.2)
    assert s["ttft_s"]["p90"] == pytest.approx(0.28)  # 0.2 + 0.8 * (0.3 - 0.2)
    assert s["itl_s"]["p50"] == pytest.approx(0.025)  # gaps 0.01 0.02 0.02 0.03 0.05 0.05
    assert s["tpot_s"]["mean"] == pytest.approx(0.03)
    assert s["e2e_s"]["p50"] == pytest.approx(0.30)
    assert s["ttft_measured_over_predicted"] == pytest.approx(2.0)  # ratios 2, 3, 2
    assert s["tpot_measured_over_predicted"] == pytest.approx(1.0)  # ratios 1, 2, 1


def test_slo_and_lengths_parse():
    assert parse_slo("ttft=200ms,tpot=20ms,e2e=2s") == {"ttft_s": 0.2, "tpot_s": 0.02, "e2e_s": 2.0}
    with pytest.raises(ValueError, match="itl"):
        parse_slo("itl=5ms")
    rng = np.random.default_rng(0)
    assert LengthDist.parse("32").draw(rng) == 32
    draws = [LengthDist.parse("uniform:16:128").draw(rng) for _ in range(2000)]
    assert min(draws) == 16 and max(draws) == 128
    assert abs(np.mean([LengthDist.parse("normal:64:16").draw(rng) for _ in range(2000)]) - 64) < 2


def test_poisson_arrivals_have_the_rate():
    rate, n = 20.0, 20_000
    t = arrival_times(rate, n, 1.0, np.random.default_rng(1))
    gaps = np.diff(t, prepend=0.0)
    assert abs(gaps.mean() - 1 / rate) < 0.03 / rate  # std of the mean is 1/(rate*sqrt(n)) ~ 0.007/rate
    counts = np.histogram(t, bins=np.arange(0, t[-1], 1.0))[0]  # arrivals per 1 s window: Poisson(20)
    assert abs(counts.mean() - rate) < 0.5 and abs(counts.var() - rate) < 3


def test_gamma_arrivals_keep_the_mean_and_burstiness_sets_the_spread():
    rng = np.random.default_rng(2)
    g1 = np.diff(arrival_times(10.0, 20_000, 1.0, rng), prepend=0.0)
    bursty = np.diff(arrival_times(10.0, 20_000, 0.25, rng), prepend=0.0)
    assert abs(g1.mean() - 0.1) < 0.003 and abs(bursty.mean() - 0.1) < 0.006
    assert abs(g1.std() / g1.mean() - 1.0) < 0.05  # exponential: coefficient of variation 1
    assert bursty.std() / bursty.mean() > 1.8  # cv = 1/sqrt(0.25) = 2


def test_arrivals_are_reproducible_from_the_seed():
    a = arrival_times(5.0, 100, 0.5, np.random.default_rng(7))
    assert np.array_equal(a, arrival_times(5.0, 100, 0.5, np.random.default_rng(7)))
    assert not np.array_equal(a, arrival_times(5.0, 100, 0.5, np.random.default_rng(8)))


@pytest.fixture(scope="module")
def live():
    server = Running(max_queue=16, max_tokens=24, deterministic=False)
    yield server
    server.close()


def load(live, out, *extra):
    assert main(["--target", live.info["grpc"], "--output", str(out), "--prompt-len", "uniform:4:24",
                 "--output-len", "8", "--seed", "3", "--slo", "ttft=10s,tpot=10s", *extra]) == 0
    doc = json.loads((out / "summary.json").read_text())
    with open(out / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == doc["summary"]["requests"] == len(doc["requests"])
    for png in ("latency_cdf.png", "itl_over_time.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    return doc, rows


def test_closed_loop_run_writes_every_output(live, tmp_path):
    doc, rows = load(live, tmp_path, "--requests", "8", "--concurrency", "2", "--warmup", "2")
    s = doc["summary"]
    assert s["ok"] == 8 and s["errors"] == {} and all(r["status"] == "OK" for r in rows)
    assert all(len(r["itl_s"]) == 7 and r["predicted_ttft_s"] > 0 and r["predicted_tpot_s"] > 0
               for r in doc["requests"])
    assert s["goodput_requests_per_s"] == pytest.approx(s["requests_per_s"])  # SLOs of 10 s: all meet them
    assert s["ttft_s"]["p50"] > 0 and s["output_tokens_per_s"] > 0


def test_open_loop_sweep_writes_each_rate_and_the_sweep_plot(live, tmp_path):
    load(live, tmp_path / "single", "--requests", "6", "--rate", "40")
    assert main(["--target", live.info["grpc"], "--output", str(tmp_path / "sweep"), "--requests", "4",
                 "--output-len", "4", "--sweep", "20,80", "--arrival", "gamma", "--burstiness", "0.5"]) == 0
    points = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [p["rate"] for p in points] == [20.0, 80.0] and all(p["ok"] == 4 for p in points)
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "sweep" / "rate_80" / "summary.json").exists()


def test_bad_requests_are_counted_by_status_not_dropped(live, tmp_path):
    # max_tokens=24 on the server: output lengths above it are refused
    doc, rows = load(live, tmp_path, "--requests", "10", "--concurrency", "2", "--output-len", "uniform:16:32")
    s = doc["summary"]
    too_long = [r for r in doc["requests"] if r["status"] != "OK"]
    assert s["requests"] == 10 and s["ok"] + sum(s["errors"].values()) == 10
    assert too_long and set(s["errors"]) <= {"OUT_OF_RANGE", "INVALID_ARGUMENT"}
    assert all(r["ttft_s"] is None and r["output_tokens"] == 0 for r in too_long)
