"""`ServeConfig`: everything `lockstep serve` decided, as one frozen value that both the
front end and the engine core process read (it crosses the process boundary as a dict)."""

from __future__ import annotations

from dataclasses import dataclass

from server.core.affinity import CORE_NICE
from server.core.engine import EngineConfig

NODE_IP = "node-ip"  # ServeConfig.host of a replica on a Ray cluster: its node's address


@dataclass(frozen=True)
class ServeConfig:
    program_json: str  # the compiled Program document
    executor: str = "local"  # local | ray
    seed: int = 0
    checkpoint: str = ""
    compiled: bool = False  # CPU stages as compiled steps (server/runtime/compiled.py)
    deterministic: bool = True
    time_scale: float = 0.0  # 0: measured at start (simulated pools; real ones only if slower than predicted)
    guard_band_s: float = EngineConfig.guard_band_s
    guard_band_frac: float | None = None  # None: from the step jitter measured at start (server/core/build.py)
    # The margin over the served steps' quantile once a phase paces from its own ticks (None:
    # server/core/build.MIN_GUARD when the band is measured at start, else the band given).
    pace_margin: float | None = None
    adaptive_pacing: bool = EngineConfig.adaptive_pacing
    alone_own_step: bool = EngineConfig.alone_own_step
    join_share: float = EngineConfig.join_share
    start_lead_quantile: float = EngineConfig.start_lead_quantile
    admission_window_s: float = EngineConfig.admission_window_s
    window_grace_s: float = EngineConfig.window_grace_s
    pace_quantile: float = EngineConfig.pace_quantile
    prefill_quantile: float = EngineConfig.prefill_quantile
    prefill_tail_once: bool = EngineConfig.prefill_tail_once
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
    torch_threads: int = 0  # intra-op threads of the engine process (0: one per core it may run on)
    # CPUs the engine core process runs on (its torch threads: one each); the front end's
    # process runs on the others. Empty: both anywhere (see server/core/affinity.py).
    core_cpus: tuple[int, ...] = ()
    # The longest the core's engine thread waits, before the step after a first token, for the
    # output thread to send it (server/core/process.py, Outbox.flush); 0: no wait.
    send_wait_s: float = 0.005
    # Niceness added to the front end's event loop thread (gRPC handlers, admission, token
    # sends) in deterministic mode; 0 leaves it at the engine's priority (`_lower_front_end`).
    front_end_nice: int = 0  # 19 measured best with the engine in this process; 0 beside a core process (BENCHMARKS.md)
    # Niceness of the engine core process, every thread of it (server/core/affinity.py,
    # `lower_process`), so that a token's send and its client take a core from a step at
    # once; 0: the front end's priority. docs/architecture.md, "A step beside a delivery".
    core_nice: int = CORE_NICE
    http_port: int = -1  # OpenAI-compatible HTTP (server/frontend/openai_api.py) on this port; 0: any free one; -1: off
    pipeline: bool = False  # one row group per stage, their steps in flight together (server/core/pipelined.py)
    # The engine core (tick loop, scheduler, pacer, executor) in a process of its own
    # (server/core/process.py); False: on a thread of the front end's process (tests).
    engine_process: bool = True
    # `serve --tick-log`: the engine core appends one JSON line per tick and per ended request here ("": off).
    tick_log: str = ""
