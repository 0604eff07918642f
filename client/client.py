"""A small synchronous client for the Lockstep gRPC API.

Tokens come back with their receive time (perf_counter seconds), and gRPC statuses come
back as typed exceptions (`InvalidArgument`, `OutOfRange`, `ResourceExhausted`, ...).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

import grpc

from client.connect import Security
from protos.lockstep.v1 import lockstep_pb2 as pb
from protos.lockstep.v1 import lockstep_pb2_grpc as pb_grpc


class LockstepError(Exception):
    code = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str):
        super().__init__(f"{self.code.name}: {details}")
        self.details = details


class InvalidArgument(LockstepError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class OutOfRange(LockstepError):
    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(LockstepError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(LockstepError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(LockstepError):
    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(LockstepError):
    code = grpc.StatusCode.CANCELLED


class Unauthenticated(LockstepError):
    code = grpc.StatusCode.UNAUTHENTICATED


class NotReady(Unavailable, TimeoutError):
    """No connection within `wait_ready`'s timeout; the details say the channel's last error
    (connection refused, a TLS handshake that failed, ...)."""


_ERRORS = {cls.code: cls for cls in (InvalidArgument, OutOfRange, ResourceExhausted, DeadlineExceeded,
                                     Unavailable, Cancelled, Unauthenticated)}


def error_from(exc: grpc.RpcError) -> LockstepError:
    cls = _ERRORS.get(exc.code(), LockstepError)
    err = cls(exc.details() or "")
    if cls is LockstepError:
        err.code = exc.code()
    return err


@dataclass(frozen=True)
class TokenEvent:
    id: int
    text: str
    index: int
    recv_s: float  # perf_counter when the message arrived
    tick: int
    sent_unix_s: float  # the server's clock when it sent the token


@dataclass
class Generation:
    request_id: str
    start_s: float  # perf_counter when the call was made
    predicted_ttft_s: float  # from the admission metadata
    predicted_e2e_s: float
    tokens: list[TokenEvent] = field(default_factory=list)
    finished: pb.Finished | None = None

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)

    @property
    def ttft_s(self) -> float:
        return self.tokens[0].recv_s - self.start_s

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive tokens as the client saw them."""
        return [b.recv_s - a.recv_s for a, b in zip(self.tokens, self.tokens[1:])]

    @property
    def tpot_s(self) -> float:
        gaps = self.itl_s
        return statistics.fmean(gaps) if gaps else 0.0


def temperature_arg(text: str) -> float:
    """argparse type of `--temperature`: 0 (greedy) or in [0.01, 100] as the server serves it
    (server/runtime/sampling.py), checked here as the float32 the request carries: NaN,
    infinities, and a double a float32 would turn into 0 (greedy) are refused at once
    (exit 2), not sent."""
    from server.runtime.sampling import MAX_TEMPERATURE, MIN_TEMPERATURE

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text[:40]!r}") from None
    wire = pb.SamplingParams(temperature=value).temperature  # the float32 the request carries
    if not (value == 0.0 or MIN_TEMPERATURE <= wire <= MAX_TEMPERATURE):  # NaN fails it too
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or in [0.01, {MAX_TEMPERATURE:g}], got {text[:40]}")
    return value


def build_request(prompt: str | list[int], max_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 0.0, seed: int = 0, stop=(), stop_token_ids=(), request_id: str = "",
                  model: str = "") -> pb.GenerateRequest:
    req = pb.GenerateRequest(max_tokens=max_tokens, request_id=request_id, model=model,
                             sampling=pb.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
                             stop=list(stop), stop_token_ids=list(stop_token_ids))
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


def not_ready(target: str, timeout_s: float, last: grpc.RpcError | None) -> NotReady | None:
    """The error for a channel still not connected after `timeout_s`, from the last error of a
    call that did not wait for it; None when that call reached the server after all."""
    if last is None or last.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return None
    return NotReady(f"no server ready at {target} within {timeout_s:g} s: {last.details()}")


class LockstepClient:
    """`security`: TLS roots, a server-name override and a bearer token (client/connect.py);
    by default a plaintext channel without a token."""

    def __init__(self, target: str, security: Security = Security()):
        self.target, self.security = target, security
        self.channel = security.channel(target)
        self.stub = pb_grpc.LockstepStub(self.channel)
        self._metadata = security.metadata

    def generate(self, prompt: str | list[int], max_tokens: int, timeout: float | None = None,
                 **kwargs) -> Generation:
        """Streams one generation to the end and returns it, with receive times."""
        start = time.perf_counter()
        call = self.stub.Generate(build_request(prompt, max_tokens, **kwargs), timeout=timeout,
                                  metadata=self._metadata)
        try:
            meta = dict(call.initial_metadata())
            gen = Generation(meta.get("lockstep-request-id", ""), start,
                             float(meta.get("lockstep-predicted-ttft-s", "nan")),
                             float(meta.get("lockstep-predicted-e2e-s", "nan")))
            for msg in call:
                if msg.WhichOneof("kind") == "token":
                    t = msg.token
                    gen.tokens.append(TokenEvent(t.id, t.text, t.index, time.perf_counter(), t.tick, t.sent_unix_s))
                else:
                    gen.finished = msg.finished
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        return gen

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        try:
            return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from(exc) from None

    def status(self, timeout: float | None = None) -> pb.ServerStatus:
        try:
            return self.stub.GetServerStatus(pb.GetServerStatusRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from(exc) from None

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until the channel connects (TLS handshake included); `NotReady` with the last
        connection error after `timeout_s`."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            err = not_ready(self.target, timeout_s, self._last_error())
            if err is not None:
                raise err from None

    def _last_error(self) -> grpc.RpcError | None:
        """A call that does not wait for the channel: it fails with the channel's last error."""
        try:
            self.stub.GetServerStatus(pb.GetServerStatusRequest(), timeout=5, metadata=self._metadata)
        except grpc.RpcError as exc:
            return exc
        return None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "LockstepClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
