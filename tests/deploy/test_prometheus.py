"""deploy/: the Prometheus config, recording rules and Grafana dashboard against a live server.

A real LockstepServer (tiny model, in this process) is scraped by a real `prometheus`
binary every second; after a short load through both front doors (gRPC and the
OpenAI-compatible HTTP), every recording rule's expression and every dashboard panel's
query (its template variables expanded as Grafana would) is evaluated through
Prometheus's HTTP API and must return at least one series. Every `lockstep_*` name they
mention must be in the server's /metrics, and every template variable must resolve.
Skipped where no `prometheus` binary is installed (Debian: apt-get install prometheus).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from server.frontend.metrics import LATENCY_BUCKETS_S, PROTOCOLS

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
RULES_YML = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "lockstep.json"
GRAFANA_DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "lockstep.yml"
# Digits too: lockstep_e2e_request_latency_seconds. Recorded names (lockstep:...) do not match.
METRIC_NAME = re.compile(r"\blockstep_[a-z0-9_]+")
REQUESTS, HTTP_REQUESTS, KSERVE_REQUESTS, TOKENS, CONCURRENCY = 6, 3, 3, 20, 3
MODEL = "tiny"


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES_YML.read_text())["groups"] for r in g["rules"]]


def dashboard_panels() -> list[dict]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [p for p in panels if p["type"] != "row"]


def variables() -> list[dict]:
    return json.loads(DASHBOARD.read_text())["templating"]["list"]


def expand(expr: str) -> str:
    """`expr` with its template variables replaced as Grafana does on first load: a
    variable showing "All" becomes its allValue, any other its current value."""
    values = {}
    for v in variables():
        current = v["current"]["value"]
        current = current if isinstance(current, list) else [current]
        values[v["name"]] = v["allValue"] if current == ["$__all"] else "|".join(current)
    expanded = re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)
    assert "$" not in expanded, expanded
    return expanded


def panel_queries() -> list[tuple[str, str]]:
    return [(f"{p['title']} / {t['refId']}", expand(t["expr"])) for p in dashboard_panels() for t in p["targets"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- Static checks: no binary needed ------------------------------------------------------


def test_grafana_files_point_at_the_prometheus_datasource():
    (ds,) = yaml.safe_load(GRAFANA_DATASOURCE.read_text())["datasources"]
    assert ds["uid"] == "prometheus" and ds["type"] == "prometheus" and ds["url"] == "http://127.0.0.1:9090"
    (provider,) = yaml.safe_load(GRAFANA_PROVIDER.read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"
    panels = dashboard_panels()
    ids = [p["id"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["type"] == "timeseries", p["title"]
        assert p["datasource"]["uid"] == "prometheus", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "prometheus"}, (p["title"], t["refId"])
    titles = " ".join(p["title"].lower() for p in panels)
    for word in ("first token", "inter-token", "per output token", "end-to-end", "throughput", "waiting",
                 "kv", "batch", "predicted", "overruns", "reason"):
        assert word in titles, word


def test_dashboard_filters_request_panels_by_model_and_protocol():
    names = {v["name"]: v for v in variables()}
    assert set(names) == {"model", "protocol", "ttft_slo", "itl_slo"}
    assert names["protocol"]["query"].split(",") == list(PROTOCOLS)
    # The SLO choices are latency bucket edges, as the exposition writes them.
    edges = {str(b) for b in LATENCY_BUCKETS_S}
    for slo in ("ttft_slo", "itl_slo"):
        assert set(names[slo]["query"].split(",")) <= edges, slo
    request_metrics = ("lockstep_time_to_first_token_seconds", "lockstep_inter_token_latency_seconds",
                       "lockstep_requests_admitted_total", "lockstep_requests_finished_total",
                       "lockstep_generation_tokens_total")
    for p in dashboard_panels():
        for t in p["targets"]:
            for name in re.findall(r"\b(lockstep_[a-z0-9_]+)(\{[^}]*\})?", t["expr"]):
                if name[0].startswith(request_metrics):
                    assert 'model=~"$model"' in name[1] and 'protocol=~"$protocol"' in name[1], (p["title"], name)


def test_rule_names_follow_the_convention():
    names = [r["record"] for r in rules()]
    assert len(names) == len(set(names))
    for expected in ("lockstep:ttft_seconds:p50_1m", "lockstep:ttft_seconds:p99_1m", "lockstep:itl_seconds:p50_1m",
                     "lockstep:itl_seconds:p99_1m", "lockstep:generation_tokens:rate1m", "lockstep:requests_waiting",
                     "lockstep:kv_slot_utilization", "lockstep:tick_overrun_ratio:rate1m",
                     "lockstep:step_measured_over_predicted:ratio1m", "lockstep:requests_finished:rate1m",
                     "lockstep:ttft_under_250ms:ratio1m"):
        assert expected in names
    assert all(re.fullmatch(r"lockstep(:[a-z0-9_]+){1,2}", n) for n in names), names


# --- Against a live server and a real Prometheus ------------------------------------------

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="no `prometheus` binary on PATH (Debian: apt-get install --no-install-recommends prometheus)",
)


class Prom:
    def __init__(self, base: str):
        self.base = base

    def get(self, path: str, **params) -> dict:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}" if params else f"{self.base}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:  # 400/422: a bad query; the body says why
            return json.loads(err.read())

    def query(self, expr: str) -> dict:
        return self.get("/api/v1/query", query=expr)

    def value(self, expr: str) -> float | None:
        """The single sample's value, or None while there is none."""
        try:
            result = self.query(expr)["data"]["result"]
        except (KeyError, OSError):
            return None
        return float(result[0]["value"][1]) if len(result) == 1 else None


def wait_for(what: str, predicate, timeout_s: float, log: Path, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"prometheus exited ({proc.returncode}) while waiting for {what}:\n{log.read_text()[-3000:]}")
        try:
            result = predicate()
        except (OSError, ValueError):  # not listening yet, or a half-written answer
            result = None
        if result:
            return result
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}; prometheus log:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def stack():
    """(server, Prom, /metrics text after the load): a loaded server scraped every second."""
    if shutil.which("prometheus") is None:
        pytest.skip("no `prometheus` binary on PATH (Debian: apt-get install --no-install-recommends prometheus)")
    from protos.lockstep.v1 import lockstep_pb2 as pb
    from tests.server.test_app import Running, request, stream
    from tests.server.helpers import random_prompt

    # Not tmp_path_factory: a concurrent pytest run prunes old pytest-N dirs, TSDB included.
    tmpdir = tempfile.TemporaryDirectory(prefix="lockstep-prometheus-")
    tmp = Path(tmpdir.name)
    server = Running(max_queue=8, max_tokens=200, deterministic=False, http_port=0)
    proc = None
    log = tmp / "prometheus.log"
    try:
        target = urllib.parse.urlsplit(server.info["metrics"]).netloc  # "127.0.0.1:PORT"
        config = yaml.safe_load(PROMETHEUS_YML.read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        job, replicas = config["scrape_configs"]
        assert job["job_name"] == "lockstep" and replicas["job_name"] == "lockstep-replicas"
        job["static_configs"] = [{"targets": [target]}]
        replicas["http_sd_configs"] = [{"url": f"http://{target}/targets", "refresh_interval": "1s"}]
        config["rule_files"] = [str(RULES_YML)]  # the relative rules.yml, made absolute
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))

        port = free_port()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        prom = Prom(f"http://127.0.0.1:{port}")
        # A scrape before the load, so rate() sees the counters rise.
        wait_for("up == 1", lambda: prom.value('up{job="lockstep"}') == 1, 30, log, proc)

        prompts = [random_prompt(8 + 5 * i, seed=i) for i in range(REQUESTS)]
        bodies = [{"model": MODEL, "prompt": f"question {i}", "max_tokens": TOKENS, "temperature": 0}
                  for i in range(HTTP_REQUESTS)]
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            grpc_results = pool.map(lambda p: stream(server.stub, request(p, TOKENS), timeout=30), prompts)
            http_results = pool.map(lambda b: http_post(server.info["http"], b), bodies)
            kserve_results = pool.map(lambda i: kserve_infer(server.info["grpc"], f"kserve {i}"),
                                      range(KSERVE_REQUESTS))
            results, answers, kserved = list(grpc_results), list(http_results), list(kserve_results)
        assert all(len(tokens) == TOKENS and fin.finish_reason == "length" for tokens, fin in results)
        assert kserved == [TOKENS] * KSERVE_REQUESTS
        assert all(status == 200 and a["usage"]["completion_tokens"] == TOKENS for status, a in answers), answers
        # One refusal at each door, so the refusal series exist.
        assert http_post(server.info["http"], {"model": "not-served", "prompt": "x"})[0] == 404
        with pytest.raises(Exception, match="INVALID_ARGUMENT"):
            stream(server.stub, pb.GenerateRequest(max_tokens=1), timeout=30)  # no prompt
        with pytest.raises(Exception, match="OUT_OF_RANGE"):
            kserve_infer(server.info["grpc"], "x", max_tokens=10_000)
        with urllib.request.urlopen(server.info["metrics"], timeout=5) as resp:
            exposition = resp.read().decode()
        total = (REQUESTS + HTTP_REQUESTS + KSERVE_REQUESTS) * TOKENS

        # Two scrapes after the load: the first to see the final count, then one more.
        seen_at = wait_for(
            "a scrape with every generated token",
            lambda: (prom.value("sum(lockstep_generation_tokens_total)") == total
                     and prom.value("max(timestamp(lockstep_generation_tokens_total))")),
            30, log, proc,
        )  # fmt: skip
        wait_for("a second scrape after the load",
                 lambda: (prom.value("max(timestamp(lockstep_generation_tokens_total))") or 0) > seen_at, 10, log, proc)
        yield server, prom, exposition, log
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        server.close()
        tmpdir.cleanup()


def kserve_infer(address: str, prompt: str, max_tokens: int = TOKENS) -> int:
    """One ModelInfer at the KServe v2 door with the real tritonclient; the tokens it got."""
    import numpy as np
    import tritonclient.grpc as tc

    text = tc.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt], dtype=object))
    with tc.InferenceServerClient(address) as client:
        result = client.infer(MODEL, [text], parameters={"max_tokens": max_tokens, "temperature": 0})
    return result.get_response().parameters["completion_tokens"].int64_param


def http_post(address: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://{address}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def assert_query_has_series(prom: Prom, name: str, expr: str):
    answer = prom.query(expr)
    assert answer.get("status") == "success", f"{name}: {expr}\n{answer.get('error')}"
    result = answer["data"]["result"]
    assert answer["data"]["resultType"] == "vector" and result, f"{name}: no series for {expr}"
    for series in result:
        value = float(series["value"][1])
        assert math.isfinite(value), f"{name}: {series['metric']} = {value} for {expr}"


@needs_prometheus
@pytest.mark.slow
@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["record"])
def test_every_recording_rule_returns_series(stack, rule):
    _, prom, _, _ = stack
    assert_query_has_series(prom, rule["record"], rule["expr"])


@needs_prometheus
@pytest.mark.slow
def test_prometheus_loaded_and_evaluates_every_rule(stack):
    _, prom, _, log = stack
    expected = {r["record"] for r in rules()}

    def recorded():
        groups = prom.get("/api/v1/rules")["data"]["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        if set(loaded) != expected or any(r.get("lastEvaluation", "").startswith("0001") for r in loaded.values()):
            return None
        return loaded

    loaded = wait_for("every rule evaluated once", recorded, 10, log)
    bad = {name: r.get("lastError") for name, r in loaded.items() if r["health"] != "ok"}
    assert not bad
    for name in expected:  # the recorded series themselves, not only the expressions
        wait_for(f"series {name}", lambda name=name: prom.query(name)["data"]["result"], 10, log)


@needs_prometheus
@pytest.mark.slow
@pytest.mark.parametrize("name, expr", panel_queries(), ids=[n for n, _ in panel_queries()])
def test_every_dashboard_query_returns_series(stack, name, expr):
    _, prom, _, _ = stack
    assert_query_has_series(prom, name, expr)


@needs_prometheus
@pytest.mark.slow
def test_queries_name_only_metrics_the_server_exports(stack):
    _, _, exposition, _ = stack
    exported = {line.split("{")[0].split(" ")[0] for line in exposition.splitlines()
                if line and not line.startswith("#")}
    assert "lockstep_generation_tokens_total" in exported and "lockstep_ticks_total" in exported
    sources = [(r["record"], r["expr"]) for r in rules()] + panel_queries()
    missing = {(where, name) for where, expr in sources for name in METRIC_NAME.findall(expr)
               if name not in exported}
    assert not missing, f"not in the server's /metrics: {sorted(missing)}"


@needs_prometheus
@pytest.mark.slow
def test_the_load_shows_up_in_the_rules(stack):
    """Values that follow from the load: tokens flowed, no overruns, every phase timed."""
    _, prom, _, _ = stack
    expr = {r["record"]: r["expr"] for r in rules()}
    assert prom.value(expr["lockstep:generation_tokens:rate1m"]) > 0
    assert 0 < prom.value(expr["lockstep:ttft_seconds:p50_1m"]) < 30
    assert 0 <= prom.value(expr["lockstep:kv_slot_utilization"]) <= 1
    for record, check in (("lockstep:tick_overrun_ratio:rate1m", lambda v: v == 0),  # throughput mode: no slot
                          ("lockstep:step_measured_over_predicted:ratio1m", lambda v: v > 0)):
        result = prom.query(expr[record])["data"]["result"]
        phases = {s["metric"]["phase"] for s in result}
        assert {"prefill", "decode"} <= phases <= {"prefill", "decode", "mixed"}, record
        assert all(check(float(s["value"][1])) for s in result), (record, result)


@needs_prometheus
@pytest.mark.slow
def test_every_dashboard_variable_resolves(stack):
    """The model variable's label_values() query, the protocol choices and the SLO
    thresholds each name label values Prometheus holds for the request series."""
    _, prom, _, _ = stack
    for v in variables():
        if v["type"] == "query":
            metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", v["query"]["query"]).groups()
            held = prom.get(f"/api/v1/label/{label}/values", **{"match[]": metric})["data"]
            assert held == [MODEL], (v["name"], held)
    held = prom.get("/api/v1/label/protocol/values", **{"match[]": "lockstep_requests_admitted_total"})["data"]
    assert sorted(held) == sorted(next(v for v in variables() if v["name"] == "protocol")["query"].split(","))
    for name, metric in (("ttft_slo", "lockstep_time_to_first_token_seconds_bucket"),
                         ("itl_slo", "lockstep_inter_token_latency_seconds_bucket")):
        held = set(prom.get("/api/v1/label/le/values", **{"match[]": metric})["data"])
        choices = next(v for v in variables() if v["name"] == name)["query"].split(",")
        assert set(choices) <= held, (name, sorted(set(choices) - held))


@needs_prometheus
@pytest.mark.slow
def test_every_front_door_shows_up_per_protocol_under_the_model(stack):
    _, prom, _, _ = stack
    expr = {r["record"]: r["expr"] for r in rules()}
    finished = prom.query(expr["lockstep:requests_finished:rate1m"])["data"]["result"]
    ok = {s["metric"]["protocol"] for s in finished if s["metric"]["reason"] == "length" and float(s["value"][1]) > 0}
    refused = {(s["metric"]["protocol"], s["metric"]["code"]) for s in finished if s["metric"]["reason"] == "rejected"}
    assert ok == {"grpc", "http", "kserve"}
    assert refused == {("http", "NOT_FOUND"), ("grpc", "INVALID_ARGUMENT"), ("kserve", "OUT_OF_RANGE")}
    assert {s["metric"]["model"] for s in finished} == {MODEL}
    admitted = prom.query('sum by (protocol) (lockstep_requests_admitted_total)')["data"]["result"]
    assert {s["metric"]["protocol"]: float(s["value"][1]) for s in admitted} == {
        "grpc": REQUESTS, "http": HTTP_REQUESTS, "kserve": KSERVE_REQUESTS}
    for record in ("lockstep:ttft_under_250ms:ratio1m", "lockstep:itl_under_50ms:ratio1m"):
        (series,) = prom.query(expr[record])["data"]["result"]
        assert series["metric"]["model"] == MODEL and 0 <= float(series["value"][1]) <= 1, record
