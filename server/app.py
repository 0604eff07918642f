"""`LockstepServer`: program -> executor -> engine -> gRPC + metrics, in one process.

`lockstep serve` runs it inside a Ray actor (`EngineActor`) placed on the program's
devices; the gRPC server runs on that actor's event loop, so a token crosses no extra
process boundary between the engine and the client's stream. Tests may run it in-process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import statistics
import sys
import time
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.lockstep.v1 import lockstep_pb2 as pb
from scheduler.program import Program
from protos.lockstep.v1 import lockstep_pb2_grpc as pb_grpc
from server.api import Limits, LockstepService
from server.engine import Engine, EngineConfig
from server.executor import GPU_DEVICES, make_executor, plan_from_program
from server.metrics import Metrics
from server.sampling import GREEDY
from server.step import StepBatch
from server.tokenizer import load_tokenizer

SWITCH_INTERVAL_S = 0.0002
MAX_MESSAGE_BYTES = 1 << 20  # a request is a prompt: 1 MiB is ~250k tokens of text
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Lockstep"].full_name


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
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0
    max_queue: int = EngineConfig.max_queue
    max_tokens: int = 1024
    torch_threads: int = 0  # intra-op threads of the engine process (0: one per core)


def is_simulated(program: dict) -> bool:
    return any(s["device"] not in GPU_DEVICES and s["device"] != "cpu" for s in program["stages"])


def measure_time_scale(executor, engine_step_s: dict, max_context: int, chunk: int, repeats: int = 5,
                       margin: float = 1.1, warmup: int = 8) -> float:
    """Runs every given step on the host and returns the smallest factor by which the
    program's step times must be slowed so the host keeps up: max over steps of
    measured / predicted (median of `repeats`), times `margin`. Each step shape first runs
    `warmup` times untimed: a fresh executor's first steps of a shape take 100x longer
    (measured: 250 ms, then 3 ms, for `tiny`: oneDNN primitives, first touches)."""
    worst = 0.0
    for (phase, batch), predicted_s in sorted(engine_step_s.items()):
        n = chunk if phase == "prefill" else 1
        rows = range(batch)
        step = StepBatch(phase, batch, n, tuple(rows), tuple((0,) * n for _ in rows),
                         tuple(max_context - n for _ in rows), tuple(GREEDY for _ in rows))
        for _ in range(warmup):
            executor.step(step)
        measured = statistics.median(executor.step(step).step_time_s for _ in range(repeats))
        worst = max(worst, measured / predicted_s)
    return worst * margin


class LockstepServer:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.program = Program.from_json(config.program_json).data
        self.metrics = Metrics()
        self.server = None
        self.engine = None
        self.executor = None
        self.health = health.aio.HealthServicer()
        self.device_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lockstep-engine")

    async def start(self) -> dict:
        """Builds and starts everything; returns the bound addresses and settings."""
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
        self.executor = await loop.run_in_executor(self.device_thread, make_executor, plan, cfg.executor)
        step_s = {(s["phase"], s["batch"]): s["step_s"] for s in program["schedules"]}
        opts = program["options"]
        if is_simulated(program) and not cfg.time_scale:
            scale = await loop.run_in_executor(self.device_thread, measure_time_scale, self.executor, step_s,
                                               opts["max_context"], program["prefill_chunk"])
        else:
            # Real devices run at their own speed: 1, unless the host, serving, runs slower
            # than its calibration said (measured: ~25% inside a Ray actor on a 2-core host
            # whose cores Ray's own processes share); then ticks stretch to what it keeps
            # up with, and the factor is reported, rather than every tick overrunning.
            decode_only = {key: s for key, s in step_s.items() if key[0] == "decode"}
            measured = await loop.run_in_executor(self.device_thread, measure_time_scale, self.executor,
                                                  decode_only, opts["max_context"], 1, 5, 1.0)
            scale = cfg.time_scale or max(1.0, measured)
        config = EngineConfig(deterministic=cfg.deterministic, time_scale=scale, guard_band_s=cfg.guard_band_s,
                              max_queue=cfg.max_queue, guard_band_frac=cfg.guard_band_frac)
        self.engine = Engine(self.executor, program, config, self.metrics)
        spec = program["model"]["spec"]
        tokenizer = load_tokenizer(cfg.checkpoint or None, spec["vocab_size"])
        limits = Limits(cfg.max_tokens, opts["max_context"] - 1, spec["vocab_size"], opts["max_context"])
        info = self._model_info(scale, limits)
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        pb_grpc.add_LockstepServicer_to_server(LockstepService(self.engine, info, tokenizer, limits, self.metrics),
                                               self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.server)
        port = self.server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if port == 0:
            raise OSError(f"cannot listen on {cfg.host}:{cfg.port}")
        self.metrics.set_info(model=info.model, pool=info.pool, plan_hash=info.plan_hash, dtype=info.dtype,
                              executor=cfg.executor, mode="deterministic" if cfg.deterministic else "throughput")
        self.metrics.set_time_scale(scale)
        self.metrics.set_slots_total(opts["max_slots"])
        self.metrics.set_accepting(True)
        metrics_port = self.metrics.serve(cfg.host, cfg.metrics_port)
        self.engine.start(self.device_thread)
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return {"grpc": f"{cfg.host}:{port}", "metrics": f"http://{cfg.host}:{metrics_port}/metrics",
                "model": info.model, "plan_hash": info.plan_hash, "time_scale": scale, "executor": cfg.executor,
                "mode": "deterministic" if cfg.deterministic else "throughput"}

    def _model_info(self, scale: float, limits: Limits) -> pb.ModelInfo:
        p, cfg = self.program, self.config
        preds = [pb.Prediction(batch=x["batch"], prompt_len=x["prompt_len"], ttft_s=x["ttft_s"] * scale,
                               tpot_s=x["tpot_s"] * scale, tokens_per_s=x["tokens_per_s"] / scale)
                 for x in p["predictions"]]
        return pb.ModelInfo(model=p["model"]["name"], plan_hash=p["plan_hash"], pool=p["pool"]["description"],
                            buckets=p["buckets"], max_slots=p["options"]["max_slots"],
                            max_context=p["options"]["max_context"], prefill_chunk=p["prefill_chunk"],
                            dtype=p["model"]["weight_dtype"], time_scale=scale, deterministic=cfg.deterministic,
                            guard_band_s=cfg.guard_band_s, predictions=preds, vocab_size=limits.vocab_size,
                            executor=cfg.executor, max_prompt_tokens=limits.max_prompt_tokens,
                            max_tokens_limit=limits.max_tokens)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stops admission, lets in-flight streams finish within `grace_s`, then exits."""
        if self.engine is not None:
            self.engine.accepting = False
            self.metrics.set_accepting(False)
            await self.health.enter_graceful_shutdown()
            deadline = time.monotonic() + grace_s
            while not self.engine.idle() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        if self.server is not None:
            await self.server.stop(grace=max(0.0, min(grace_s, 1.0)))
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)
        if self.executor is not None:
            self.executor.close()
        self.device_thread.shutdown(wait=False)
        self.metrics.close()


class EngineActor:
    """The Ray actor `lockstep serve` runs the server in (wrapped with ray.remote there)."""

    def __init__(self):
        self.server: LockstepServer | None = None

    async def start(self, config: ServeConfig) -> dict:
        self.server = LockstepServer(config)
        return await self.server.start()

    async def stop(self, grace_s: float) -> None:
        if self.server is not None:
            await self.server.stop(grace_s)

    async def status(self) -> dict:
        return self.server.engine.status() if self.server and self.server.engine else {}
