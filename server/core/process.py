"""The engine core process: the tick loop, the tick scheduler, the pacers and the executor,
alone in a process, so no gRPC, HTTP, tokenizer or metrics work shares its GIL or is
scheduled in its place (docs/architecture.md, "The engine core process").

    python -m server.core.process <to-core address> <to-front-end address> <parent pid>

Threads (vLLM V1's EngineCore layout):
- the device thread runs every torch op: building, warm-up, then the engine loop;
- the input thread receives messages (server/core/messages.py) and acts on them: admits
  (the prediction runs here, beside the tick), cancels, predicts, drains, stops;
- the output thread encodes what the others put in the outbox and sends it;
- the main thread waits, and handles signals.

No send blocks and no lock is held across one: the sockets' queues are unbounded (ZeroMQ,
high-water mark 0), only the output thread sends, and it holds no lock while it does; the
others only append to the outbox. The front end reads in its own task. So a full pipe in
either direction stalls nobody who holds something the other side needs.

Signals: SIGTERM or SIGINT asks the front end to shut the whole server down cleanly
(`Shutdown`); it drains and sends `Stop`, and the core exits 0. If the front end goes
away (its pid is no longer the parent), the core exits at once: a core is never orphaned.
A dead engine loop sends `Fatal` and exits 1; the front end ends the server as an engine
death (exit 1).
"""

from __future__ import annotations

import concurrent.futures
import gc
import os
import signal
import sys
import threading
import time

import msgspec
import zmq

from scheduler.program import Program, ProgramView
from server.config import ServeConfig
from server.core import admission
from server.core.affinity import lower_process, pin_process
from server.core.engine import Finished, Request
from server.core.messages import (Admit, Admitted, Cancel, Drain, Events, Fatal, Predict, Prediction, Ready, Refused,
                                  Shutdown, Start, Stop, ToCore)

PARENT_CHECK_S = 0.2  # how often the core checks that its front end is still there
EXIT_FATAL = 1


def sockets(ctx: zmq.Context, bind: bool, pull_address: str, push_address: str) -> tuple[zmq.Socket, zmq.Socket]:
    """(pull, push) sockets of one side of the boundary. High-water marks 0: queues are
    unbounded, so a send never blocks on a peer that does not read (the peer's memory
    grows instead, by what the other side produces: tokens and requests, kilobytes)."""
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    for sock in (pull, push):
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 2000)  # ms: what is queued at close still goes out, within a bound
    (pull.bind if bind else pull.connect)(pull_address)
    (push.bind if bind else push.connect)(push_address)
    return pull, push


class Outbox:
    """What the core's threads hand to the output thread, in order: messages and event
    tuples. `put` takes a lock for an append only; `take` waits for something to send;
    `sent` counts what went; `flush` waits (bounded) until all put so far went."""

    def __init__(self):
        lock = threading.Lock()
        self._cv = threading.Condition(lock)  # something to send
        self._went = threading.Condition(lock)  # something sent
        self._items: list = []
        self._put = 0  # items put so far
        self._sent = 0  # ... and sent

    def put(self, item) -> None:
        with self._cv:
            self._items.append(item)
            self._put += 1
            self._cv.notify()

    def __len__(self) -> int:
        return len(self._items)

    def take(self, timeout_s: float | None = None) -> list:
        with self._cv:
            if not self._items:
                self._cv.wait(timeout_s)
            items, self._items = self._items, []
        return items

    def sent(self, n: int) -> None:
        """The output thread sent `n` more items (those of its last `take`)."""
        with self._cv:
            self._sent += n
            self._went.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Waits until every item put so far was sent, at most `timeout_s`; whether it was.
        Waiting releases the GIL: the engine thread calls it before the step after a first
        token, since a compiled step holds the GIL throughout (torch's AOTInductor runner
        does not release it), and the output thread could otherwise send that token only
        after the step (docs/architecture.md, "The engine core process")."""
        with self._cv:
            target = self._put
            return self._went.wait_for(lambda: self._sent >= target, timeout_s)


class MetricsRelay:
    """The engine's metrics object in the core: each call is recorded in the outbox and
    replayed, in order, on the front end's registry (server/frontend/metrics.py)."""

    CALLS = ("observe_tick", "set_pace", "set_pace_state", "set_queue")

    def __init__(self, outbox: Outbox):
        self._outbox = outbox

    def __getattr__(self, name):
        if name not in self.CALLS:
            raise AttributeError(name)
        return lambda *args, **kwargs: self._outbox.put(("met", name, list(args) + list(kwargs.values())))


class Core:
    def __init__(self, pull: zmq.Socket, push: zmq.Socket, config: ServeConfig):
        self.pull, self.push, self.config = pull, push, config
        self.program = ProgramView.parse(Program.from_json(config.program_json).data)
        self.outbox = Outbox()
        self.engine = None
        self.requests: dict[int, Request] = {}  # rid -> request, until its end is sent
        self.done = threading.Event()  # set when the core should exit (code in self.exit_code)
        self.exit_code = 0
        self.device = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lockstep-engine")
        self.windowed: dict[int, tuple[int, float | None]] = {}  # id(request) -> (rid, time remaining) of window members

    # -- start ----------------------------------------------------------------------
    def start(self) -> None:
        from server.core.build import build_engine

        engine, executor, scale = self.device.submit(build_engine, self.config, self.program,
                                                     MetricsRelay(self.outbox)).result()
        self.engine = engine
        # Everything built so far (torch, the compiled package's runner, the program) lives as
        # long as the core: out of the collector's sight, as the front end's (server/app.py).
        # Two tick logs without it had a decode step at 2-2.4x its program time every ~95
        # ticks (gaps 98, 93 and 95; 38-44 ms against 18.1 at batch 1), as a full collection
        # walked it with the GIL held; the one after, no such beat (3 slow steps in 1166,
        # gaps 577 and 244), the steps' p99 the same (BENCHMARKS.md, "Eighteenth session").
        gc.collect()
        gc.freeze()
        engine.on_death = self._engine_died
        engine.on_group_close = self._group_closed
        if self.config.send_wait_s > 0:  # a bound (`serve --send-wait-ms`): a stuck send never stalls the engine
            engine.before_step = lambda: self.outbox.flush(self.config.send_wait_s)
        threading.Thread(target=self._send_loop, name="lockstep-core-out", daemon=True).start()
        self.outbox.put(Ready(scale, engine.factors(), os.getpid(), engine.status(),
                              compiled=executor.compiled()))
        engine.start(self.device)
        threading.Thread(target=self._receive_loop, name="lockstep-core-in", daemon=True).start()

    # -- input thread ---------------------------------------------------------------
    def _receive_loop(self) -> None:
        decoder = msgspec.msgpack.Decoder(ToCore)
        while not self.done.is_set():
            closes = self.engine.window_closes_at()
            if closes is not None:  # an admission window is open: wait for more arrivals until it closes
                left_ms = max(0, int((closes - time.perf_counter()) * 1e3 + 0.999))
                if not self.pull.poll(left_ms):
                    with self.engine._lock:
                        if self.engine.window_closes_at() == closes:
                            self.engine.close_window()
                    continue
            try:
                msg = decoder.decode(self.pull.recv())
            except zmq.ZMQError:
                return  # closed at exit
            except msgspec.DecodeError as exc:  # not ours: say so, and stop (the front end is the only peer)
                self._fatal(f"undecodable message from the front end: {exc}")
                return
            if isinstance(msg, Admit):
                self._admit(msg)
            elif isinstance(msg, Cancel):
                r = self.requests.get(msg.rid)
                if r is not None:
                    r.cancelled = True
                    self.engine.wake()
            elif isinstance(msg, Predict):
                self.outbox.put(Prediction(msg.qid, *admission.predict(self.engine, msg.prompt_len, msg.max_tokens)))
            elif isinstance(msg, Drain):
                self.engine.accepting = False
            elif isinstance(msg, Stop):
                self.engine.stop(msg.timeout_s)  # ends what is left with "shutdown"
                self._exit(0)
                return

    def _admit(self, msg: Admit) -> None:
        rid, outbox = msg.rid, self.outbox
        first = [True]

        def emit(item, tick: int, t: float) -> None:  # on the engine thread, under its lock
            if first[0]:
                first[0] = False
                if r.admitted_s is not None:
                    outbox.put(("adm", rid, r.admitted_s))
            if isinstance(item, Finished):
                self.requests.pop(rid, None)
                outbox.put(("fin", rid, item.reason, item.message, tick, t))
            else:
                outbox.put(("tok", rid, item, tick, t))

        r = Request(msg.request_id or f"rid-{rid}", msg.prompt, msg.max_tokens, msg.sampling, frozenset(msg.stop_ids), emit,
                    arrival_s=msg.arrival_s)
        # Under the engine's lock: the answer is in the outbox before the request's first
        # token can be (the engine emits under the same lock).
        with self.engine._lock:
            # The prediction runs from now; the promise counts from the front end's arrival,
            # which may be long before in a burst (the Admit waited in the socket's queue).
            waited = max(0.0, time.perf_counter() - msg.arrival_s)
            remaining = None if msg.time_remaining_s is None else msg.time_remaining_s - waited
            try:
                self.requests[rid] = r
                if admission.admit_windowed(self.engine, r):
                    # Its answer comes with its group's promise (_group_closed); the client's
                    # deadline counts from its arrival, as the promise does.
                    self.windowed[id(r)] = (rid, msg.time_remaining_s)
                    return
                # The promise counts from the front end's arrival, in the core as at the
                # front end (the engine times its overruns by it).
                admission.admit(self.engine, r, remaining)
            except admission.Refusal as exc:
                self.requests.pop(rid, None)
                outbox.put(Refused(rid, exc.code, str(exc)))
                return
            outbox.put(Admitted(rid, r.predicted_ttft_s, r.predicted_e2e_s))

    def _group_closed(self, promised: list[Request], ended: list[Request]) -> None:
        """Under the engine's lock, when an admission window closes: each member's answer.
        A member whose promised finish is past its deadline is refused now (and retired
        at the next tick); one that ended in the window (cancelled) is answered CANCELLED."""
        for r in promised:
            rid, remaining = self.windowed.pop(id(r))
            late = admission.past_deadline(r.predicted_ttft_s, r.predicted_e2e_s, remaining)
            if late is not None:
                r.cancelled = True
                self.requests.pop(rid, None)
                self.outbox.put(Refused(rid, late.code, str(late)))
            else:
                self.outbox.put(Admitted(rid, r.predicted_ttft_s, r.predicted_e2e_s))
        for r in ended:
            rid, _ = self.windowed.pop(id(r))
            self.outbox.put(Refused(rid, "CANCELLED", "request ended before its admission window closed"))

    # -- output thread --------------------------------------------------------------
    def _send_loop(self) -> None:
        encoder = msgspec.msgpack.Encoder()
        while True:
            items = self.outbox.take()
            events = None
            for item in items:
                if isinstance(item, tuple):
                    events = events or Events([], [], [], [], None)
                    kind = item[0]
                    if kind == "tok":
                        events.tokens.append(item[1:])
                    elif kind == "adm":
                        events.admitted.append(item[1:])
                    elif kind == "fin":
                        events.finished.append(item[1:])
                    else:
                        events.metrics.append(item[1:])
                    continue
                if events is not None:
                    self.push.send(encoder.encode(events))
                    events = None
                self.push.send(encoder.encode(item))
                if isinstance(item, Fatal):
                    return
            if events is not None:
                if self.engine is not None:
                    events.status = self.engine.status()
                self.push.send(encoder.encode(events))
            self.outbox.sent(len(items))

    # -- endings --------------------------------------------------------------------
    def _engine_died(self, exc: BaseException) -> None:
        """On the engine thread, after it ended every request "unavailable"."""
        self._fatal(f"engine stopped: {type(exc).__name__}: {exc}"[:300])

    def _fatal(self, why: str) -> None:
        self.outbox.put(Fatal(why))
        self._exit(EXIT_FATAL)

    def _exit(self, code: int) -> None:
        self.exit_code = code
        self.done.set()

    def on_signal(self, signum, _frame) -> None:
        if self.engine is None:  # still building: nobody to drain
            os._exit(128 + signum)
        self.outbox.put(Shutdown(f"engine core process {os.getpid()} got {signal.Signals(signum).name}"))


def main(argv: list[str]) -> int:
    to_core, to_front, parent = argv[0], argv[1], int(argv[2])
    ctx = zmq.Context()
    pull, push = sockets(ctx, False, to_core, to_front)
    start = msgspec.msgpack.decode(pull.recv(), type=Start)
    config = ServeConfig(**start.config)
    if config.core_cpus:
        pin_process(config.core_cpus)  # before the engine's threads start: they inherit it
    if config.core_nice:
        lower_process(config.core_nice)  # the same: threads inherit their creator's niceness
    core = Core(pull, push, config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, core.on_signal)
    try:
        core.start()
    except BaseException as exc:  # the front end reports it and exits 1
        push.send(msgspec.msgpack.encode(Fatal(f"engine core failed to start: {type(exc).__name__}: {exc}"[:500])))
        push.close(linger=2000)
        return EXIT_FATAL
    while not core.done.wait(PARENT_CHECK_S):
        if os.getppid() != parent:  # the front end is gone: nobody to serve
            return EXIT_FATAL
    # Let the output thread send the last events (the engine's ends), then go.
    deadline = time.monotonic() + 2.0
    while len(core.outbox) and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.01)
    push.close(linger=2000)
    return core.exit_code


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # torch's and the threads' teardown is not needed: nothing is left to clean
