"""Prometheus metrics: every prediction exported beside its measurement.

One `Metrics` owns its own `CollectorRegistry` and HTTP endpoint, so several servers
(or tests) in one process never clash over names or ports. The engine calls the
methods below from its step loop: each one touches pre-resolved metric children
(a lock and an add or a bucket scan), never a label lookup by string on the hot path.

Names start with `lockstep_` and carry their unit (`_seconds`, `_tokens_total`,
`_ratio`). Counters are exposed with a `_total` suffix, the Info as `lockstep_server_info`.
Request series are labelled `model` and `protocol` (grpc, http, kserve), tick series `phase`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import threading
import time
from collections.abc import Callable

import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_asgi_app

from server.frontend.httpd import SignalFreeUvicorn, bounded_protocol

# Latency buckets, seconds: 1, 2, 2.5 and 5 per decade, 100 us .. 500 s (28 edges). The
# usual SLO thresholds (10, 25, 50, 100, 250, 500 ms, 1, 2.5, 5 s) are edges, so "share
# of first tokens under 250 ms" is read off a bucket, not interpolated; a sub-millisecond
# step resolves at 100, 200, 250, 500 us; and no bucket spans more than a factor of 2,
# which bounds histogram_quantile's interpolation error. Parsed from decimal text so
# the `le` labels are exact ("0.00025", not a rounded product).
LATENCY_BUCKETS_S = tuple(float(f"{m}e{e}") for e in range(-4, 3) for m in (1, 2, 2.5, 5))
# Rows per tick: the compiled batch buckets are powers of two up to 256.
BATCH_BUCKETS = tuple(2**k for k in range(9))
DELIVERY_SAMPLES = 1024  # the last tokens' lateness kept for serve's record (`Metrics.delivery_late`)
# Measured / predicted step time: fine around 1 (the Groq compiler's estimate was within
# 2% of measurement, so 0.98 and 1.02 are bucket edges), coarse beyond 0.5 and 2.
RATIO_BUCKETS = (
    0.25, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0,
    1.02, 1.05, 1.1, 1.15, 1.2, 1.3, 1.4, 1.5, 1.75, 2.0, 3.0, 5.0, 10.0,
)  # fmt: skip

PHASES = ("prefill", "decode", "mixed")  # same as server.runtime.step.PHASES (not imported: that pulls in torch)
# How admitted requests end (server.frontend.api.Outcome), and "rejected": refused at arrival.
FINISH_REASONS = ("length", "stop", "cancelled", "disconnected", "deadline", "error", "rejected")
# grpc.StatusCode names, listed here so label values stay a closed set without importing grpc.
GRPC_CODES = frozenset((
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
))  # fmt: skip
# Request series carry `model` (the served model's name, one per server) and `protocol`:
# the front door the request came in by. Both are exported from the start, at 0.
PROTOCOLS = ("grpc", "http", "kserve")  # kserve: the KServe v2 / Triton gRPC door
INFO_LABELS = ("model", "pool", "plan_hash", "dtype", "executor", "mode")
MODES = ("deterministic", "deterministic+pipelined", "throughput")  # +pipelined: row groups per stage (server/core/pipelined.py)
# The endpoint's bounds. A scrape is one short request, but anyone who can reach the port
# can also hold connections open: idle ones must never lock a scraper out (8 idle
# connections did, when each held one of 8 threads). So connections live on one asyncio
# loop (uvicorn, in a thread of its own), where an idle one costs a socket and a few KiB,
# and their cost is bounded without refusing anyone: past MAX_CONNECTIONS the oldest idle
# connection is closed to make room for the new one, and a connection that stays silent
# READ_TIMEOUT_S (from its start or after a response) is dropped.
MAX_CONNECTIONS = 256
READ_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 2.0  # close(): at most this long for the server thread to end
METRICS_PATH = "/metrics"
TARGETS_PATH = "/targets"  # Prometheus http_sd_configs: what else to scrape (a router's replicas)


def _only_metrics(app, targets: Callable[[], list[dict]]):
    """The ASGI app on METRICS_PATH, and on TARGETS_PATH the scrape targets behind this
    server (Prometheus HTTP service discovery: a router's replicas; [] for one engine);
    404 on any other path, 405 for methods but GET/HEAD."""

    async def answer(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(body)).encode()), *headers]})
        await send({"type": "http.response.body", "body": body})

    async def asgi(scope, receive, send):
        path = scope.get("path")
        if path not in (METRICS_PATH, TARGETS_PATH):
            return await answer(send, 404, b"not found: only /metrics and /targets are served here\n",
                                [(b"content-type", b"text/plain")])
        if scope.get("method") not in ("GET", "HEAD"):
            return await answer(send, 405, b"method not allowed\n",
                                [(b"content-type", b"text/plain"), (b"allow", b"GET, HEAD")])
        if path == TARGETS_PATH:
            return await answer(send, 200, json.dumps(targets()).encode(), [(b"content-type", b"application/json")])
        return await app(scope, receive, send)

    return asgi


class _PhaseSeries:
    """The children of every `phase`-labelled metric for one phase, resolved once."""

    def __init__(self, m: Metrics, phase: str):
        self.ticks = m._ticks.labels(phase)
        self.overruns = m._overruns.labels(phase)
        self.measured = m._step_measured.labels(phase)
        self.predicted = m._step_predicted.labels(phase)
        self.measured_last = m._step_measured_last.labels(phase)
        self.predicted_last = m._step_predicted_last.labels(phase)


class _RequestSeries:
    """The children of every request metric for one (model, protocol), resolved once."""

    def __init__(self, m: Metrics, protocol: str):
        labels = (m.model, protocol)
        self.labels = labels
        self.ttft, self.itl, self.tpot, self.e2e, self.queue, self.ttft_pred, self.tpot_pred, self.late = (
            h.labels(*labels) for h in (m._ttft, m._itl, m._tpot, m._e2e, m._queue, m._ttft_pred, m._tpot_pred,
                                        m._late))
        self.prompt_tokens = m._prompt_tokens.labels(*labels)
        self.generation_tokens = m._generation_tokens.labels(*labels)
        self.admitted = m._admitted.labels(*labels)
        # (reason, code) -> child, filled on first use; the usual endings exist from the start, at 0,
        # so rate() counts a series' first requests (it cannot see an increase into a new series).
        self.finished: dict[tuple[str, object], Counter] = {
            (reason, "OK"): m._finished.labels(*labels, reason, "OK") for reason in ("length", "stop")}


class Metrics:
    def __init__(self, model: str = ""):
        """model: the served model's name, the `model` label of every request series."""
        self.registry = CollectorRegistry()
        self.model = model
        self.pace: dict[str, float] = {}  # phase -> the pace factor now (the gauge's values)
        # The engine's whole pace now (scheduler/simulate.py, `Pace.to_json`): what serve
        # records for `lockstep simulate`; {} until the engine tells it.
        self.pace_state: dict = {}
        # How late each of the last DELIVERY_SAMPLES promised first tokens, and later tokens,
        # left (seconds past its promised time, 0 when on time): serve records them for
        # `lockstep simulate`, which hands its tokens out as late (what a client sees beyond
        # the promise: first tokens come later than the rest, as their steps start cold).
        self.delivery_late: dict[str, collections.deque] = {
            which: collections.deque(maxlen=DELIVERY_SAMPLES) for which in ("first", "later")}
        self.late_tokens = 0  # samples taken in all (serve records them when it moved)
        r = self.registry
        request = ["model", "protocol"]

        def latency(name: str, what: str) -> Histogram:
            return Histogram(name, what, request, buckets=LATENCY_BUCKETS_S, registry=r)

        # Per request: measured, then predicted at admission.
        self._ttft = latency("lockstep_time_to_first_token_seconds", "Arrival to first token")
        self._itl = latency("lockstep_inter_token_latency_seconds", "Gap between consecutive tokens of a request")
        self._tpot = latency("lockstep_time_per_output_token_seconds", "(e2e - TTFT) / (tokens - 1) per request")
        self._e2e = latency("lockstep_e2e_request_latency_seconds", "Arrival to last token")
        self._queue = latency("lockstep_queue_time_seconds", "Arrival to first scheduled tick")
        self._ttft_pred = latency("lockstep_predicted_time_to_first_token_seconds", "TTFT promised at admission")
        self._tpot_pred = latency("lockstep_predicted_time_per_output_token_seconds", "TPOT promised at admission")
        self._late = latency("lockstep_token_late_seconds",
                             "How long after its promised time a token left the server (0: on time)")

        # Per tick.
        self._batch = Histogram(
            "lockstep_tick_batch_size", "Rows per tick", buckets=BATCH_BUCKETS, registry=r
        )
        phase = ["phase"]
        self._step_measured = Histogram(
            "lockstep_step_measured_seconds", "Measured step time", phase,
            buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self._step_predicted = Histogram(
            "lockstep_step_predicted_seconds", "Program's step time for the tick's bucket", phase,
            buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self._ratio = Histogram(
            "lockstep_step_measured_over_predicted_ratio", "Measured / predicted step time",
            buckets=RATIO_BUCKETS, registry=r,
        )  # fmt: skip
        self._ticks = Counter("lockstep_ticks_total", "Ticks run", phase, registry=r)
        self._overruns = Counter("lockstep_tick_overruns_total", "Ticks that ran past their slot", phase, registry=r)
        self._step_measured_last = Gauge("lockstep_step_measured_last_seconds", "Last measured step", phase, registry=r)
        self._step_predicted_last = Gauge(
            "lockstep_step_predicted_last_seconds", "Last predicted step", phase, registry=r
        )
        self._phases = {p: _PhaseSeries(self, p) for p in PHASES}  # also exports zeros before the first tick

        # State.
        self._running = Gauge("lockstep_requests_running", "Requests holding a KV slot", registry=r)
        self._waiting = Gauge("lockstep_requests_waiting", "Requests admitted, not yet scheduled", registry=r)
        self._slots_used = Gauge("lockstep_kv_slots_used", "KV slots in use", registry=r)
        self._slots_total = Gauge("lockstep_kv_slots_total", "KV slots preallocated", registry=r)
        self._time_scale = Gauge("lockstep_time_scale", "Simulated-time slowdown factor (1: real time)", registry=r)
        self._accepting = Gauge("lockstep_accepting_requests", "1 while admitting requests, else 0", registry=r)
        self._engine_up = Gauge("lockstep_engine_up", "1 while the engine loop runs; 0 once it died", registry=r)
        self._pace = Gauge("lockstep_pace_factor", "Wall seconds of a paced tick per program second of its step",
                           ["phase"], registry=r)
        self._repaces = Counter("lockstep_repaces_total", "Times a phase's pace factor followed the measured steps",
                                ["phase"], registry=r)
        self._cold = Gauge("lockstep_cold_allowance_seconds",
                           "What a promise made after an idle spell adds to its first token", registry=r)
        self._lead = Gauge("lockstep_start_lead_seconds",
                           "What every promise adds to its first token: the lead a stream's first tokens need",
                           registry=r)

        # Totals.
        self._prompt_tokens = Counter("lockstep_prompt_tokens_total", "Prompt tokens admitted", request, registry=r)
        self._generation_tokens = Counter("lockstep_generation_tokens_total", "Tokens emitted", request, registry=r)
        self._admitted = Counter("lockstep_requests_admitted_total", "Requests admitted", request, registry=r)
        self._finished = Counter(
            "lockstep_requests_finished_total", "Requests ended, by reason and gRPC status code",
            request + ["reason", "code"], registry=r,
        )  # fmt: skip
        self._requests = {p: _RequestSeries(self, p) for p in PROTOCOLS}

        self._server_info = Info("lockstep_server", "What this server runs", registry=r)
        self._info_labels: dict[str, str] = {}

        # Scrape targets behind this server, in Prometheus HTTP SD form; a router sets it.
        self.targets: Callable[[], list[dict]] = lambda: []
        self._httpd: SignalFreeUvicorn | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._port = 0

    # --- HTTP endpoint -----------------------------------------------------------------

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start serving /metrics in a daemon thread; returns the bound port (port=0: any free one)."""
        if self._httpd is not None:
            raise RuntimeError(f"metrics already served on port {self._port}")
        family, *_, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        config = uvicorn.Config(_only_metrics(make_asgi_app(self.registry), lambda: self.targets()),
                                http=bounded_protocol(MAX_CONNECTIONS, READ_TIMEOUT_S), lifespan="off",
                                log_level="warning", access_log=False, timeout_keep_alive=int(READ_TIMEOUT_S),
                                timeout_graceful_shutdown=1, backlog=64)
        httpd = SignalFreeUvicorn(config)
        failed: list[BaseException] = []

        def run():
            try:
                asyncio.run(httpd.serve(sockets=[sock]))
            except BaseException as exc:  # reported by serve() if it happens before started
                failed.append(exc)

        thread = threading.Thread(target=run, name="lockstep-metrics", daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not httpd.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if not httpd.started:
            httpd.should_exit = True
            thread.join(CLOSE_TIMEOUT_S)
            sock.close()
            raise RuntimeError(f"metrics endpoint did not start on {host}:{port}: {failed[0] if failed else 'timed out'}")
        self._httpd, self._thread, self._sock = httpd, thread, sock
        self._port = sock.getsockname()[1]
        return self._port

    def close(self) -> None:
        """Stop the endpoint and free its port; safe to call twice or without serve()."""
        if self._httpd is None:
            return
        self._httpd.should_exit = True  # uvicorn polls it every 0.1 s
        self._thread.join(CLOSE_TIMEOUT_S)  # a daemon thread: never waited on past this
        self._sock.close()
        self._httpd = self._thread = self._sock = None

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- Set once, or on change ----------------------------------------------------------

    def set_info(self, **labels: str) -> None:
        """Merge `labels` (keys from INFO_LABELS) into lockstep_server_info."""
        unknown = sorted(set(labels) - set(INFO_LABELS))
        if unknown:
            raise ValueError(f"unknown info labels {unknown}; allowed: {list(INFO_LABELS)}")
        if "mode" in labels and labels["mode"] not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {labels['mode']!r}")
        self._info_labels.update((k, str(v)) for k, v in labels.items())
        self._server_info.info(self._info_labels)

    def set_time_scale(self, x: float) -> None:
        if not x > 0:
            raise ValueError(f"time scale must be > 0, got {x!r}")
        self._time_scale.set(x)

    def set_slots_total(self, n: int) -> None:
        self._slots_total.set(n)

    def set_accepting(self, accepting: bool) -> None:
        self._accepting.set(1 if accepting else 0)

    def set_engine_up(self, up: bool) -> None:
        self._engine_up.set(1 if up else 0)

    def set_pace_state(self, state: dict) -> None:
        """The engine's pace, whole (`Pace.to_json`), kept for serve to record; its factors
        are the pace gauges' (set_pace), its cold allowance a gauge of its own."""
        self.pace_state = state
        self._cold.set(state.get("cold_s") or 0.0)
        self._lead.set(state.get("lead_s") or 0.0)

    def set_pace(self, phase: str, factor: float, repaced: bool = False) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {list(PHASES)}, got {phase!r}")
        self._pace.labels(phase).set(factor)
        self.pace[phase] = factor
        repaces = self._repaces.labels(phase)  # exported from the start, at 0
        if repaced:
            repaces.inc()

    # --- Step loop -------------------------------------------------------------------------

    def observe_tick(self, phase: str, batch: int, measured_s: float, predicted_s: float, overrun: bool) -> None:
        """One tick of `batch` rows; the ratio is skipped when predicted_s is not > 0."""
        try:
            s = self._phases[phase]
        except KeyError:
            raise ValueError(f"phase must be one of {list(PHASES)}, got {phase!r}") from None
        s.ticks.inc()
        if overrun:
            s.overruns.inc()
        s.measured.observe(measured_s)
        s.predicted.observe(predicted_s)
        s.measured_last.set(measured_s)
        s.predicted_last.set(predicted_s)
        self._batch.observe(batch)
        if predicted_s > 0:
            self._ratio.observe(measured_s / predicted_s)

    def set_queue(self, running: int, waiting: int, slots_used: int) -> None:
        self._running.set(running)
        self._waiting.set(waiting)
        self._slots_used.set(slots_used)

    def _series(self, protocol: str) -> _RequestSeries:
        try:
            return self._requests[protocol]
        except KeyError:
            raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}") from None

    def request_admitted(self, protocol: str, prompt_tokens: int) -> None:
        s = self._series(protocol)
        s.admitted.inc()
        s.prompt_tokens.inc(prompt_tokens)

    def token_emitted(self, protocol: str, gap_s: float | None, late_s: float | None = None) -> None:
        """One token left for a client; gap_s is None for a request's first token, late_s
        (seconds after its promised time; <= 0: on time) None where nothing was promised.

        lockstep_generation_tokens_total counts here, as tokens leave (so its rate is
        live during long streams), not from request_finished's completion_tokens.
        """
        s = self._series(protocol)
        s.generation_tokens.inc()
        if gap_s is not None:
            s.itl.observe(gap_s)
        if late_s is not None:
            late_s = max(0.0, late_s)
            s.late.observe(late_s)
            self.delivery_late["first" if gap_s is None else "later"].append(late_s)
            self.late_tokens += 1

    def request_finished(
        self,
        protocol: str,
        reason: str,
        code: str,
        ttft_s: float | None,
        tpot_s: float | None,
        e2e_s: float | None,
        queue_s: float | None,
        predicted_ttft_s: float | None,
        predicted_tpot_s: float | None,
        completion_tokens: int,
    ) -> None:
        """Count the request under (reason, code) and observe each latency that is not None.

        code: a gRPC status code name ("OK") or a grpc.StatusCode member; HTTP requests
        count under the gRPC code their status maps to (docs/architecture.md, "Measurements").
        TPOT needs two tokens, so tpot_s is also skipped when completion_tokens < 2.
        """
        s = self._series(protocol)
        self._finished_child(s, reason, code).inc()
        if ttft_s is not None:
            s.ttft.observe(ttft_s)
        if tpot_s is not None and completion_tokens >= 2:
            s.tpot.observe(tpot_s)
        if e2e_s is not None:
            s.e2e.observe(e2e_s)
        if queue_s is not None:
            s.queue.observe(queue_s)
        if predicted_ttft_s is not None:
            s.ttft_pred.observe(predicted_ttft_s)
        if predicted_tpot_s is not None:
            s.tpot_pred.observe(predicted_tpot_s)

    def request_rejected(self, protocol: str, code: str) -> None:
        """Refused at arrival (never admitted): counts as reason="rejected"."""
        s = self._series(protocol)
        self._finished_child(s, "rejected", code).inc()

    def _finished_child(self, s: _RequestSeries, reason: str, code) -> Counter:
        # Validated once per (protocol, reason, code): later calls are one dict lookup.
        child = s.finished.get((reason, code))
        if child is None:
            name = getattr(code, "name", code)  # grpc.StatusCode.OK -> "OK"
            if reason not in FINISH_REASONS:
                raise ValueError(f"reason must be one of {list(FINISH_REASONS)}, got {reason!r}")
            if name not in GRPC_CODES:
                raise ValueError(f"code must be a gRPC status code name such as 'OK', got {code!r}")
            child = s.finished[(reason, code)] = self._finished.labels(*s.labels, reason, name)
        return child
