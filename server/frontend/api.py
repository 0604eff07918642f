"""The gRPC service (grpc.aio): validates requests, admits them by prediction, streams
tokens from the engine, and ends every admitted request with exactly one `Outcome`.

The outcome record is made in one place (`_stream`'s `finally`) and feeds both the
stream's last message (a `Finished`, or the error status) and the metrics, so a
request is counted once, by the reason it really ended (see docs/security.md):

  reason        code                 when
  length        OK                   max_tokens (or the context) reached
  stop          OK                   a stop token or stop string
  cancelled     CANCELLED            the client cancelled; UNAVAILABLE: the server drained it
  disconnected  CANCELLED            the client's connection went away
  deadline      DEADLINE_EXCEEDED    the client's deadline passed mid-stream
  error         INTERNAL             its step failed; UNAVAILABLE: the engine died
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace

import grpc
from google.protobuf.message import DecodeError

from protos.lockstep.v1 import lockstep_pb2 as pb
from server.core import admission
from server.frontend.delivery import Stream
from server.core.engine import Engine, Finished, Request, new_request_id
from server.frontend.peers import SETTLE_S, connection_open
from server.frontend.tokenizer import IncrementalDecoder
from server.frontend.validate import BadRequest, Limits, Parsed, parse_request, quote

PROTOCOL = "grpc"  # the `protocol` label of this front door's request metrics
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Lockstep"].full_name
_OK, _CANCELLED = grpc.StatusCode.OK, grpc.StatusCode.CANCELLED
# Engine reasons -> (outcome reason, code).
_ENGINE_ENDINGS = {
    "length": ("length", _OK),
    "stop": ("stop", _OK),
    "cancelled": ("cancelled", _CANCELLED),
    "error": ("error", grpc.StatusCode.INTERNAL),
    "unavailable": ("error", grpc.StatusCode.UNAVAILABLE),
    "shutdown": ("cancelled", grpc.StatusCode.UNAVAILABLE),
}


@dataclass(frozen=True)
class Malformed:
    """What the request deserializer returns for bytes that are not a valid message."""

    error: str


def _lenient(message_cls):
    def deserialize(data: bytes):
        try:
            return message_cls.FromString(data)
        except (DecodeError, ValueError, TypeError) as exc:  # garbage, truncated, invalid UTF-8
            return Malformed(f"{type(exc).__name__}: {str(exc)[:200]}")

    return deserialize


@dataclass(frozen=True)
class Outcome:
    """How one admitted request ended: the one record behind its last message and metrics."""

    reason: str  # length | stop | cancelled | disconnected | deadline | error
    code: grpc.StatusCode
    message: str
    completion_tokens: int  # tokens the client was sent
    ttft_s: float | None  # arrival -> first token sent (engine clock), seconds
    tpot_s: float | None  # mean gap between tokens sent after the first, seconds
    e2e_s: float  # arrival -> last token (or the end), seconds
    queue_s: float | None  # arrival -> admission into a slot, seconds


class Sent:
    """Tokens handed to the client, on the engine's clock (perf_counter seconds)."""

    def __init__(self):
        self.n, self.first_s, self.last_s = 0, None, None

    def add(self, t: float) -> float | None:
        """Returns the gap to the previous token (None for the first)."""
        gap = None if self.last_s is None else t - self.last_s
        self.first_s = self.first_s if self.first_s is not None else t
        self.last_s, self.n = t, self.n + 1
        return gap

    def late_s(self, r: Request) -> float | None:
        """How long after its promised time the last token added leaves now (None: no promise)."""
        return time.perf_counter() - r.due_s(self.n - 1) if r.predicted_ttft_s else None


DEADLINE_SLACK_S = 0.05  # a cut this close to the deadline is the deadline (client and server timers race)


def _client_ending(context) -> tuple[str, grpc.StatusCode]:
    """Why a stream the server did not end was cut: the deadline, else the client
    (cancelled or disconnected: told apart later, see server/frontend/peers.py)."""
    remaining = context.time_remaining()
    if remaining is not None and remaining < DEADLINE_SLACK_S:
        return "deadline", grpc.StatusCode.DEADLINE_EXCEEDED
    return "cancelled", _CANCELLED


class Refused(Exception):
    """A valid request the server will not take now (engine down, draining, queue full,
    a deadline the prediction cannot meet), with the gRPC code that says which."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def admit(engine: Engine, parsed: Parsed, time_remaining_s: float | None = None,
          arrival_s: float | None = None) -> tuple[Request, asyncio.Queue]:
    """Predicts, then queues `parsed` on an engine in this process (on the event loop).
    Raises Refused with nothing queued. Returns the request and the queue its tokens and
    its end (engine.Finished) arrive on, as (item, tick, seconds). `arrival_s`: when the
    door received it (perf_counter seconds; default now), what its promise counts from."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    r = Request(parsed.request_id or new_request_id(), parsed.prompt, parsed.max_tokens, parsed.sampling,
                parsed.stop_ids, lambda *item: loop.call_soon_threadsafe(stream.release, *item),
                arrival_s=time.perf_counter() if arrival_s is None else arrival_s)
    stream = Stream(r, queue, engine.config.deterministic)  # tokens go out no sooner than promised
    try:
        admission.admit(engine, r, time_remaining_s)
    except admission.Refusal as exc:
        raise Refused(grpc.StatusCode[exc.code], str(exc)) from None
    return r, queue


class LocalAdmission:
    """The front ends' way in to an engine in this process: admit, cancel, predict, status.
    A router (server/frontend/router.py) offers the same to replicas elsewhere."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @property
    def up(self) -> bool:
        return self.engine.up

    @property
    def accepting(self) -> bool:
        return self.engine.accepting

    def status(self) -> dict:
        return self.engine.status()

    async def admit(self, parsed: Parsed, time_remaining_s: float | None,
                    arrival_s: float | None = None) -> tuple[Request, asyncio.Queue]:
        return admit(self.engine, parsed, time_remaining_s, arrival_s)

    def cancel(self, r: Request) -> None:
        """The client left or a stop string ended it: its slot is freed next tick."""
        r.cancelled = True
        self.engine.wake()

    async def predict_arrival(self, prompt_tokens: int, max_tokens: int) -> pb.ArrivalPrediction:
        """What admission would promise such a request now, queueing nothing."""
        s = self.engine.status()
        return arrival_prediction(*admission.predict(self.engine, prompt_tokens, max_tokens),
                                  s["running"] + s["queue_length"])


def arrival_prediction(ttft_s: float, e2e_s: float, refusal: str, outstanding: int) -> pb.ArrivalPrediction:
    if refusal:
        return pb.ArrivalPrediction(admissible=False, refusal=refusal, outstanding=outstanding)
    return pb.ArrivalPrediction(admissible=True, ttft_s=ttft_s, e2e_s=e2e_s, outstanding=outstanding)


def health_handler(servicer) -> grpc.GenericRpcHandler:
    """grpc.health.v1.Health over `servicer` (grpc_health's aio HealthServicer), with the
    lenient deserializer of the other methods: bytes that are not a HealthCheckRequest get
    INVALID_ARGUMENT with what is wrong (the generated registration answered UNKNOWN)."""
    from grpc_health.v1 import health_pb2

    async def check(request, context):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not valid ({request.error})")
        return await servicer.Check(request, context)

    async def watch(request, context):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not valid ({request.error})")
        async for response in servicer.Watch(request, context):
            yield response

    lenient, out = _lenient(health_pb2.HealthCheckRequest), health_pb2.HealthCheckResponse.SerializeToString
    return grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(check, request_deserializer=lenient, response_serializer=out),
        "Watch": grpc.unary_stream_rpc_method_handler(watch, request_deserializer=lenient, response_serializer=out),
    })


def outcome(r: Request, sent: Sent, reason: str, code, message: str, end_s: float | None) -> Outcome:
    """The one record of how an admitted request ended (times on the engine's clock)."""
    end_s = end_s if end_s is not None else time.perf_counter()
    if sent.last_s is not None and reason in ("length", "stop"):
        end_s = sent.last_s  # e2e ends with the last token sent
    tpot = (sent.last_s - sent.first_s) / (sent.n - 1) if sent.n > 1 else None
    admitted = r.admitted_s  # set by the engine thread before any token; None if never admitted
    return Outcome(reason, code, message, sent.n,
                   None if sent.first_s is None else sent.first_s - r.arrival_s, tpot, end_s - r.arrival_s,
                   None if admitted is None else admitted - r.arrival_s)


def promise_metadata(r: Request) -> tuple:
    """The promise as gRPC initial metadata, sent at admission: the request id, its predicted
    TTFT and finish (seconds from arrival), the arrival they count from, and where a router
    sent it (replica_metadata)."""
    return (("lockstep-request-id", r.request_id), ("lockstep-predicted-ttft-s", f"{r.predicted_ttft_s:.6f}"),
            ("lockstep-predicted-e2e-s", f"{r.predicted_e2e_s:.6f}"),
            ("lockstep-arrival-unix-s", f"{arrival_unix_s(r):.6f}"), *replica_metadata(r))


def arrival_unix_s(r: Request) -> float:
    """When the door received the request's first bytes, Unix seconds: the instant its promise
    counts from (token k is due then + TTFT + k x TPOT), so a client can check each token
    against the promise itself rather than against its own send, which the way to the door
    (a busy event loop, the network) precedes."""
    return time.time() - (time.perf_counter() - r.arrival_s)


def replica_metadata(r: Request) -> tuple:
    """For a request a router sent to a replica: ("lockstep-replica", its index) and
    ("lockstep-route-ttft-s", "0=0.012000,1=0.004500"), each replica's predicted TTFT when
    it was routed (inf: not asked); () otherwise."""
    replica = getattr(r, "replica", None)
    if replica is None:
        return ()
    route = ",".join(f"{i}={t:.6f}" for i, t in sorted(getattr(r, "route", {}).items()))
    return (("lockstep-replica", str(replica)), ("lockstep-route-ttft-s", route))


def record(metrics, protocol: str, r: Request, o: Outcome) -> None:
    if metrics is not None:
        metrics.request_finished(protocol, o.reason, o.code.name, o.ttft_s, o.tpot_s, o.e2e_s, o.queue_s,
                                 r.predicted_ttft_s, r.predicted_tpot_s or None, o.completion_tokens)


class LockstepService:
    def __init__(self, admission, info: pb.ModelInfo, tokenizer, limits: Limits, metrics=None):
        """admission: a LocalAdmission (an engine here) or a router's (replicas elsewhere)."""
        self.admission, self.info, self.tokenizer, self.limits = admission, info, tokenizer, limits
        self.metrics = metrics
        self.streams = 0  # Generate calls still running (a drain waits for their last status)
        self.started = time.monotonic()

    def add_to_server(self, server) -> None:
        """Registers the three RPCs with request deserializers that turn malformed bytes
        into INVALID_ARGUMENT (the generated stubs' deserializer raises, which grpc
        answers with UNKNOWN and the exception's name)."""
        out = {"Generate": pb.GenerateResponse, "GetModelInfo": pb.ModelInfo, "GetServerStatus": pb.ServerStatus,
               "PredictArrival": pb.ArrivalPrediction}
        handlers = {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate, _lenient(pb.GenerateRequest), out["Generate"].SerializeToString),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                self.GetModelInfo, _lenient(pb.GetModelInfoRequest), out["GetModelInfo"].SerializeToString),
            "GetServerStatus": grpc.unary_unary_rpc_method_handler(
                self.GetServerStatus, _lenient(pb.GetServerStatusRequest), out["GetServerStatus"].SerializeToString),
            "PredictArrival": grpc.unary_unary_rpc_method_handler(
                self.PredictArrival, _lenient(pb.PredictArrivalRequest), out["PredictArrival"].SerializeToString),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

    async def _refuse(self, context, code: grpc.StatusCode, message: str):
        if self.metrics is not None:
            self.metrics.request_rejected(PROTOCOL, code.name)
        await context.abort(code, message)

    async def _admit(self, request, context) -> tuple[Parsed, Request, asyncio.Queue]:
        """Every check, then the queue; refuses (aborts) with nothing queued on any failure."""
        arrival = time.perf_counter()  # the promise counts from here: parsing and tokenizing are in it
        if isinstance(request, Malformed):
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid "
                                                                          f"GenerateRequest ({request.error})")
        try:
            parsed = parse_request(request, self.limits, self.tokenizer, self.info.model)
            r, queue = await self.admission.admit(parsed, context.time_remaining(), arrival)
        except (BadRequest, Refused) as exc:
            await self._refuse(context, exc.code, str(exc))
        return parsed, r, queue

    async def Generate(self, request, context):
        self.streams += 1
        try:
            parsed, r, queue = await self._admit(request, context)
            if self.metrics is not None:
                self.metrics.request_admitted(PROTOCOL, len(parsed.prompt))
            async for message in self._stream(r, parsed.stop, queue, context):
                yield message
        finally:
            self.streams -= 1

    async def _stream(self, r: Request, stops: tuple[str, ...], queue: asyncio.Queue, context):
        decoder, sent, outcome, ended_by_engine = IncrementalDecoder(self.tokenizer, r.prompt), Sent(), None, False
        peer, cut = context.peer(), False
        # Stop strings are searched in the text's last (longest stop - 1) chars plus the new
        # delta, not in the whole text again for every token.
        keep, tail = max((len(s) for s in stops), default=1) - 1, ""
        try:
            await context.send_initial_metadata(promise_metadata(r))
            while outcome is None:
                item, tick, t = await queue.get()
                if isinstance(item, Finished):
                    ended_by_engine = True
                    reason, code = _ENGINE_ENDINGS[item.reason]
                    outcome = self._outcome(r, sent, reason, code, item.message, t)
                    break
                gap = sent.add(t)
                delta = decoder.step(item)
                yield pb.GenerateResponse(token=pb.Token(id=item, text=delta, index=sent.n - 1,
                                                         sent_unix_s=time.time(), tick=tick))
                if self.metrics is not None:
                    self.metrics.token_emitted(PROTOCOL, gap, sent.late_s(r))
                if stops:
                    tail += delta
                    if any(s in tail for s in stops):
                        outcome = self._outcome(r, sent, "stop", _OK, "", t)
                    tail = tail[len(tail) - keep:] if keep else ""
        except (asyncio.CancelledError, GeneratorExit):
            if outcome is None:
                reason, code = _client_ending(context)
                outcome, cut = self._outcome(r, sent, reason, code, "", None), reason == "cancelled"
            raise
        except BaseException as exc:
            if outcome is None:
                outcome = self._outcome(r, sent, "error", grpc.StatusCode.INTERNAL,
                                        f"request {r.request_id!r}: {type(exc).__name__}", None)
            raise
        finally:
            if not ended_by_engine:  # stop string, or the client went away: free the slot next tick
                self.admission.cancel(r)
            if cut:  # cancelled or disconnected: the transport tells once it has settled
                asyncio.get_running_loop().call_later(SETTLE_S, self._record_cut, r, outcome, peer)
            elif outcome is not None:
                self._record(r, outcome)
        if outcome.code == _OK:
            yield pb.GenerateResponse(finished=self._finished(r, outcome, decoder.flush()))
        else:
            await context.abort(outcome.code, outcome.message or f"request {r.request_id!r}: {outcome.reason}")

    def _outcome(self, r: Request, sent: Sent, reason: str, code, message: str, end_s: float | None) -> Outcome:
        return outcome(r, sent, reason, code, message, end_s)

    def _record_cut(self, r: Request, o: Outcome, peer: str) -> None:
        if connection_open(peer) is False:
            o = replace(o, reason="disconnected")
        self._record(r, o)

    def _record(self, r: Request, o: Outcome) -> None:
        record(self.metrics, PROTOCOL, r, o)

    def _finished(self, r: Request, o: Outcome, text: str) -> pb.Finished:
        return pb.Finished(finish_reason=o.reason, prompt_tokens=len(r.prompt), completion_tokens=o.completion_tokens,
                           request_id=r.request_id, predicted_ttft_s=r.predicted_ttft_s,
                           measured_ttft_s=o.ttft_s or 0.0, predicted_tpot_s=r.predicted_tpot_s,
                           measured_tpot_s=o.tpot_s or 0.0, queue_s=o.queue_s or 0.0, e2e_s=o.e2e_s,
                           predicted_e2e_s=r.predicted_e2e_s, text=text)

    async def GetModelInfo(self, request, context):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not valid ({request.error})")
        return self.info

    async def GetServerStatus(self, request, context):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not valid ({request.error})")
        s = self.admission.status()
        return pb.ServerStatus(queue_length=s["queue_length"], slots_in_use=s["slots_in_use"],
                               max_slots=s["max_slots"], running=s["running"], ticks=s["ticks"],
                               overruns=s["overruns"], accepting=s["accepting"],
                               uptime_s=time.monotonic() - self.started, max_queue=s["max_queue"],
                               engine_up=s["engine_up"], pace_factor=s["pace_factor"], repaces=s["repaces"])

    async def PredictArrival(self, request, context):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not valid ({request.error})")
        limits = self.limits
        for name, value, most in (("prompt_tokens", request.prompt_tokens, limits.max_prompt_tokens),
                                  ("max_tokens", request.max_tokens, limits.max_tokens)):
            if not 1 <= value <= most:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: must be in 1..{most}, got {value}")
        if request.prompt_tokens + request.max_tokens > limits.max_context:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"prompt_tokens + max_tokens: {request.prompt_tokens + request.max_tokens} is over "
                                f"the context of {limits.max_context}")
        return await self.admission.predict_arrival(request.prompt_tokens, request.max_tokens)


__all__ = ["Limits", "LocalAdmission", "LockstepService", "Outcome", "PROTOCOL", "Refused", "Sent", "SERVICE_NAME", "admit", "outcome", "quote", "record"]

