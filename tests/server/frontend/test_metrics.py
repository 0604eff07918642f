"""Metrics: real scrapes over HTTP; each method moves exactly the series it should."""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.frontend.metrics import GRPC_CODES, LATENCY_BUCKETS_S, PROTOCOLS, Metrics

LATENCIES = (
    "lockstep_time_to_first_token_seconds",
    "lockstep_inter_token_latency_seconds",
    "lockstep_time_per_output_token_seconds",
    "lockstep_e2e_request_latency_seconds",
    "lockstep_queue_time_seconds",
    "lockstep_predicted_time_to_first_token_seconds",
    "lockstep_predicted_time_per_output_token_seconds",
    "lockstep_token_late_seconds",
    "lockstep_step_measured_seconds",
    "lockstep_step_predicted_seconds",
)
HISTOGRAMS = LATENCIES + ("lockstep_tick_batch_size", "lockstep_step_measured_over_predicted_ratio")
# Family name -> type as the text-format parser reports them: counters without `_total`,
# the Info as a gauge named `lockstep_server_info`.
FAMILIES = {name: "histogram" for name in HISTOGRAMS} | {
    name: "counter"
    for name in (
        "lockstep_ticks", "lockstep_tick_overruns", "lockstep_prompt_tokens",
        "lockstep_generation_tokens", "lockstep_requests_finished", "lockstep_requests_admitted", "lockstep_repaces",
    )
} | {
    name: "gauge"
    for name in (
        "lockstep_step_predicted_last_seconds", "lockstep_step_measured_last_seconds",
        "lockstep_requests_running", "lockstep_requests_waiting", "lockstep_kv_slots_used",
        "lockstep_kv_slots_total", "lockstep_time_scale", "lockstep_accepting_requests", "lockstep_engine_up",
        "lockstep_pace_factor", "lockstep_cold_allowance_seconds", "lockstep_start_lead_seconds",
        "lockstep_server_info",
    )
}  # fmt: skip


def scrape_families(port: int) -> list:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return list(text_string_to_metric_families(response.read().decode()))


def scrape(port: int) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value, without the `_created` timestamps."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in scrape_families(port)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def moved(port: int, action) -> dict[tuple, float]:
    """The samples `action` changed, as deltas (a new labelled series counts from 0)."""
    before = scrape(port)
    action()
    after = scrape(port)
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def names(delta: dict) -> set[str]:
    """Metric names behind the moved samples (histogram `_bucket/_count/_sum` folded)."""
    out = set()
    for name, _ in delta:
        for suffix in ("_bucket", "_count", "_sum"):
            if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
                name = name[: -len(suffix)]
        out.add(name)
    return out


def key(name: str, **labels) -> tuple:
    return (name, tuple(sorted(labels.items())))


MODEL = "tiny"


def req(name: str, protocol: str = "grpc", **labels) -> tuple:
    """A request series' key: every one carries the served model and the protocol."""
    return key(name, model=MODEL, protocol=protocol, **labels)


@pytest.fixture
def served():
    with Metrics(MODEL) as m:
        yield m, m.serve()


def test_every_metric_is_served_under_lockstep_prefix(served):
    m, port = served
    served_families = {f.name: f.type for f in scrape_families(port) if not f.name.endswith("_created")}
    assert served_families == FAMILIES
    # Phase-labelled series exist before the first tick, so rate() works from the start.
    values = scrape(port)
    for phase in ("prefill", "decode"):
        assert values[key("lockstep_ticks_total", phase=phase)] == 0
        assert values[key("lockstep_step_measured_seconds_count", phase=phase)] == 0
    # So do the request series of both protocols, under the served model's name.
    for protocol in PROTOCOLS:
        assert values[req("lockstep_requests_admitted_total", protocol)] == 0
        assert values[req("lockstep_time_to_first_token_seconds_count", protocol)] == 0


def test_latency_buckets_hold_the_slo_edges_and_sub_millisecond_steps(served):
    m, port = served
    assert LATENCY_BUCKETS_S[0] <= 1e-4 and LATENCY_BUCKETS_S[-1] >= 300
    assert list(LATENCY_BUCKETS_S) == sorted(LATENCY_BUCKETS_S)
    # No bucket spans more than a factor of 2: bounds histogram_quantile's interpolation.
    assert all(b / a <= 2 + 1e-12 for a, b in zip(LATENCY_BUCKETS_S, LATENCY_BUCKETS_S[1:]))
    assert len([b for b in LATENCY_BUCKETS_S if b < 1e-3]) >= 3
    families = {f.name: f for f in scrape_families(port)}
    for name in LATENCIES:
        family = families[name]
        edges = sorted({s.labels["le"] for s in family.samples if s.name.endswith("_bucket")}, key=float)
        # Exact text, as a PromQL selector would name them ({le="0.25"}).
        for slo in ("0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0"):
            assert slo in edges, (name, slo)
        assert [float(e) for e in edges] == sorted(LATENCY_BUCKETS_S) + [math.inf], name
    # 100 us lands in the first bucket, 5 minutes in a finite one; 250 ms on its edge.
    delta = moved(port, lambda: [m.token_emitted("grpc", g) for g in (1e-4, 300.0, 0.25)])
    itl = "lockstep_inter_token_latency_seconds_bucket"
    assert delta[req(itl, le=str(LATENCY_BUCKETS_S[0]))] == 1
    assert delta[req(itl, le="0.2")] == 1 and delta[req(itl, le="0.25")] == 2
    assert delta[req(itl, le=str(LATENCY_BUCKETS_S[-1]))] == 3


def test_observe_tick_moves_the_phase_series_batch_and_ratio(served):
    m, port = served
    delta = moved(port, lambda: m.observe_tick("decode", 3, 0.012, 0.010, overrun=True))
    assert names(delta) == {
        "lockstep_ticks_total", "lockstep_tick_overruns_total",
        "lockstep_step_measured_seconds", "lockstep_step_predicted_seconds",
        "lockstep_step_measured_last_seconds", "lockstep_step_predicted_last_seconds",
        "lockstep_tick_batch_size", "lockstep_step_measured_over_predicted_ratio",
    }  # fmt: skip
    assert all(dict(labels).get("phase", "decode") == "decode" for _, labels in delta)
    assert delta[key("lockstep_ticks_total", phase="decode")] == 1
    assert delta[key("lockstep_tick_overruns_total", phase="decode")] == 1
    assert delta[key("lockstep_step_measured_seconds_sum", phase="decode")] == pytest.approx(0.012)
    assert delta[key("lockstep_step_predicted_seconds_sum", phase="decode")] == pytest.approx(0.010)
    assert delta[key("lockstep_step_measured_last_seconds", phase="decode")] == pytest.approx(0.012)
    assert delta[key("lockstep_tick_batch_size_sum")] == 3
    assert key("lockstep_tick_batch_size_bucket", le="2.0") not in delta
    assert delta[key("lockstep_tick_batch_size_bucket", le="4.0")] == 1
    assert delta[key("lockstep_step_measured_over_predicted_ratio_sum")] == pytest.approx(1.2)
    assert key("lockstep_step_measured_over_predicted_ratio_bucket", le="1.15") not in delta
    assert delta[key("lockstep_step_measured_over_predicted_ratio_bucket", le="1.2")] == 1

    # No overrun: no overrun count; a zero prediction: no ratio (it would be infinite).
    delta = moved(port, lambda: m.observe_tick("prefill", 8, 0.05, 0.0, overrun=False))
    assert delta[key("lockstep_ticks_total", phase="prefill")] == 1
    assert not any(name.startswith(("lockstep_tick_overruns", "lockstep_step_measured_over")) for name, _ in delta)
    assert delta[key("lockstep_step_measured_seconds_count", phase="prefill")] == 1
    with pytest.raises(ValueError, match="'verify'"):
        m.observe_tick("verify", 1, 0.01, 0.01, overrun=False)


def test_state_gauges(served):
    m, port = served
    m.set_queue(running=5, waiting=7, slots_used=5)
    m.set_slots_total(64)
    m.set_time_scale(250.0)
    m.set_accepting(True)
    values = scrape(port)
    assert values[key("lockstep_requests_running")] == 5
    assert values[key("lockstep_requests_waiting")] == 7
    assert values[key("lockstep_kv_slots_used")] == 5
    assert values[key("lockstep_kv_slots_total")] == 64
    assert values[key("lockstep_time_scale")] == 250
    assert values[key("lockstep_accepting_requests")] == 1
    m.set_accepting(False)
    assert scrape(port)[key("lockstep_accepting_requests")] == 0
    with pytest.raises(ValueError, match="0"):
        m.set_time_scale(0)


def test_admission_and_tokens(served):
    m, port = served
    delta = moved(port, lambda: [m.request_admitted("grpc", 17), m.request_admitted("grpc", 3)])
    assert delta == {req("lockstep_requests_admitted_total"): 2, req("lockstep_prompt_tokens_total"): 20}

    delta = moved(port, lambda: [m.token_emitted("grpc", None), m.token_emitted("grpc", 0.02),
                                 m.token_emitted("grpc", 0.03)])
    assert names(delta) == {"lockstep_generation_tokens_total", "lockstep_inter_token_latency_seconds"}
    assert delta[req("lockstep_generation_tokens_total")] == 3
    assert delta[req("lockstep_inter_token_latency_seconds_count")] == 2  # the first token has no gap
    assert delta[req("lockstep_inter_token_latency_seconds_sum")] == pytest.approx(0.05)


def test_each_protocol_counts_in_its_own_series(served):
    m, port = served
    delta = moved(port, lambda: [m.request_admitted("http", 5), m.token_emitted("http", 0.01),
                                 m.request_finished("http", "stop", "OK", 0.1, None, 0.2, None, None, None, 1),
                                 m.request_rejected("http", "RESOURCE_EXHAUSTED")])
    assert {dict(labels).get("protocol") for _, labels in delta} == {"http"}
    assert all(dict(labels)["model"] == MODEL for _, labels in delta)
    assert delta[req("lockstep_requests_finished_total", "http", reason="stop", code="OK")] == 1
    assert delta[req("lockstep_requests_finished_total", "http", reason="rejected", code="RESOURCE_EXHAUSTED")] == 1
    for bad in ("HTTP", "grpc ", "", "websocket"):
        with pytest.raises(ValueError, match="protocol"):
            m.request_admitted(bad, 1)


def test_finished_request_observes_each_latency_beside_its_prediction(served):
    m, port = served
    given = {
        "lockstep_time_to_first_token_seconds": 0.25,
        "lockstep_time_per_output_token_seconds": 0.004,
        "lockstep_e2e_request_latency_seconds": 1.5,
        "lockstep_queue_time_seconds": 0.01,
        "lockstep_predicted_time_to_first_token_seconds": 0.2,
        "lockstep_predicted_time_per_output_token_seconds": 0.005,
    }
    delta = moved(port, lambda: m.request_finished("grpc", "length", "OK", *given.values(), completion_tokens=300))
    assert names(delta) == set(given) | {"lockstep_requests_finished_total"}
    assert delta[req("lockstep_requests_finished_total", reason="length", code="OK")] == 1
    for name, seconds in given.items():
        assert delta[req(f"{name}_count")] == 1
        assert delta[req(f"{name}_sum")] == pytest.approx(seconds)

    # grpc.StatusCode members count under their name, in the same series as the string.
    delta = moved(port, lambda: m.request_finished("grpc", "stop", grpc.StatusCode.OK, *given.values(), 300))
    assert delta[req("lockstep_requests_finished_total", reason="stop", code="OK")] == 1


def test_cancelled_before_first_token_observes_no_latency(served):
    m, port = served
    delta = moved(port, lambda: m.request_finished("grpc", "cancelled", "CANCELLED", None, None, None, 0.5, 0.2, None, 0))
    assert names(delta) == {
        "lockstep_requests_finished_total",
        "lockstep_queue_time_seconds",
        "lockstep_predicted_time_to_first_token_seconds",
    }
    assert delta[req("lockstep_requests_finished_total", reason="cancelled", code="CANCELLED")] == 1
    # One token has no TPOT, even when the caller passes one.
    delta = moved(port, lambda: m.request_finished("grpc", "error", "INTERNAL", 0.1, 0.0, 0.1, None, None, None, 1))
    assert "lockstep_time_per_output_token_seconds" not in names(delta)


def test_rejection_counts_only_the_finished_series(served):
    m, port = served
    delta = moved(port, lambda: m.request_rejected("grpc", "RESOURCE_EXHAUSTED"))
    assert delta == {req("lockstep_requests_finished_total", reason="rejected", code="RESOURCE_EXHAUSTED"): 1}


def test_bad_labels_are_refused_with_the_bad_value(served):
    m, _ = served
    with pytest.raises(ValueError, match="'timeout'"):
        m.request_finished("grpc", "timeout", "OK", None, None, None, None, None, None, 0)
    with pytest.raises(ValueError, match="'NOPE'"):
        m.request_rejected("grpc", "NOPE")
    with pytest.raises(ValueError, match="colour"):
        m.set_info(colour="blue")
    with pytest.raises(ValueError, match="'fast'"):
        m.set_info(mode="fast")
    assert GRPC_CODES == {code.name for code in grpc.StatusCode}


def test_server_info_labels(served):
    m, port = served
    m.set_info(model="tiny", pool="cpu:1", plan_hash="abc123", dtype="fp32", executor="local")
    m.set_info(mode="deterministic")  # merged, not replaced
    labels = dict(next(s.labels for f in scrape_families(port) if f.name == "lockstep_server_info" for s in f.samples))
    assert labels == {
        "model": "tiny", "pool": "cpu:1", "plan_hash": "abc123",
        "dtype": "fp32", "executor": "local", "mode": "deterministic",
    }  # fmt: skip


def test_two_instances_have_independent_registries_and_ports():
    with Metrics(MODEL) as a, Metrics(MODEL) as b:
        port_a, port_b = a.serve(), b.serve()
        assert port_a != port_b
        a.request_admitted("grpc", 10)
        assert scrape(port_a)[req("lockstep_prompt_tokens_total")] == 10
        assert scrape(port_b)[req("lockstep_prompt_tokens_total")] == 0


def test_close_frees_the_port():
    m = Metrics()
    port = m.serve()
    with pytest.raises(RuntimeError, match=str(port)):
        m.serve()
    scrape(port)
    m.close()
    m.close()  # idempotent
    with pytest.raises(urllib.error.URLError):
        scrape(port)
    with Metrics() as again:
        assert again.serve(port=port) == port
        assert key("lockstep_ticks_total", phase="decode") in scrape(port)


@pytest.mark.parametrize("path", ["/", "/metricsx", "/favicon.ico", "/metrics/../x", "/debug"])
def test_only_the_metrics_path_answers(served, path):
    _, port = served
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)
    assert err.value.code == 404


def test_targets_lists_what_is_behind_the_server_for_prometheus_service_discovery(served):
    m, port = served
    import json

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/targets", timeout=5) as resp:
        assert resp.headers["Content-Type"] == "application/json" and json.loads(resp.read()) == []
    m.targets = lambda: [{"targets": ["127.0.0.1:1"], "labels": {"replica": "0"}}]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/targets", timeout=5) as resp:
        assert json.loads(resp.read()) == [{"targets": ["127.0.0.1:1"], "labels": {"replica": "0"}}]


def test_scrapes_answer_while_50_idle_connections_are_open(served):
    """Idle clients never lock a scraper out: with 50 connections open that send nothing
    (and one that sent half a request), 20 scrapes in a row each answer within 100 ms.
    It was 8 threads, one per connection: 8 idle connections made every scrape fail.
    The test process's objects are frozen as the server's are (server/app.py): here the
    scraper and the server share a process of ~250k objects (torch, hypothesis), whose
    full collection, one in 20 scrapes, took 130 ms with the GIL held."""
    import gc
    import socket

    _, port = served
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(50)]
    idle[0].sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    gc.collect()
    gc.freeze()
    try:
        time.sleep(0.2)  # all accepted by now
        for _ in range(20):
            t0 = time.perf_counter()
            assert key("lockstep_ticks_total", phase="decode") in scrape(port)
            assert time.perf_counter() - t0 < 0.1
    finally:
        gc.unfreeze()
        for s in idle:
            s.close()


def test_connections_past_the_bound_evict_the_oldest_idle_and_silent_ones_are_dropped(monkeypatch):
    """The cost of idle clients is bounded without refusing anyone: past MAX_CONNECTIONS
    the oldest idle connection is closed for the new one, and one that stays silent
    READ_TIMEOUT_S is dropped."""
    import socket

    import server.frontend.metrics as metrics

    monkeypatch.setattr(metrics, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(metrics, "READ_TIMEOUT_S", 1.0)

    def closed_by_server(s: socket.socket, within_s: float) -> bool:
        s.settimeout(within_s)
        try:
            return s.recv(1) == b""
        except TimeoutError:
            return False

    with Metrics(MODEL) as m:
        port = m.serve()
        first = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
        time.sleep(0.1)
        assert not closed_by_server(first[0], 0.1)
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)  # the 5th: the oldest goes
        assert closed_by_server(first[0], 0.5)
        assert not closed_by_server(first[1], 0.05)
        assert key("lockstep_ticks_total", phase="decode") in scrape(port)  # a scraper still gets in
        assert all(closed_by_server(s, 2.0) for s in [*first[1:], extra])  # silent for 1 s: dropped
        for s in [*first, extra]:
            s.close()
