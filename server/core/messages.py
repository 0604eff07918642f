"""The messages between the front end and the engine core process (docs/architecture.md,
"The engine core process"): msgspec structs, encoded as MessagePack.

Why msgspec: typed structs decoded straight from bytes (a malformed or unknown message is
a `msgspec.ValidationError`, not a silently wrong dict), and the fastest Python
encoder/decoder of its kind (vLLM V1 uses it for the same boundary). A tick's tokens for
8 streams encode in a few microseconds and ~100 bytes.

Front end -> core: `Start` (once), `Admit`, `Cancel`, `Predict`, `Drain`, `Stop`.
Core -> front end: `Ready` (once), `Admitted` / `Refused` (the answer to each `Admit`),
`Prediction`, `Events` (tokens, admissions, ends, metric calls and the engine's status,
batched per pass of the output thread), `Shutdown` (the core was asked to stop by a
signal), `Fatal` (the core cannot go on; it exits 1 after it).

Request ids on this boundary (`rid`) are ints the front end assigns; times are
`time.perf_counter()` seconds, which is CLOCK_MONOTONIC on Linux, one clock for both
processes.
"""

from __future__ import annotations

from typing import Union

import msgspec

from server.runtime.sampling import SamplingParams


class Start(msgspec.Struct, tag=True):
    config: dict  # server.config.ServeConfig as a dict (dataclasses.asdict)


class Admit(msgspec.Struct, tag=True):
    rid: int
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop_ids: list[int]
    arrival_s: float
    time_remaining_s: float | None  # the client's deadline, from arrival; None: none
    request_id: str = ""  # the id its client knows it by (x-request-id; the tick log's `id`)


class Cancel(msgspec.Struct, tag=True):
    rid: int


class Predict(msgspec.Struct, tag=True):
    qid: int
    prompt_len: int
    max_tokens: int


class Drain(msgspec.Struct, tag=True):
    """Stop admitting (the server is shutting down); running requests go on."""


class Stop(msgspec.Struct, tag=True):
    timeout_s: float  # end what is left with reason "shutdown" after the tick in flight, then exit 0


class Ready(msgspec.Struct, tag=True):
    time_scale: float
    pace: dict[str, float]  # phase -> pace factor
    pid: int
    status: dict  # Engine.status() before the first tick
    compiled: bool = False  # every stage runs compiled steps (server/runtime/compiled.py)


class Admitted(msgspec.Struct, tag=True):
    rid: int
    ttft_s: float
    e2e_s: float


class Refused(msgspec.Struct, tag=True):
    rid: int
    code: str  # a grpc.StatusCode name: RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, UNAVAILABLE
    message: str


class Prediction(msgspec.Struct, tag=True):
    qid: int
    ttft_s: float
    e2e_s: float
    refusal: str  # "" when a request of that shape would be admitted


class Events(msgspec.Struct, tag=True):
    tokens: list[tuple[int, int, int, float]]  # (rid, token id, tick, perf_counter s)
    admitted: list[tuple[int, float]]  # (rid, perf_counter s it took a KV slot)
    finished: list[tuple[int, str, str, int, float]]  # (rid, reason, message, tick, perf_counter s)
    metrics: list[tuple[str, list]]  # (server.frontend.metrics.Metrics method, arguments), in call order
    status: dict | None  # Engine.status() after these events, None if not read


class Shutdown(msgspec.Struct, tag=True):
    why: str


class Fatal(msgspec.Struct, tag=True):
    why: str


ToCore = Union[Start, Admit, Cancel, Predict, Drain, Stop]
ToFrontEnd = Union[Ready, Admitted, Refused, Prediction, Events, Shutdown, Fatal]
