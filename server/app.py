"""`LockstepServer`: program -> executor -> engine -> gRPC + metrics, in one process.

`lockstep serve` runs it inside a Ray actor (`EngineActor`) placed on the program's
devices; the gRPC server runs on that actor's event loop, so a token crosses no extra
process boundary between the engine and the client's stream. Tests may run it in-process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import socket
import sys
import threading
import time
from dataclasses import replace

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from protos.lockstep.v1 import lockstep_pb2 as pb
from scheduler.program import Program, ProgramView
from server.frontend.api import PROTOCOL as GRPC, SERVICE_NAME, LocalAdmission, LockstepService, health_handler
from server.frontend.auth import BearerAuth, read_secret, tls_credentials
from server.core.affinity import available, pin_process
from server.core.build import build_engine
from server.config import NODE_IP, ServeConfig
from server.core.client import CoreClient
from server.runtime.gguf import eos_ids
from server.runtime.signals import exit_on_signal
from server.frontend.httpd import LingeringProtocol, SignalFreeUvicorn
from server.frontend.kserve import PROTOCOL as KSERVE, SERVICE_NAME as KSERVE_SERVICE, KServeService
from server.frontend.metrics import Metrics
from server.frontend.openai_api import OpenAIFrontEnd
from server.frontend.tokenizer import ChatTemplate, load_tokenizer
from server.frontend.validate import Limits

MAX_MESSAGE_BYTES = 1 << 20  # a request is a prompt: 1 MiB is ~250k tokens of text
# Of the shutdown grace period, what is kept for tearing down (engine, gRPC, executor)
# after draining, so the process exits within the grace period, not after it.
TEARDOWN_RESERVE_S = 1.0


def _lower_front_end(nice: int) -> int:
    """Lowers the calling thread by `nice`: the event loop, where the gRPC handlers,
    admission and the token sends run in Python; threads it starts later inherit it. The
    engine thread and its torch threads keep their priority (Linux sets niceness per
    thread), as do grpc core's own threads and the metrics server's, started earlier,
    which hold no GIL while they wait. Returns the niceness added (0 where the OS cannot
    set it per thread).

    Why (docs/architecture.md, "What contention costs a step"): on 2 cores a busy Python
    thread in the engine's process stretched a 36.6 ms step to 600 ms (p50; GIL and cores);
    the same thread at nice 19 left it at 36.6 ms (p95 49 ms). The front end then runs in
    the engine's slack; it is never starved for long, because in deterministic mode the
    engine runs ahead of its promises and then waits (a step that would overlap a held
    token's promised time starts after it, plus the guard: Engine._quiet_until)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return 0
    try:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(before + nice, 19))
        return os.getpriority(os.PRIO_PROCESS, tid) - before
    except OSError:
        return 0


class LockstepServer:
    def __init__(self, config: ServeConfig, router=None, router_bundle: dict | None = None):
        """router: a server/frontend/router.RoutedAdmission: serve its replicas instead of an engine here."""
        self.config = config
        self.router, self.router_bundle = router, router_bundle
        self.program = ProgramView.parse(Program.from_json(config.program_json).data)
        self.metrics = Metrics(self.program.model.name)
        self.server = None
        self.service = None  # the gRPC service (LockstepService), once started
        self.kserve = None  # the KServe v2 / Triton door on the same gRPC server (KServeService)
        self.engine = None  # an engine on a thread of this process (engine_process=False)
        self.core = None  # the client of the engine core process (server/core/client.py)
        self.executor = None
        self.admission = None  # what the front doors admit through: LocalAdmission, CoreClient or a router's
        self.on_shutdown_request = None  # called (no arguments) when a signal to the engine core asks the server to stop
        self.signalled = ""  # what the core said when a signal asked it to stop
        self.http = self.http_task = None
        self.health = health.aio.HealthServicer()
        self.failed: asyncio.Event | None = None  # set when the engine loop dies
        self.compiled = False  # every stage of the engine (or the first replica's) runs compiled steps
        self.front_end_nice = 0  # niceness added to the front end's threads (see _lower_front_end)
        self.device_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lockstep-engine")

    async def start(self) -> dict:
        """Builds and starts everything; returns the bound addresses and settings."""
        cfg, program = self.config, self.program
        vocab = program.model.vocab_size

        def load_texts():
            return load_tokenizer(cfg.checkpoint or None, vocab), ChatTemplate.of(cfg.checkpoint or None)

        # The front end's own loading (the tokenizer; the chat template, which imports
        # transformers: ~5 s of a 21 s start here) runs on a thread while the engine core
        # starts in its process (or the replicas in theirs), not after; an engine on a thread
        # of this process builds and measures its steps alone.
        texts = None
        if cfg.engine_process or self.router is not None:
            texts = asyncio.get_running_loop().run_in_executor(None, load_texts)
            texts.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved if the engine fails first
        if self.router is None:
            self.admission, scale = await self._start_engine()
        else:  # the engines are replicas elsewhere; this process is their front end
            first = await self.router.start(self.router_bundle)
            self.admission, scale = self.router, first["time_scale"]
            self.compiled = first.get("compiled", False)
            self.router.export(self.metrics)
            self.failed = asyncio.Event()  # replicas that die are restarted; the front end stays up
        tokenizer, template = await texts if texts is not None else load_texts()
        limits = Limits(cfg.max_tokens, program.max_context - 1, vocab, program.max_context,
                        eos_ids(cfg.checkpoint or None))
        info = self._model_info(scale, limits)
        self.service = LockstepService(self.admission, info, tokenizer, limits, self.metrics)
        self.kserve = KServeService(self.admission, info, tokenizer, limits, self.metrics)
        self.server, port = self._grpc_server(self.service, self.kserve)
        http = ""
        if cfg.http_port >= 0:
            http = await self._http_server(OpenAIFrontEnd(
                self.admission, info.model, limits, tokenizer, self.metrics, template,
                read_secret(cfg.auth_token_file, "--auth-token-file") if cfg.auth_token_file else b""))
        mode = ("deterministic" if cfg.deterministic else "throughput") + ("+pipelined" if cfg.pipeline else "")
        self.metrics.set_info(model=info.model, pool=info.pool, plan_hash=info.plan_hash, dtype=info.dtype,
                              executor=cfg.executor, mode=mode)
        self.metrics.set_time_scale(scale)
        self.metrics.set_slots_total(program.max_slots * (self.router.n if self.router else 1))
        self.metrics.set_accepting(True)
        self.metrics.set_engine_up(True)
        if self.engine is not None:
            for phase, pacer in self.engine.pacers.items():
                self.metrics.set_pace(phase, pacer.factor)
        if self.core is not None:
            for phase, factor in self.core.pace.items():
                self.metrics.set_pace(phase, factor)
        metrics_host = cfg.metrics_host or cfg.host
        metrics_port = self.metrics.serve(metrics_host, cfg.metrics_port)
        # Everything built so far (torch modules, protobuf descriptors, grpc) lives as long as
        # the server: out of the collector's sight, a full collection no longer walks it.
        # Measured with `small` loaded: ~180k objects, a full collection 37-48 ms with the
        # GIL held, which stalls the step in flight past its tick; after freeze() ~0 ms.
        gc.collect()
        gc.freeze()
        if cfg.deterministic and (self.engine is not None or self.core is not None):
            # Default 0 (config.py): beside a core process, nice 19 kept the front end from
            # delivering a tick's tokens while the next step held both cores (measured with
            # bench/peer_vllm.py at concurrency 8: ITL p99/p50 1.70, tokens up to 129 ms
            # past their promise; BENCHMARKS.md).
            self.front_end_nice = _lower_front_end(cfg.front_end_nice)
        if self.engine is not None:
            self.engine.start(self.device_thread)
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return {"grpc": f"{cfg.host}:{port}", "http": http, "metrics": f"http://{metrics_host}:{metrics_port}/metrics",
                "model": info.model, "dtype": info.dtype, "compiled": self.compiled, "plan_hash": info.plan_hash,
                "time_scale": scale, "executor": cfg.executor,
                "pace": (pace := self._start_pace()),
                # The decode pacer starts at the time scale x (1 + the band).
                "guard_band_frac": pace["decode"] / scale - 1 if pace.get("decode") and scale else None,
                "mode": mode, "pid": os.getpid(), "core_pid": self.core.pid if self.core else 0,
                "tls": bool(cfg.tls_cert), "auth": bool(cfg.auth_token_file),
                "replicas": [r.target for r in self.router.replicas] if self.router else []}

    def _start_pace(self) -> dict[str, float]:
        """Each phase's pace factor at start (prefill has its own measured scale)."""
        if self.engine is not None:
            return {phase: pacer.factor for phase, pacer in self.engine.pacers.items()}
        return dict(self.core.pace) if self.core is not None else {}

    async def _start_engine(self) -> tuple[object, float]:
        """The engine core: in a process of its own (the default), or on a thread of this
        one (`engine_process=False`: tests that reach into the engine); built, measured and
        warmed up, not yet ticking. Returns the front ends' admission and the time scale."""
        cfg, loop = self.config, asyncio.get_running_loop()
        self.failed = asyncio.Event()
        if cfg.engine_process:
            self.core = CoreClient(cfg, self.metrics)
            await self.core.start()
            if cfg.core_cpus:  # this process (gRPC, HTTP, tokenization) off the core's CPUs
                pin_process(available() - set(cfg.core_cpus))
            self.core.on_death = self._engine_died
            self.core.on_shutdown = self._core_asked_shutdown
            self.compiled = self.core.compiled
            return self.core, self.core.time_scale
        self.engine, self.executor, scale = await loop.run_in_executor(self.device_thread, build_engine, cfg,
                                                                       self.program, self.metrics)
        self.engine.on_death = lambda exc: loop.call_soon_threadsafe(self._engine_died, exc)
        self.compiled = self.executor.compiled()
        return LocalAdmission(self.engine), scale

    async def _http_server(self, front: OpenAIFrontEnd) -> str:
        """Starts uvicorn on this event loop, on a socket bound here (so port 0 works and a
        taken port fails now, with the gRPC one); returns host:port."""
        cfg = self.config
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.host, cfg.http_port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on {cfg.host}:{cfg.http_port} for HTTP: {exc.strerror}") from None
        tls = {"ssl_certfile": cfg.tls_cert, "ssl_keyfile": cfg.tls_key} if cfg.tls_cert else {}
        self.http = SignalFreeUvicorn(uvicorn.Config(front.app, http=LingeringProtocol, log_level="warning",
                                                    access_log=False, lifespan="off",
                                            timeout_graceful_shutdown=1, **tls))
        self.http_task = asyncio.ensure_future(self.http.serve(sockets=[sock]))
        while not self.http.started:
            if self.http_task.done():
                self.http_task.result()  # raises what stopped it
            await asyncio.sleep(0.01)
        return f"{cfg.host}:{sock.getsockname()[1]}"

    def _grpc_server(self, service: LockstepService, kserve: KServeService) -> tuple[grpc.aio.Server, int]:
        """The gRPC server with its services (Lockstep's own and KServe v2's), TLS and auth as
        configured; bound, not started."""
        cfg = self.config
        interceptors = []
        if cfg.auth_token_file:
            token = read_secret(cfg.auth_token_file, "--auth-token-file")
            prefix = f"/{KSERVE_SERVICE}/"
            interceptors.append(BearerAuth(token, lambda method: self.metrics.request_rejected(
                KSERVE if method.startswith(prefix) else GRPC, "UNAUTHENTICATED")))
        server = grpc.aio.server(interceptors=interceptors,
                                 options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                          ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        service.add_to_server(server)
        kserve.add_to_server(server)
        server.add_generic_rpc_handlers((health_handler(self.health),))
        if cfg.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, KSERVE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert or cfg.tls_key:
            port = server.add_secure_port(address, tls_credentials(cfg.tls_cert, cfg.tls_key))
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        return server, port

    def _calls(self) -> int:
        """Streams and calls still running on the gRPC server's doors."""
        return sum(door.streams for door in (self.service, self.kserve) if door is not None)

    def _engine_died(self, exc: BaseException) -> None:
        """On the event loop: a dead engine must not look alive. Health turns NOT_SERVING,
        lockstep_engine_up 0, and `failed` tells `lockstep serve` to exit non-zero."""
        self.metrics.set_engine_up(False)
        self.metrics.set_accepting(False)
        for name in ("", SERVICE_NAME):
            asyncio.ensure_future(self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING))
        self.failed.set()

    def _core_asked_shutdown(self, why: str) -> None:
        print(f"lockstep serve: {why}; shutting down", file=sys.stderr, flush=True)
        self.signalled = why
        if self.on_shutdown_request is not None:
            self.on_shutdown_request()

    def failed_by_signal(self) -> None:
        """A replica's answer to a signal to its core: it ends as an engine death does."""
        self.failed.set()

    @property
    def failure(self) -> str:
        """Why the engine died ("" while it runs)."""
        if self.core is not None:
            return self.core.failure or self.signalled
        return repr(self.engine.failure) if self.engine is not None and self.engine.failure is not None else ""

    def _model_info(self, scale: float, limits: Limits) -> pb.ModelInfo:
        p, cfg = self.program, self.config
        preds = [pb.Prediction(batch=x["batch"], prompt_len=x["prompt_len"], ttft_s=x["ttft_s"] * scale,
                               tpot_s=x["tpot_s"] * scale, tokens_per_s=x["tokens_per_s"] / scale)
                 for x in p.predictions]
        return pb.ModelInfo(model=p.model.name, plan_hash=p.plan_hash, pool=p.pool, buckets=p.buckets,
                            max_slots=p.max_slots, max_context=p.max_context, prefill_chunk=p.prefill_chunk,
                            dtype=p.weight_dtype, time_scale=scale, deterministic=cfg.deterministic,
                            guard_band_s=cfg.guard_band_s, predictions=preds, vocab_size=limits.vocab_size,
                            executor=cfg.executor, max_prompt_tokens=limits.max_prompt_tokens,
                            max_tokens_limit=limits.max_tokens, max_queue=cfg.max_queue,
                            max_message_bytes=MAX_MESSAGE_BYTES)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stops admission, lets in-flight streams finish, and returns within `grace_s`
        (plus one tick at most): streams still running when the drain time is up end with
        UNAVAILABLE ("server is shutting down"), counted as cancelled."""
        deadline = time.monotonic() + grace_s
        drain_until = deadline - min(TEARDOWN_RESERVE_S, grace_s / 2)
        if self.engine is not None:
            self.engine.accepting = False
        if self.admission is not None:
            self.metrics.set_accepting(False)
            await self.health.enter_graceful_shutdown()
        if self.engine is not None:
            while not self.engine.idle() and time.monotonic() < drain_until:
                await asyncio.sleep(0.01)
            # Ends what is left with "shutdown" (after the tick in flight) before the
            # transport closes, so those clients get UNAVAILABLE with a reason.
            await asyncio.to_thread(self.engine.stop, max(0.1, deadline - time.monotonic()))
        if self.core is not None:
            await self.core.stop(max(0.1, deadline - time.monotonic() - 0.3))
        if self.router is not None:
            await self.router.stop(max(0.1, drain_until - time.monotonic()))
        if self.http is not None:
            self.http.should_exit = True
            await asyncio.wait([self.http_task], timeout=max(0.1, deadline - time.monotonic()))
        if self.server is not None:
            # The streams just ended still write their last status ("server is shutting
            # down", after any tokens the cut let go): grpc's stop would cancel them
            # ("Cancelling all calls") once its grace is up, and on a loaded host that grace
            # was spent before a stream's handler ran (test_serve's SIGTERM tests, in CI).
            while self._calls() and time.monotonic() < deadline - 0.05:
                await asyncio.sleep(0.005)
            await self.server.stop(grace=max(0.05, min(0.5, deadline - time.monotonic())))
        if self.executor is not None:
            self.executor.close()
        self.device_thread.shutdown(wait=False)
        self.metrics.close()


class EngineActor:
    """A replica: a whole server in a Ray actor (`lockstep serve --replicas N`, wrapped with
    ray.remote in server/frontend/router.py), its engine core a child process of the actor."""

    def __init__(self):
        exit_on_signal("replica")  # a SIGTERM ends it: the router sees a dead replica (Ray's handler never runs)
        self.server: LockstepServer | None = None

    async def start(self, config: ServeConfig) -> dict:
        if config.host == NODE_IP:  # a replica on a cluster: reachable from the router's node
            import ray

            config = replace(config, host=ray.util.get_node_ip_address())
        self.server = LockstepServer(config)
        # A signal to this replica's engine core ends the replica as an engine death does:
        # the router takes it out of routing and Ray restarts it.
        self.server.on_shutdown_request = self.server.failed_by_signal
        return await self.server.start()

    async def stop(self, grace_s: float) -> None:
        if self.server is not None:
            await self.server.stop(grace_s)

    async def status(self) -> dict:
        return self.server.admission.status() if self.server and self.server.admission else {}

    async def wait_failed(self) -> str:
        """Returns (with the reason) once the engine loop has died; the driver exits non-zero."""
        await self.server.failed.wait()
        return self.server.failure[:300]
