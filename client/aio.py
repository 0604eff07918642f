"""An asyncio client for the Lockstep gRPC API (grpc.aio), mirroring `client.client`.

Construct it inside a running event loop (grpc.aio binds its channel to the loop).
Tokens come back as the same `TokenEvent`s with their perf_counter receive time, and
gRPC statuses as the same typed exceptions (`error_from`).
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import grpc

from client.client import Generation, TokenEvent, build_request, error_from, not_ready
from client.connect import Security
from protos.lockstep.v1 import lockstep_pb2 as pb
from protos.lockstep.v1 import lockstep_pb2_grpc as pb_grpc


def _token_event(t: pb.Token) -> TokenEvent:
    return TokenEvent(t.id, t.text, t.index, time.perf_counter(), t.tick, t.sent_unix_s)


class AsyncLockstepClient:
    """`security`: TLS roots, a server-name override and a bearer token (client/connect.py);
    by default a plaintext channel without a token."""

    def __init__(self, target: str, security: Security = Security()):
        self.target, self.security = target, security
        self.channel = security.aio_channel(target)
        self.stub = pb_grpc.LockstepStub(self.channel)
        self._metadata = security.metadata

    async def generate(self, prompt: str | list[int], max_tokens: int, timeout: float | None = None,
                       **kwargs) -> Generation:
        """Streams one generation to the end and returns it, with receive times."""
        start = time.perf_counter()
        call = self.stub.Generate(build_request(prompt, max_tokens, **kwargs), timeout=timeout,
                                  metadata=self._metadata)
        try:
            meta = dict(await call.initial_metadata())
            gen = Generation(meta.get("lockstep-request-id", ""), start,
                             float(meta.get("lockstep-predicted-ttft-s", "nan")),
                             float(meta.get("lockstep-predicted-e2e-s", "nan")))
            async for msg in call:
                if msg.WhichOneof("kind") == "token":
                    gen.tokens.append(_token_event(msg.token))
                else:
                    gen.finished = msg.finished
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        return gen

    async def stream(self, prompt: str | list[int], max_tokens: int, timeout: float | None = None,
                     **kwargs) -> AsyncIterator[TokenEvent | pb.Finished]:
        """Yields each token as a `TokenEvent` as it arrives, then the closing `pb.Finished`.
        Leaving the loop early cancels the call (the server frees the slot)."""
        call = self.stub.Generate(build_request(prompt, max_tokens, **kwargs), timeout=timeout,
                                  metadata=self._metadata)
        try:
            async for msg in call:
                yield _token_event(msg.token) if msg.WhichOneof("kind") == "token" else msg.finished
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        finally:
            call.cancel()  # a no-op once the stream has ended

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        try:
            return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from(exc) from None

    async def status(self, timeout: float | None = None) -> pb.ServerStatus:
        try:
            return await self.stub.GetServerStatus(pb.GetServerStatusRequest(), timeout=timeout,
                                                   metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from(exc) from None

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until the channel connects (TLS handshake included); `NotReady` with the last
        connection error after `timeout_s`."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout_s)
        except asyncio.TimeoutError:
            err = not_ready(self.target, timeout_s, await self._last_error())
            if err is not None:
                raise err from None

    async def _last_error(self) -> grpc.RpcError | None:
        try:
            await self.stub.GetServerStatus(pb.GetServerStatusRequest(), timeout=5, metadata=self._metadata)
        except grpc.RpcError as exc:
            return exc
        return None

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncLockstepClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
