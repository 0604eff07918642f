"""The front end's client of the engine core process (server/core/process.py): it starts the
core, and offers the front doors the same admission interface as an engine on a thread of
this process (server/frontend/api.LocalAdmission): `admit`, `cancel`, `predict_arrival`,
`status`, `up`, `accepting`. One `_read` task on the event loop turns the core's
messages into each request's token queue, the metric calls and the answers awaited.

Sends go straight to the socket from the event loop: its queue is unbounded (high-water
mark 0), so a send never blocks, whatever the core is doing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import subprocess
import sys
import tempfile
import time

import grpc
import msgspec
import zmq
import zmq.asyncio

from protos.lockstep.v1 import lockstep_pb2 as pb
from server.config import ServeConfig
from server.core import admission
from server.core.engine import Finished, Request, new_request_id, queue_full_message
from server.core.messages import (Admit, Admitted, Cancel, Drain, Events, Fatal, Predict, Prediction, Refused,
                                  Shutdown, Start, Stop, ToFrontEnd)
from server.core.process import MetricsRelay, sockets
from server.frontend.delivery import Stream

START_TIMEOUT_S = 600.0  # building: weights, the time scale's steps, every shape warmed up (a 7B model on CPU: minutes)
EXIT_WAIT_S = 2.0  # after Stop, for the core to exit by itself before it is killed


def _core_env() -> dict:
    """The core's environment: this one, and the address of the Ray this process joined, if
    any (`--executor ray` stage actors are placed on the same cluster)."""
    env = dict(os.environ)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    return env


class CoreDied(RuntimeError):
    """The engine core process is gone (it exited, was killed, or said it cannot go on)."""


class CoreClient:
    def __init__(self, config: ServeConfig, metrics=None):
        self.config, self.metrics = config, metrics
        self.proc: subprocess.Popen | None = None
        self.time_scale = 1.0
        self.compiled = False  # every stage runs compiled steps (from Ready)
        self.pace: dict[str, float] = {}
        self.accepting = True
        self.failure: str | None = None  # why the core is gone, once it is
        self.on_death = None  # called once on the event loop with the reason (str) when the core dies
        self.on_shutdown = None  # called on the event loop when the core was signalled to stop the server
        self._status: dict = {}
        self._last_promise = (time.perf_counter(), 0.0)  # (arrival, promised TTFT) of the last request admitted
        self._requests: dict[int, Stream] = {}  # rid -> its stream, until the core ends it
        self._delivering: set[Stream] = set()  # ended in the core, tokens still held for their promised times
        self._answers: dict[int, asyncio.Future] = {}  # rid or -qid -> the core's answer
        self._rids = itertools.count()
        self._stopping = False
        self._dir = tempfile.TemporaryDirectory(prefix="lockstep-core-")  # 0700: only this user reaches the sockets
        self._ctx = zmq.asyncio.Context()
        self._encoder = msgspec.msgpack.Encoder()
        self._reader: asyncio.Task | None = None

    # -- life -----------------------------------------------------------------------
    async def start(self) -> None:
        """Starts the core and waits until it has built and warmed up its engine."""
        to_core, to_front = (f"ipc://{self._dir.name}/{name}" for name in ("to-core", "to-front"))
        self.pull, self.push = sockets(self._ctx, True, to_front, to_core)
        self.proc = subprocess.Popen([sys.executable, "-m", "server.core.process", to_core, to_front, str(os.getpid())],
                                     stdin=subprocess.DEVNULL, env=_core_env())
        self._send(Start(dataclasses.asdict(self.config)))
        decoder = msgspec.msgpack.Decoder(ToFrontEnd)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # the first message is Ready, or why not
            if await self.pull.poll(200) and (msg := decoder.decode(await self.pull.recv())):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._kill()
                raise CoreDied(f"engine core process exited with code {self.proc.returncode} before it was ready")
        if isinstance(msg, Fatal):
            self._kill()
            raise CoreDied(msg.why)
        self.time_scale, self.pace, self._status, self.compiled = msg.time_scale, msg.pace, msg.status, msg.compiled
        self._reader = asyncio.ensure_future(self._read(decoder))

    @property
    def pid(self) -> int:
        """The engine core's process."""
        return self.proc.pid if self.proc is not None else 0

    @property
    def up(self) -> bool:
        return self.failure is None

    def status(self) -> dict:
        return dict(self._status, accepting=self.accepting, engine_up=self.up)

    async def stop(self, grace_s: float) -> None:
        """Stops admitting, lets the requests in flight finish until `grace_s` is nearly
        up, then tells the core to end what is left ("shutdown") and exit; every wait is bounded."""
        deadline = time.monotonic() + grace_s
        self.drain()
        while (self._requests and self.up or self._held()) and time.monotonic() < deadline - 0.5:
            await asyncio.sleep(0.01)
        for stream in self._held():  # still delivering at the drain's end: cut short
            stream.cut(Finished("shutdown", "server is shutting down"))
        self._stopping = True
        if self.up:
            self._send(Stop(max(0.1, deadline - time.monotonic() - 0.2)))
            while self._requests and self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        await asyncio.to_thread(self._wait_exit, max(0.1, min(EXIT_WAIT_S, deadline - time.monotonic())))
        self._end_all("shutdown", "server is shutting down")
        if self._reader is not None:
            self._reader.cancel()
        self.pull.close(linger=0)
        self.push.close(linger=0)
        self._dir.cleanup()

    def _held(self) -> list[Stream]:
        """The streams the core ended whose tokens are still held for their promised times."""
        self._delivering = {s for s in self._delivering if s.delivering}
        return list(self._delivering)

    def _wait_exit(self, timeout_s: float) -> None:
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._kill()

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def drain(self) -> None:
        if self.accepting:
            self.accepting = False
            if self.up:
                self._send(Drain())

    # -- the admission interface ----------------------------------------------------
    async def admit(self, parsed, time_remaining_s: float | None,
                    arrival_s: float | None = None) -> tuple[Request, asyncio.Queue]:
        from server.frontend.api import Refused as RefusedError  # the front door's error type

        why = admission.closed(self.up, self.accepting)
        if why is not None:
            raise RefusedError(grpc.StatusCode.UNAVAILABLE, why)
        limit = self._status.get("max_slots", 0) + self._status.get("max_queue", 0)
        if limit and len(self._requests) >= limit:
            # Refused here, with no round trip: with every slot taken and the queue full the
            # core would refuse it too (measured in a 10x burst: 640 ms p50 per refusal when
            # each went through the core behind the others).
            at, ttft = self._last_promise
            raise RefusedError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               queue_full_message(self._status["max_queue"], time.perf_counter() - at, ttft))
        rid, queue = next(self._rids), asyncio.Queue()
        # emit: unused here (the core's events reach the queue through its Stream).
        r = Request(parsed.request_id or new_request_id(), parsed.prompt, parsed.max_tokens, parsed.sampling,
                    parsed.stop_ids, queue.put_nowait, arrival_s=time.perf_counter() if arrival_s is None else arrival_s)
        r.rid = rid  # what cancel() names it by
        answer = self._ask(rid)
        self._requests[rid] = Stream(r, queue, self.config.deterministic)  # before the send: its events may follow its answer at once
        # The deadline goes as seconds from the arrival, as the promise counts.
        self._send(Admit(rid, list(r.prompt), r.max_tokens, r.sampling, sorted(r.stop_ids), r.arrival_s,
                         None if time_remaining_s is None else time_remaining_s + time.perf_counter() - r.arrival_s,
                         r.request_id))
        msg = await answer
        if isinstance(msg, Refused):
            self._requests.pop(rid, None)
            raise RefusedError(grpc.StatusCode[msg.code], msg.message)
        return r, queue  # promised already, as the answer was read (_promised)

    def cancel(self, r: Request) -> None:
        r.cancelled = True
        if self.up:
            self._send(Cancel(r.rid))

    async def predict_arrival(self, prompt_tokens: int, max_tokens: int) -> pb.ArrivalPrediction:
        from server.frontend.api import arrival_prediction

        outstanding = len(self._requests)
        why = admission.closed(self.up, self.accepting, short=True)
        if why is not None:
            return arrival_prediction(0, 0, why, outstanding)
        qid = next(self._rids)
        answer = self._ask(-1 - qid)
        self._send(Predict(qid, prompt_tokens, max_tokens))
        msg = await answer
        return arrival_prediction(msg.ttft_s, msg.e2e_s, msg.refusal, outstanding)

    # -- plumbing -------------------------------------------------------------------
    def _send(self, msg) -> None:
        self.push.send(self._encoder.encode(msg), copy=False)  # HWM 0: queued, never blocks

    def _ask(self, key: int) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._answers[key] = future
        return future

    async def _read(self, decoder: msgspec.msgpack.Decoder) -> None:
        """The core's messages, in order, until it exits."""
        try:
            while True:
                if not await self.pull.poll(100):
                    if self.proc.poll() is not None:
                        self._died(f"engine core process exited with code {self.proc.returncode}")
                        return
                    continue
                if not self._dispatch(decoder.decode(await self.pull.recv())):
                    return
        except asyncio.CancelledError:
            pass

    def _dispatch(self, msg) -> bool:
        """Acts on one of the core's messages, on the event loop; False once the core died."""
        if isinstance(msg, Events):
            self._events(msg)
        elif isinstance(msg, Admitted):
            self._promised(msg)
            self._answer(msg.rid, msg)
        elif isinstance(msg, Refused):
            self._answer(msg.rid, msg)
        elif isinstance(msg, Prediction):
            self._answer(-1 - msg.qid, msg)
        elif isinstance(msg, Shutdown):
            if self.on_shutdown is not None:
                self.on_shutdown(msg.why)
        elif isinstance(msg, Fatal):
            self._died(msg.why)
            return False
        return True

    def _promised(self, msg: Admitted) -> None:
        """Puts the promise on its request as soon as it is read, before `admit` resumes: the
        request's first token may come in the very next message, and a token of a request
        with no promise yet goes out at once, unheld (seen in bench/soak.py's 720-call burst,
        where `admit` resumed behind hundreds of refusals: a first token sent at 181 ms
        against a promise of 364 ms)."""
        stream = self._requests.get(msg.rid)
        if stream is not None:
            stream.request.promise(msg.ttft_s, msg.e2e_s)
            self._last_promise = (stream.request.arrival_s, msg.ttft_s)

    def _answer(self, key: int, msg) -> None:
        future = self._answers.pop(key, None)
        if future is not None and not future.done():
            future.set_result(msg)

    def _events(self, ev: Events) -> None:
        for rid, t in ev.admitted:
            stream = self._requests.get(rid)
            if stream is not None:
                stream.request.admitted_s = t
        for rid, token, tick, t in ev.tokens:
            stream = self._requests.get(rid)
            if stream is not None:
                stream.release(token, tick, t)
        for rid, reason, message, tick, t in ev.finished:
            stream = self._requests.pop(rid, None)
            if stream is not None:
                stream.release(Finished(reason, message), tick, t)
                if stream.delivering:
                    self._delivering.add(stream)
        if self.metrics is not None:
            for name, args in ev.metrics:
                if name in MetricsRelay.CALLS:
                    getattr(self.metrics, name)(*args)
        if ev.status is not None:
            self._status = ev.status

    def _end_all(self, reason: str, message: str) -> None:
        for s in self._requests.values():
            s.cut(Finished(reason, message))
        self._requests.clear()
        for future in self._answers.values():
            if not future.done():
                future.set_result(Refused(-1, "UNAVAILABLE", f"engine stopped: {self.failure}"))
        self._answers.clear()

    def _died(self, why: str) -> None:
        if self.failure is not None:
            return
        self.failure, self.accepting = why, False
        self._end_all("unavailable", why if self._stopping else f"engine stopped: {why}")
        if not self._stopping and self.on_death is not None:
            self.on_death(why)
