"""Bearer-token auth for every RPC but the probes, and TLS credentials, for `lockstep serve`.

A client sends `authorization: Bearer <token>` as call metadata; a missing or wrong one
gets UNAUTHENTICATED before the handler runs (nothing is parsed or queued). Probes (health,
and the KServe door's ServerLive, ServerReady, ModelReady) stay open so a supervisor or
load balancer can probe without the secret.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

# Probes need no token: grpc.health, and the KServe v2 door's (server/frontend/kserve.py).
OPEN_METHODS = ("/grpc.health.v1.Health/", "/inference.GRPCInferenceService/ServerLive",
                "/inference.GRPCInferenceService/ServerReady", "/inference.GRPCInferenceService/ModelReady")
MAX_TOKEN_BYTES = 4096


def read_secret(path: str, what: str) -> bytes:
    """The file's bytes (a token's surrounding whitespace stripped); ValueError naming the
    file when it is missing, empty or too large."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} {path!r} is not a readable file")
    data = p.read_bytes()
    if what == "--auth-token-file":
        data = data.strip()
        if not data or len(data) > MAX_TOKEN_BYTES or not all(0x21 <= b <= 0x7E for b in data):
            raise ValueError(f"{what} {path!r} must hold one token of 1..{MAX_TOKEN_BYTES} printable "
                             f"ASCII characters without spaces")
    elif not data:
        raise ValueError(f"{what} {path!r} is empty")
    return data


def tls_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    """PEM certificate chain and private key -> server credentials."""
    cert, key = read_secret(cert_file, "--tls-cert"), read_secret(key_file, "--tls-key")
    return grpc.ssl_server_credentials([(key, cert)])


async def _deny_unary(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: missing or wrong bearer token")


async def _deny_stream(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: missing or wrong bearer token")
    yield  # an async generator, like the handler it stands for


# (request streaming, response streaming) -> how to make the handler that refuses, and it.
_DENY = {(False, False): (grpc.unary_unary_rpc_method_handler, _deny_unary),
         (False, True): (grpc.unary_stream_rpc_method_handler, _deny_stream),
         (True, False): (grpc.stream_unary_rpc_method_handler, _deny_unary),
         (True, True): (grpc.stream_stream_rpc_method_handler, _deny_stream)}


class BearerAuth(grpc.aio.ServerInterceptor):
    def __init__(self, token: bytes, on_denied=None):
        self._expected = b"Bearer " + token
        self._on_denied = on_denied  # called with the method's path per refused call (a metric)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        got = next((v for k, v in details.invocation_metadata or () if k == "authorization"), "")
        got = got.encode("utf-8", "replace") if isinstance(got, str) else bytes(got)
        if hmac.compare_digest(got, self._expected):  # constant time: no timing oracle on the token
            return handler
        if self._on_denied is not None:
            self._on_denied(details.method)
        make, deny = _DENY[bool(handler.request_streaming), bool(handler.response_streaming)]
        return make(deny, request_deserializer=None, response_serializer=handler.response_serializer)
