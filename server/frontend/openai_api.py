"""OpenAI-compatible HTTP (FastAPI on uvicorn, on the gRPC server's event loop and port of
its own): `GET /health`, `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`, streamed
as server-sent events (`data: {...}` chunks, then `data: [DONE]`) or not.

Same engine, same admission by prediction and same metrics as gRPC (server/api.LocalAdmission,
outcome, record): a body is translated into a GenerateRequest and checked by the same
`parse_request`, so every field is validated as the gRPC one is. The prediction is in the
response headers (`lockstep-predicted-ttft-s`, `lockstep-predicted-e2e-s`, and `lockstep-arrival-unix-s`,
the door's receipt they count from). Errors are
OpenAI's JSON (`{"error": {"message", "type", "param", "code"}}`) with the status that
says why: 400 bad input, 401 auth, 404 unknown model, 429 queue full, 503 draining or the
engine down, 504 a deadline the prediction cannot meet (header `x-lockstep-deadline-s`).

Chat messages go through the checkpoint's own chat template (transformers'
`apply_chat_template`); a model without one (random weights) serves completions only.
Stop strings end the text before the stop string, as OpenAI's do; streamed text holds
back the last (longest stop - 1) characters until they cannot start one (server/frontend/textrun.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import time

import grpc
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from protos.lockstep.v1 import lockstep_pb2 as pb
from server.frontend.api import Refused, arrival_unix_s, replica_metadata
from server.frontend.httpd import RECEIVED_KEY
from server.frontend.textrun import TextRun
from server.frontend.tokenizer import ChatTemplate
from server.frontend.validate import BadRequest, Limits, float32_change, parse_request

# gRPC status of a refusal or a bad request -> (HTTP status, OpenAI error type)
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
# An error made here (not by the shared checks) -> the gRPC code its refusal counts under.
_CODE = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED"}
PROTOCOL = "http"  # the `protocol` label of this front door's request metrics
MAX_BODY_BYTES = 1 << 20


class HTTPError(Exception):
    def __init__(self, status: int, kind: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


def _gone() -> JSONResponse:
    """The answer to a client that has gone: nobody reads it (499, as nginx logs it)."""
    return JSONResponse(_error_body(HTTPError(499, "invalid_request_error", "client disconnected")), 499)


def _bad(message: str, param: str | None = None) -> HTTPError:
    return HTTPError(400, "invalid_request_error", message, param)


def _too_large(what: str) -> HTTPError:
    return HTTPError(413, "invalid_request_error", f"body: {what} is over the limit of {MAX_BODY_BYTES} bytes")


async def _read_limited(request: HTTPRequest, limit: int) -> bytes:
    """The body, read no further than `limit` bytes: a declared Content-Length over it is
    refused before a byte is read, and a chunked body (no length) is refused as soon as it
    passes the limit; the unread rest is never taken (server/frontend/httpd.py,
    LingeringProtocol, closes the connection after the answer). 413, as gRPC's door refuses an oversized
    message with RESOURCE_EXHAUSTED."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:  # malformed ones: uvicorn answers 400
        raise _too_large(f"Content-Length {declared}")
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(f"more than {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _error_body(exc: HTTPError) -> dict:
    return {"error": {"message": str(exc), "type": exc.kind, "param": exc.param, "code": exc.status}}


def _from_grpc(exc: BadRequest | Refused) -> HTTPError:
    """The shared validation names gRPC fields ("sampling.temperature must be ...",
    "max_tokens: ..."); OpenAI's are top-level."""
    status, kind = _HTTP.get(exc.code, (500, "server_error"))
    message = str(exc).replace("sampling.", "")
    param = message.split(":", 1)[0].split(" ", 1)[0] if status == 400 else None
    return HTTPError(status, kind, message, param)


def _number(body: dict, name: str, default, kind=float):
    """A JSON number field (not a bool), or `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise _bad(f"{name}: must be {'an integer' if kind is int else 'a number'}, got {json.dumps(value)[:40]}", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(f"{name}: must be finite", name)
    if kind is float:  # temperature, top_p: float32 fields of the native request
        try:
            why = float32_change(float(value))
        except OverflowError:  # an integer past the doubles
            why = f"{str(value)[:40]} is out of range"
        if why:
            raise _bad(f"{name}: {why}", name)
    return value


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages: must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise _bad(f"messages[{i}]: needs a role (system, user or assistant) and a string content", "messages")
        out.append({"role": m["role"], "content": m["content"]})
    return out


class OpenAIFrontEnd:
    """The FastAPI app; one per server, sharing the gRPC service's admission (engine or router) and metrics."""

    def __init__(self, admission, model: str, limits: Limits, tokenizer, metrics=None, chat: ChatTemplate | None = None,
                 auth_token: bytes = b""):
        self.admission, self.model, self.limits, self.tokenizer = admission, model, limits, tokenizer
        self.metrics, self.chat, self.auth_token = metrics, chat, auth_token
        self.created = int(time.time())
        self.app = FastAPI(title="Lockstep (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)
        self.app.add_api_route("/health", self.health, methods=["GET"])
        self.app.add_api_route("/v1/models", self.models, methods=["GET"])
        self.app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        self.app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])

    # -- routes --------------------------------------------------------------------------
    async def health(self):
        """As vLLM's: 200 while admitting (load balancers and benchmark tools probe it;
        no token needed, as gRPC health), 503 while draining or once the engine died."""
        if self.admission.up and self.admission.accepting:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "draining" if self.admission.up else "engine stopped"}, 503)

    async def models(self, request: HTTPRequest):
        try:
            self._authorize(request)
        except HTTPError as exc:
            return JSONResponse(_error_body(exc), exc.status)
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": self.created,
                                            "owned_by": "lockstep"}]}

    async def completions(self, request: HTTPRequest):
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: HTTPRequest):
        return await self._serve(request, chat=True)

    # -- the request ---------------------------------------------------------------------
    def _authorize(self, request: HTTPRequest) -> None:
        if self.auth_token:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode("latin-1", "replace"), b"Bearer " + self.auth_token):
                if self.metrics is not None:
                    self.metrics.request_rejected(PROTOCOL, "UNAUTHENTICATED")
                raise HTTPError(401, "authentication_error", "missing or wrong bearer token")

    async def _body(self, request: HTTPRequest) -> dict:
        raw = await _read_limited(request, MAX_BODY_BYTES)
        try:
            body = json.loads(raw, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not JSON")))
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad(f"body: not valid JSON ({str(exc)[:100]})") from None
        if not isinstance(body, dict):
            raise _bad("body: must be a JSON object")
        return body

    def _translate(self, body: dict, chat: bool) -> tuple[pb.GenerateRequest, bool, bool, bool]:
        """The body as a GenerateRequest (checked by parse_request after), stream, include_usage,
        ignore_eos (vLLM's extension: run to max_tokens past the model's end-of-sequence)."""
        model = body.get("model")
        if model is not None and model != self.model:
            raise HTTPError(404, "invalid_request_error", f"model: {json.dumps(model)[:60]} is not served here "
                                                          f"(this server serves {self.model!r})", "model")
        if _number(body, "n", 1, int) != 1:
            raise _bad("n: only 1 is supported", "n")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("stream: must be true or false", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise _bad("stream_options: must be {\"include_usage\": true|false}", "stream_options")
        req = pb.GenerateRequest()
        if chat:
            if self.chat is None:
                raise _bad(f"messages: model {self.model!r} has no chat template; use /v1/completions", "messages")
            req.token_ids.ids.extend(self.chat.ids(_messages(body)))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]  # one prompt in a list
            if isinstance(prompt, str):
                req.text = prompt
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                             and 0 <= t < 2**63 for t in prompt):
                req.token_ids.ids.extend(prompt)
            else:
                raise _bad("prompt: must be a string or a list of token ids (one prompt)", "prompt")
        default = 16 if not chat else self.limits.max_tokens
        max_tokens = _number(body, "max_completion_tokens", None, int)
        max_tokens = _number(body, "max_tokens", default, int) if max_tokens is None else max_tokens
        if chat and "max_tokens" not in body and "max_completion_tokens" not in body:
            prompt_len = len(req.token_ids.ids)
            max_tokens = max(1, min(max_tokens, self.limits.max_context - prompt_len))
        if not 1 <= max_tokens < 2**31:
            raise _bad(f"max_tokens: must be >= 1, got {max_tokens}", "max_tokens")
        req.max_tokens = max_tokens
        req.sampling.temperature = _number(body, "temperature", 1.0)
        req.sampling.top_p = _number(body, "top_p", 1.0)
        req.sampling.seed = _number(body, "seed", 0, int) % 2**64
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("stop: must be a string or a list of strings", "stop")
        req.stop.extend(stops)
        user_id = body.get("user")
        if user_id is not None and not isinstance(user_id, str):
            raise _bad("user: must be a string", "user")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise _bad("ignore_eos: must be true or false", "ignore_eos")
        return req, stream, options.get("include_usage", False), ignore_eos

    async def _serve(self, request: HTTPRequest, chat: bool):
        # The promise counts from the request's first bytes (httpd.LingeringProtocol): the
        # turns of the loop before this handler ran, reading the body, parsing and tokenizing
        # are in it (8 simultaneous arrivals are parsed one after another on this loop).
        arrival = request.scope.get(RECEIVED_KEY) or time.perf_counter()
        try:
            self._authorize(request)
            req, stream, include_usage, ignore_eos = self._translate(await self._body(request), chat)
            parsed = parse_request(req, self.limits, self.tokenizer, self.model, ignore_eos)
            deadline = request.headers.get("x-lockstep-deadline-s")
            try:
                remaining = float(deadline) if deadline is not None else None
            except ValueError:
                raise _bad("x-lockstep-deadline-s: must be seconds") from None
            if remaining is not None and not (math.isfinite(remaining) and remaining > 0):
                raise _bad("x-lockstep-deadline-s: must be a positive number of seconds")
            r, queue = await self.admission.admit(parsed, remaining, arrival)
        except (BadRequest, Refused) as exc:
            if self.metrics is not None:
                self.metrics.request_rejected(PROTOCOL, exc.code.name)
            error = _from_grpc(exc)
            return JSONResponse(_error_body(error), error.status)
        except ClientDisconnect:  # gone before its body arrived: nothing was admitted, nobody to answer
            return _gone()
        except HTTPError as exc:
            if self.metrics is not None and exc.status != 401:
                self.metrics.request_rejected(PROTOCOL, _CODE.get(exc.status, "UNKNOWN"))
            return JSONResponse(_error_body(exc), exc.status)
        if self.metrics is not None:
            self.metrics.request_admitted(PROTOCOL, len(parsed.prompt))
        headers = {"lockstep-predicted-ttft-s": f"{r.predicted_ttft_s:.6f}",
                   "lockstep-predicted-e2e-s": f"{r.predicted_e2e_s:.6f}",
                   "lockstep-arrival-unix-s": f"{arrival_unix_s(r):.6f}", "x-request-id": r.request_id,
                   **dict(replica_metadata(r))}
        run = _Run(self, r, queue, parsed.stop, chat, include_usage)
        if stream:
            return _EventStream(run, headers)
        return await run.whole(request, headers)


async def _disconnected(request: HTTPRequest) -> None:
    """Returns once the client has gone (the body is read: the next ASGI message is the
    disconnect, sent by uvicorn when the connection closes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """The SSE response of one run. Starlette cancels a stream whose client left, possibly
    before its generator ever started (then no `finally` in it runs); closing the
    generator here and `abandon()` make every run end with one outcome and its slot freed."""

    def __init__(self, run: _Run, headers: dict):
        super().__init__(run.sse(), media_type="text/event-stream", headers=headers)
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # runs sse()'s cleanup if it started; a no-op if it ended
            self.run.abandon()


class _Run(TextRun):
    """One admitted request (server/frontend/textrun.py), answered as OpenAI's chunks or whole."""

    def __init__(self, front: OpenAIFrontEnd, r, queue: asyncio.Queue, stops: tuple[str, ...], chat: bool,
                 include_usage: bool):
        super().__init__(front.admission, front.tokenizer, front.metrics, PROTOCOL, r, queue, stops)
        self.front, self.chat, self.include_usage = front, chat, include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{r.request_id}"
        self.created = int(time.time())

    def _choice(self, text: str | None, finish: str | None, delta: bool, first: bool = False) -> dict:
        if self.chat:
            if delta:
                d = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
                return {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                    "logprobs": None}
        return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

    def _chunk(self, choices: list, usage: dict | None = None) -> str:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.front.model, "choices": choices}
        if self.include_usage:
            obj["usage"] = usage
        return f"data: {json.dumps(obj)}\n\n"

    async def sse(self):
        if self.chat:
            yield self._chunk([self._choice("", None, True, first=True)])
        # aclosing: closing sse() (the client left) closes events() at once, which frees the slot.
        async with contextlib.aclosing(self.events()) as events:
            async for delta in events:
                yield self._chunk([self._choice(delta, None, True)])
        if self.error is not None:
            yield f"data: {json.dumps({'error': {'message': self.error, 'type': 'server_error', 'code': 503}})}\n\n"
        else:
            yield self._chunk([self._choice(None, self.finish_reason, True)])
            if self.include_usage:
                yield self._chunk([], self.usage())
        yield "data: [DONE]\n\n"

    async def _drain(self) -> None:
        async with contextlib.aclosing(self.events()) as events:
            async for _ in events:
                pass

    async def whole(self, request: HTTPRequest, headers: dict):
        """The whole answer; a client that leaves first cancels the request (Starlette does
        not cancel a handler whose client left, so the run would hold its slot to the end)."""
        drain, gone = asyncio.ensure_future(self._drain()), asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((drain, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not drain.done():  # the client left (or this handler was cancelled): end the run
                drain.cancel()
                await asyncio.gather(drain, return_exceptions=True)
        if drain.cancelled():
            return _gone()
        drain.result()  # a front-end error inside it is raised here
        if self.error is not None:
            status = 503 if self.outcome.code == grpc.StatusCode.UNAVAILABLE else 500
            exc = HTTPError(status, "server_error" if status == 500 else "service_unavailable", self.error)
            return JSONResponse(_error_body(exc), status, headers=headers)
        return JSONResponse({"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                             "created": self.created, "model": self.front.model,
                             "choices": [self._choice(self.text, self.finish_reason, False)],
                             "usage": self.usage()}, headers=headers)
