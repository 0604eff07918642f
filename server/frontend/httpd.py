"""uvicorn as Lockstep's HTTP listeners run it: the OpenAI-compatible door (on the gRPC
server's event loop) and the metrics endpoint (on a loop in a thread of its own).

Two changes to uvicorn's h11 protocol bound what a client can make the server do:
`bounded_protocol` (metrics: idle connections never lock a scraper out) and
`LingeringProtocol` (the door: a refused body is not read on to its end); the door's also
stamps each request with when its first bytes came (`RECEIVED_KEY`), where its promise
counts from.
"""

from __future__ import annotations

import contextlib
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

# After answering a request whose body it did not read (413), how much more of that body
# the server takes and drops, and for how long, before it closes: enough for the answer
# to reach a client still sending (closing with unread bytes queued sends a reset, and a
# client's kernel may then drop the answer before the client reads it; nginx's "lingering
# close"), never the rest of an endless body.
LINGER_BYTES = 1 << 20
LINGER_S = 2.0
# The ASGI scope key of the perf_counter seconds at which a request's first bytes were read.
RECEIVED_KEY = "lockstep.received_s"


class SignalFreeUvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: `lockstep serve` owns SIGTERM / SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class LingeringProtocol(H11Protocol):
    """uvicorn's h11 protocol, except after an answer sent before the request's body
    ended: uvicorn would read the rest of the body and drop it, to the end however long
    it is. This one says so with a half-close (the client reads the answer, then EOF),
    drops at most LINGER_BYTES more for at most LINGER_S, then closes. Each request's scope
    carries the perf_counter seconds its first bytes were read, under RECEIVED_KEY."""

    _lingered: int | None = None  # bytes dropped since the answer; None: not lingering
    _received: float | None = None  # perf_counter s of the first bytes of a request whose headers are incomplete

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self._lingered = 0
            self.flow.resume_reading()
            if self.transport.can_write_eof():  # TCP; TLS cannot half-close
                self.transport.write_eof()
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(LINGER_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self._lingered is None:
            # A request's first bytes: when the server has it (its promise counts from here),
            # not when its handler first runs: 8 simultaneous arrivals are read in one turn
            # of the loop, but their handlers run one after another, and the last one started
            # 4-9 ms after its bytes came (bench/peer_vllm.py, c=8; BENCHMARKS.md).
            if self._received is None and self.conn.their_state is h11.IDLE:
                self._received = time.perf_counter()
            before = self.scope
            super().data_received(data)
            if self.scope is not before and self._received is not None:  # its request line and headers are in
                self.scope[RECEIVED_KEY], self._received = self._received, None
            return
        self._lingered += len(data)
        if self._lingered > LINGER_BYTES:
            self.transport.close()


def bounded_protocol(max_connections: int, idle_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the metrics endpoint's two bounds (server/frontend/metrics.py,
    MAX_CONNECTIONS and READ_TIMEOUT_S). uvicorn only times out a
    connection that has finished a response; this one also drops one that never sends a
    request, and evicts the oldest idle connection once there are too many."""
    live: dict[H11Protocol, None] = {}  # open connections, oldest first (one loop: no lock)

    class Bounded(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            live[self] = None
            if len(live) > max_connections:
                oldest = next((c for c in live if c is not self and c._idle()), None)
                if oldest is not None:  # every other one mid-request: keep them, bound by their timeouts
                    oldest.shutdown()
            self._drop_if_silent()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)  # cancels the timer
            if self.cycle is None and not self.transport.is_closing():
                self._drop_if_silent()  # request still incomplete: a slow client gets the same bound

        def connection_lost(self, exc):
            live.pop(self, None)
            super().connection_lost(exc)

        def _idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _drop_if_silent(self) -> None:
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(idle_s, self.timeout_keep_alive_handler)

    return Bounded
