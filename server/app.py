"""`LockstepServer`: program -> executor -> engine -> gRPC + metrics, in one process.

`lockstep serve` runs it inside a Ray actor (`EngineActor`) placed on the program's
devices; the gRPC server runs on that actor's event loop, so a token crosses no extra
process boundary between the engine and the client's stream. Tests may run it in-process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import contextlib
import os
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, replace

import grpc
import torch
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.lockstep.v1 import lockstep_pb2 as pb
from scheduler.program import Program, ProgramView
from server.api import PROTOCOL as GRPC, SERVICE_NAME, LocalAdmission, LockstepService
from server.auth import BearerAuth, read_secret, tls_credentials
from server.engine import Engine, EngineConfig
from server.executor import make_executor, plan_from_program
from server.pipelined import PipelinedEngine
from server.gguf import eos_ids
from server.metrics import Metrics
from server.openai_api import OpenAIFrontEnd
from server.step import full_batch
from server.tokenizer import ChatTemplate, load_tokenizer
from server.validate import Limits

SWITCH_INTERVAL_S = 0.0002
MAX_MESSAGE_BYTES = 1 << 20  # a request is a prompt: 1 MiB is ~250k tokens of text
# Of the shutdown grace period, what is kept for tearing down (engine, gRPC, executor)
# after draining, so the process exits within the grace period, not after it.
TEARDOWN_RESERVE_S = 1.0


NODE_IP = "node-ip"  # ServeConfig.host of a replica on a Ray cluster: its node's address


@dataclass(frozen=True)
class ServeConfig:
    program_json: str  # the compiled Program document
    executor: str = "local"  # local | ray
    seed: int = 0
    checkpoint: str = ""
    deterministic: bool = True
    time_scale: float = 0.0  # 0: measured at start (simulated pools; real ones only if slower than predicted)
    guard_band_s: float = EngineConfig.guard_band_s
    guard_band_frac: float = EngineConfig.guard_band_frac
    adaptive_pacing: bool = EngineConfig.adaptive_pacing
    host: str = "127.0.0.1"
    port: int = 0
    metrics_host: str = ""  # "" : the same as host
    metrics_port: int = 0
    tls_cert: str = ""  # PEM files: serve gRPC over TLS when both are set
    tls_key: str = ""
    auth_token_file: str = ""  # require `authorization: Bearer <token>` on every RPC but health
    reflection: bool = True
    max_queue: int = EngineConfig.max_queue
    max_tokens: int = 1024
    torch_threads: int = 0  # intra-op threads of the engine process (0: one per core)
    # Niceness added to the front end's event loop thread (gRPC handlers, admission, token
    # sends) in deterministic mode; 0 leaves it at the engine's priority (`_lower_front_end`).
    front_end_nice: int = 19
    http_port: int = -1  # OpenAI-compatible HTTP (server/openai_api.py) on this port; 0: any free one; -1: off
    pipeline: bool = False  # one row group per stage, their steps in flight together (server/pipelined.py)




def _shapes(program: ProgramView, keys: tuple[int, ...], phases: tuple[str, ...]):
    """(program seconds, a StepBatch of that shape with every row real) for the program's
    steps of these phases at these key buckets; rows end at the bucket's last key."""
    for key, predicted in sorted(program.steps.items()):
        if key.phase in phases and key.keys in keys:
            yield predicted, full_batch(key.phase, key.batch, key.tokens, key.keys, program.max_slots)


def measure_time_scale(executor, program: ProgramView, keys: tuple[int, ...], phases: tuple[str, ...],
                       repeats: int = 5, margin: float = 1.1, warmup: int = 8) -> float:
    """Runs the program's step shapes of these phases at these key buckets on the host and
    returns the smallest factor by which their program times must be slowed so the host
    keeps up: max over steps of measured / predicted (median of `repeats`), times
    `margin`. Each step shape first runs `warmup` times untimed: a fresh executor's first
    steps of a shape take 100x longer (measured: 250 ms, then 3 ms, for `tiny`: oneDNN
    primitives, first touches)."""
    worst = 0.0
    for predicted, step in _shapes(program, keys, phases):
        for _ in range(warmup):
            executor.step(step)
        measured = statistics.median(executor.step(step).step_time_s for _ in range(repeats))
        worst = max(worst, measured / predicted)
    return worst * margin


def warm_up(executor, program: ProgramView, keys: tuple[int, ...], phases: tuple[str, ...], runs: int = 2) -> None:
    """Runs each of the program's step shapes of these phases at these key buckets `runs` times, untimed."""
    for _, step in _shapes(program, keys, phases):
        for _ in range(runs):
            executor.step(step)


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
    the ticks' slack (the guard that opens each tick and the wait after the step); it
    is never starved for long, because in deterministic mode the engine sleeps every tick."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return 0
    try:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(before + nice, 19))
        return os.getpriority(os.PRIO_PROCESS, tid) - before
    except OSError:
        return 0


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: `lockstep serve` owns SIGTERM / SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class LockstepServer:
    def __init__(self, config: ServeConfig, router=None, router_bundle: dict | None = None):
        """router: a server/router.RoutedAdmission: serve its replicas instead of an engine here."""
        self.config = config
        self.router, self.router_bundle = router, router_bundle
        self.program = ProgramView.parse(Program.from_json(config.program_json).data)
        self.metrics = Metrics(self.program.model.name)
        self.server = None
        self.engine = None
        self.executor = None
        self.http = self.http_task = None
        self.health = health.aio.HealthServicer()
        self.failed: asyncio.Event | None = None  # set when the engine loop dies
        self.front_end_nice = 0  # niceness added to the front end's threads (see _lower_front_end)
        self.device_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lockstep-engine")

    async def start(self) -> dict:
        """Builds and starts everything; returns the bound addresses and settings."""
        cfg, program = self.config, self.program
        if self.router is None:
            admission, scale = await self._start_engine()
        else:  # the engines are replicas elsewhere; this process is their front end
            first = await self.router.start(self.router_bundle)
            admission, scale = self.router, first["time_scale"]
            from server.router import ReplicaCollector

            self.metrics.registry.register(ReplicaCollector(self.router))
            self.metrics.targets = self.router.scrape_targets
            self.failed = asyncio.Event()  # replicas that die are restarted; the front end stays up
        vocab = program.model.vocab_size
        tokenizer = load_tokenizer(cfg.checkpoint or None, vocab)
        limits = Limits(cfg.max_tokens, program.max_context - 1, vocab, program.max_context,
                        eos_ids(cfg.checkpoint or None))
        info = self._model_info(scale, limits)
        self.server, port = self._grpc_server(LockstepService(admission, info, tokenizer, limits, self.metrics))
        http = ""
        if cfg.http_port >= 0:
            http = await self._http_server(OpenAIFrontEnd(
                admission, info.model, limits, tokenizer, self.metrics, ChatTemplate.of(cfg.checkpoint or None),
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
        metrics_host = cfg.metrics_host or cfg.host
        metrics_port = self.metrics.serve(metrics_host, cfg.metrics_port)
        # Everything built so far (torch modules, protobuf descriptors, grpc) lives as long as
        # the server: out of the collector's sight, a full collection no longer walks it.
        # Measured with `small` loaded: ~180k objects, a full collection 37-48 ms with the
        # GIL held, which stalls the step in flight past its tick; after freeze() ~0 ms.
        gc.collect()
        gc.freeze()
        if self.engine is not None:
            if cfg.deterministic:
                self.front_end_nice = _lower_front_end(cfg.front_end_nice)
            self.engine.start(self.device_thread)
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return {"grpc": f"{cfg.host}:{port}", "http": http, "metrics": f"http://{metrics_host}:{metrics_port}/metrics",
                "model": info.model, "plan_hash": info.plan_hash, "time_scale": scale, "executor": cfg.executor,
                "mode": mode, "pid": os.getpid(),
                "tls": bool(cfg.tls_cert), "auth": bool(cfg.auth_token_file),
                "replicas": [r.target for r in self.router.replicas] if self.router else []}

    async def _start_engine(self) -> tuple[LocalAdmission, float]:
        """The engine in this process, built, measured and warmed up (not yet started)."""
        cfg, program = self.config, self.program
        # The engine thread dispatches ~1,000 torch ops a step and needs the GIL back at
        # once after each; the default 5 ms switch interval lets the gRPC thread hold it
        # that long while the step waits (ticks then overrun).
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        plan = plan_from_program(program, seed=cfg.seed, checkpoint=cfg.checkpoint)
        # Every torch op runs on this one thread: building, warm-up, then the engine loop.
        # Measured: a step run from a second thread that uses torch is ~30% slower
        # (28.8 -> 37.9 ms for `small`), as each thread gets its own OpenMP team and the
        # two teams fight over 2 cores; with one torch thread it costs nothing.
        loop = asyncio.get_running_loop()
        # Ray sets OMP_NUM_THREADS to an actor's num_cpus (1 here): a local executor owns
        # the host's cores, so it takes them back (prefill of `small` ran 2x slower).
        threads = cfg.torch_threads or os.cpu_count() or 1
        await loop.run_in_executor(self.device_thread, torch.set_num_threads, threads)
        groups = len(program.stages) if cfg.pipeline else 1
        options = {"in_flight": max(groups, 10)} if cfg.executor == "ray" else {}
        self.executor = await loop.run_in_executor(self.device_thread,
                                                   lambda: make_executor(plan, cfg.executor, **options))
        keys = program.key_buckets
        if program.simulated and not cfg.time_scale:
            # The chip's times against the host's, at the shortest and the longest contexts.
            scale = await loop.run_in_executor(self.device_thread, measure_time_scale, self.executor, program,
                                               (keys[0], keys[-1]), ("decode", "mixed", "prefill"))
        else:
            # Real devices run at their own speed: 1, unless the host, serving, runs slower
            # than its calibration said (measured: ~25% inside a Ray actor on a 2-core host
            # whose cores Ray's own processes share); then ticks stretch to what it keeps
            # up with, and the factor is reported, rather than every tick overrunning.
            # Decode and mixed steps (the cadence) at the shortest context, where most ticks run.
            measured = await loop.run_in_executor(self.device_thread, measure_time_scale, self.executor, program,
                                                  keys[:1], ("decode", "mixed"), 5, 1.0)
            scale = cfg.time_scale or max(1.0, measured)
            # Prefill shapes are not timed (their predictions err differently, and the
            # prefill pacer follows them) but run once each: a shape's first step builds
            # its oneDNN primitives (the demo's first prefill tick overran).
            await loop.run_in_executor(self.device_thread, warm_up, self.executor, program, keys[:1], ("prefill",))
        config = EngineConfig(deterministic=cfg.deterministic, time_scale=scale, guard_band_s=cfg.guard_band_s,
                              max_queue=cfg.max_queue, guard_band_frac=cfg.guard_band_frac,
                              adaptive_pacing=cfg.adaptive_pacing)
        if cfg.pipeline:
            self.engine = PipelinedEngine(self.executor, program, config, self.metrics, groups=groups)
        else:
            self.engine = Engine(self.executor, program, config, self.metrics)
        self.failed = asyncio.Event()
        self.engine.on_death = lambda exc: loop.call_soon_threadsafe(self._engine_died, exc)
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
        self.http = _Uvicorn(uvicorn.Config(front.app, log_level="warning", access_log=False, lifespan="off",
                                            timeout_graceful_shutdown=1, **tls))
        self.http_task = asyncio.ensure_future(self.http.serve(sockets=[sock]))
        while not self.http.started:
            if self.http_task.done():
                self.http_task.result()  # raises what stopped it
            await asyncio.sleep(0.01)
        return f"{cfg.host}:{sock.getsockname()[1]}"

    def _grpc_server(self, service: LockstepService) -> tuple[grpc.aio.Server, int]:
        """The gRPC server with its services, TLS and auth as configured; bound, not started."""
        cfg = self.config
        interceptors = []
        if cfg.auth_token_file:
            token = read_secret(cfg.auth_token_file, "--auth-token-file")
            interceptors.append(BearerAuth(token, lambda: self.metrics.request_rejected(GRPC, "UNAUTHENTICATED")))
        server = grpc.aio.server(interceptors=interceptors,
                                 options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                          ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        service.add_to_server(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if cfg.reflection:
            reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert or cfg.tls_key:
            port = server.add_secure_port(address, tls_credentials(cfg.tls_cert, cfg.tls_key))
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        return server, port

    def _engine_died(self, exc: BaseException) -> None:
        """On the event loop: a dead engine must not look alive. Health turns NOT_SERVING,
        lockstep_engine_up 0, and `failed` tells `lockstep serve` to exit non-zero."""
        self.metrics.set_engine_up(False)
        self.metrics.set_accepting(False)
        for name in ("", SERVICE_NAME):
            asyncio.ensure_future(self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING))
        self.failed.set()

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
            self.metrics.set_accepting(False)
            await self.health.enter_graceful_shutdown()
            while not self.engine.idle() and time.monotonic() < drain_until:
                await asyncio.sleep(0.01)
            # Ends what is left with "shutdown" (after the tick in flight) before the
            # transport closes, so those clients get UNAVAILABLE with a reason.
            await asyncio.to_thread(self.engine.stop, max(0.1, deadline - time.monotonic()))
        if self.router is not None:
            self.metrics.set_accepting(False)
            await self.health.enter_graceful_shutdown()
            await self.router.stop(max(0.1, drain_until - time.monotonic()))
        if self.http is not None:
            self.http.should_exit = True
            await asyncio.wait([self.http_task], timeout=max(0.1, deadline - time.monotonic()))
        if self.server is not None:
            await self.server.stop(grace=max(0.05, min(0.5, deadline - time.monotonic())))
        if self.executor is not None:
            self.executor.close()
        self.device_thread.shutdown(wait=False)
        self.metrics.close()


class EngineActor:
    """The Ray actor `lockstep serve` runs the server in (wrapped with ray.remote there)."""

    def __init__(self):
        self.server: LockstepServer | None = None

    async def start(self, config: ServeConfig) -> dict:
        if config.host == NODE_IP:  # a replica on a cluster: reachable from the router's node
            import ray

            config = replace(config, host=ray.util.get_node_ip_address())
        self.server = LockstepServer(config)
        return await self.server.start()

    async def stop(self, grace_s: float) -> None:
        if self.server is not None:
            await self.server.stop(grace_s)

    async def status(self) -> dict:
        return self.server.engine.status() if self.server and self.server.engine else {}

    async def wait_failed(self) -> str:
        """Returns (with the reason) once the engine loop has died; the driver exits non-zero."""
        await self.server.failed.wait()
        return repr(self.server.engine.failure)[:300]
