"""The gRPC service (grpc.aio): validates requests, admits them by prediction, streams
tokens from the engine, and turns every refusal into a status whose message names the
field or the predicted time.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import grpc

from protos.lockstep.v1 import lockstep_pb2 as pb
from protos.lockstep.v1 import lockstep_pb2_grpc as pb_grpc
from server.engine import Engine, Finished, Request, new_request_id
from server.sampling import SamplingParams
from server.tokenizer import IncrementalDecoder

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
MAX_REQUEST_ID_CHARS = 128


@dataclass(frozen=True)
class Limits:
    max_tokens: int  # per request
    max_prompt_tokens: int
    vocab_size: int
    max_context: int


class BadRequest(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _sampling(msg: pb.SamplingParams, vocab: int) -> SamplingParams:
    t, top_p = msg.temperature, msg.top_p or 1.0
    if not (math.isfinite(t) and 0.0 <= t <= 100.0):
        raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.temperature must be in [0, 100], got {t}")
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.top_p must be in (0, 1] (0 = unset), got {top_p}")
    if msg.top_k > vocab:
        raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.top_k must be <= the vocabulary ({vocab}), got {msg.top_k}")
    if msg.seed >= 2**63:
        raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.seed must be < 2^63, got {msg.seed}")
    return SamplingParams(temperature=float(t), top_k=int(msg.top_k), top_p=float(top_p), seed=int(msg.seed))


def parse_request(req: pb.GenerateRequest, limits: Limits, tokenizer, model: str) -> tuple[list[int], SamplingParams]:
    """Checks every field; returns (prompt ids, sampling). Raises BadRequest."""
    invalid, out_of_range = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE
    if req.model and req.model != model:
        raise BadRequest(invalid, f"model: {req.model!r} is not served here (this server serves {model!r})")
    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        raise BadRequest(invalid, f"request_id: at most {MAX_REQUEST_ID_CHARS} characters")
    kind = req.WhichOneof("prompt")
    ids = tokenizer.encode(req.text) if kind == "text" else list(req.token_ids.ids) if kind == "token_ids" else []
    if not ids:
        raise BadRequest(invalid, "prompt: empty (give text or token_ids)")
    bad = next((i for i in ids if i >= limits.vocab_size), None)
    if bad is not None:
        raise BadRequest(invalid, f"prompt.token_ids: id {bad} is outside the vocabulary of {limits.vocab_size}")
    if len(ids) > limits.max_prompt_tokens:
        raise BadRequest(out_of_range, f"prompt: {len(ids)} tokens; at most {limits.max_prompt_tokens} fit the context")
    if req.max_tokens < 1:
        raise BadRequest(invalid, "max_tokens: must be >= 1")
    if req.max_tokens > limits.max_tokens:
        raise BadRequest(out_of_range, f"max_tokens: {req.max_tokens} exceeds the limit of {limits.max_tokens}")
    if len(ids) + req.max_tokens > limits.max_context:
        raise BadRequest(out_of_range, f"max_tokens: prompt {len(ids)} + max_tokens {req.max_tokens} exceeds "
                                       f"the context of {limits.max_context}")
    if len(req.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in req.stop):
        raise BadRequest(invalid, f"stop: at most {MAX_STOP_STRINGS} non-empty strings of <= {MAX_STOP_CHARS} chars")
    bad = next((i for i in req.stop_token_ids if i >= limits.vocab_size), None)
    if bad is not None:
        raise BadRequest(invalid, f"stop_token_ids: id {bad} is outside the vocabulary of {limits.vocab_size}")
    return ids, _sampling(req.sampling, limits.vocab_size)


class LockstepService(pb_grpc.LockstepServicer):
    def __init__(self, engine: Engine, info: pb.ModelInfo, tokenizer, limits: Limits, metrics=None):
        self.engine, self.info, self.tokenizer, self.limits, self.metrics = engine, info, tokenizer, limits, metrics
        self.started = time.monotonic()

    async def _refuse(self, context, code: grpc.StatusCode, message: str):
        if self.metrics is not None:
            self.metrics.request_rejected(code.name)
        await context.abort(code, message)

    async def Generate(self, request, context):
        try:
            ids, sampling = parse_request(request, self.limits, self.tokenizer, self.info.model)
        except BadRequest as exc:
            await self._refuse(context, exc.code, str(exc))
        if not self.engine.accepting:
            await self._refuse(context, grpc.StatusCode.UNAVAILABLE, "server is shutting down; not admitting")
        ttft, e2e = self.engine.predict(len(ids), request.max_tokens)
        remaining = context.time_remaining()
        if remaining is not None and e2e > remaining:
            await self._refuse(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"predicted finish in {e2e:.3f} s (first token in {ttft:.3f} s) is past the "
                               f"deadline of {remaining:.3f} s")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        r = Request(request.request_id or new_request_id(), ids, request.max_tokens, sampling,
                    frozenset(request.stop_token_ids), lambda item, tick: loop.call_soon_threadsafe(
                        queue.put_nowait, (item, tick)), predicted_ttft_s=ttft, predicted_e2e_s=e2e)
        try:
            self.engine.submit(r)
        except OverflowError as exc:
            await self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{exc}; a request now would get its first token in {ttft:.3f} s")
        if self.metrics is not None:
            self.metrics.request_admitted(len(ids))
        await context.send_initial_metadata((("lockstep-request-id", r.request_id),
                                             ("lockstep-predicted-ttft-s", f"{ttft:.6f}"),
                                             ("lockstep-predicted-e2e-s", f"{e2e:.6f}")))
        async for message in self._stream(r, queue, list(request.stop)):
            yield message

    async def _stream(self, r: Request, queue: asyncio.Queue, stops: list[str]):
        decoder, stopped, finished = IncrementalDecoder(self.tokenizer), False, False
        # Stop strings are searched in the text's last (longest stop - 1) chars plus the new
        # delta, not in the whole text again for every token.
        keep, tail = max((len(s) for s in stops), default=1) - 1, ""
        index = 0  # counted here: r.out belongs to the engine thread and may be ahead
        try:
            while True:
                item, tick = await queue.get()
                if isinstance(item, Finished):
                    finished = True
                    reason = "stop" if stopped else item.reason
                    self._record(r, item, reason)
                    yield pb.GenerateResponse(finished=self._finished(r, item, reason))
                    return
                if stopped:
                    continue  # tokens sampled in the tick before the engine saw the cancel
                delta = decoder.step(item)
                yield pb.GenerateResponse(token=pb.Token(id=item, text=delta, index=index,
                                                         sent_unix_s=time.time(), tick=tick))
                index += 1
                if stops:
                    tail += delta
                    if any(s in tail for s in stops):
                        stopped = r.cancelled = True
                        self.engine.wake()
                    tail = tail[len(tail) - keep:] if keep else ""
        finally:
            if not finished:  # the client cancelled or went away: free the slot next tick
                r.cancelled = True
                self.engine.wake()

    def _record(self, r: Request, done: Finished, reason: str) -> None:
        if self.metrics is None:
            return
        code = "CANCELLED" if reason == "cancelled" else "OK"
        self.metrics.request_finished(reason, code, done.ttft_s, done.tpot_s, done.e2e_s, done.queue_s,
                                      r.predicted_ttft_s, self.engine.tick_s("decode", 1), done.completion_tokens)

    def _finished(self, r: Request, done: Finished, reason: str) -> pb.Finished:
        batch = self.engine.bucket_for(max(1, self.engine.status()["running"]))
        return pb.Finished(finish_reason=reason, prompt_tokens=done.prompt_tokens,
                           completion_tokens=done.completion_tokens, request_id=r.request_id,
                           predicted_ttft_s=r.predicted_ttft_s, measured_ttft_s=done.ttft_s or 0.0,
                           predicted_tpot_s=self.engine.tick_s("decode", batch), measured_tpot_s=done.tpot_s or 0.0,
                           queue_s=done.queue_s or 0.0, e2e_s=done.e2e_s, predicted_e2e_s=r.predicted_e2e_s)

    async def GetModelInfo(self, request, context):
        return self.info

    async def GetServerStatus(self, request, context):
        s = self.engine.status()
        return pb.ServerStatus(queue_length=s["queue_length"], slots_in_use=s["slots_in_use"],
                               max_slots=s["max_slots"], running=s["running"], ticks=s["ticks"],
                               overruns=s["overruns"], accepting=s["accepting"],
                               uptime_s=time.monotonic() - self.started)
