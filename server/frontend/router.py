"""Replicas behind one front end, routed by prediction (`lockstep serve --replicas N`).

Each replica is a whole Lockstep server (engine, gRPC, metrics; no HTTP) in a Ray actor of
its own, placed by a Ray placement group (one bundle per replica, spread over the nodes).
The router is the front end: the same gRPC service and OpenAI-compatible HTTP as a single
server, reaching its replicas through `RoutedAdmission` instead of an engine. Per request:

1. the request is checked here (`parse_request`, the same limits), so bad input never
   reaches a replica;
2. under one lock, each replica that is up is asked `PredictArrival` for the request's
   shape, and `scheduler.fleet.pick` chooses (lowest predicted TTFT, ties to the lowest
   index; or round-robin, or least-outstanding, for comparison). A request no replica
   can take is refused; with a deadline, only replicas whose predicted finish meets it
   are candidates, and none meeting it refuses at once (DEADLINE_EXCEEDED);
3. the request goes to the chosen replica as token ids; the lock is held until that
   replica has admitted it (its initial metadata), so the next request's predictions
   already count it;
4. its tokens stream back through the front end, which decodes, applies stop strings and
   records the outcome, as for a local engine. The replica's promise and its index go in
   the response metadata (`lockstep-replica`).

A replica whose actor dies is taken out of routing at once; its in-flight requests end
with UNAVAILABLE (the stream from it breaks); Ray restarts the actor (`max_restarts`) and
the supervisor starts its server again and puts it back. See docs/architecture.md,
"Replicas".
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import replace
from urllib.parse import urlsplit

import grpc
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from protos.lockstep.v1 import lockstep_pb2 as pb
from protos.lockstep.v1 import lockstep_pb2_grpc as pb_grpc
from scheduler.fleet import POLICIES, Candidate, pick
from server.frontend.api import Refused
from server.app import EngineActor
from server.config import NODE_IP, ServeConfig
from server.core.engine import Finished, Request, new_request_id
from server.frontend.validate import Parsed

log = logging.getLogger("lockstep.router")

PREDICT_TIMEOUT_S = 1.0  # a replica that cannot say in this long is passed over for this request
ADMIT_TIMEOUT_S = 5.0  # a chosen replica that has not admitted the request by then: refused, UNAVAILABLE
WATCH_INTERVAL_S = 0.05  # how often the supervisor looks for a replica that died (a local check)
STATUS_EVERY = 5  # and every this many looks, refreshes each replica's status (an actor call)
RESTART_BACKOFF_S = 0.5
STOP_SLACK_S = 1.0  # past a replica's own grace period, for its answer to come back
_FINISHED = {"length": "length", "stop": "stop"}


class Replica:
    def __init__(self, index: int, actor):
        self.index, self.actor = index, actor
        self.up = False
        self.target = ""
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.LockstepStub | None = None
        self.info: dict = {}
        self.status: dict = {}
        self.outstanding = 0  # routed here and not finished
        # A call to it failed UNAVAILABLE: passed over until then (perf_counter s). Ray takes
        # ~1.6 s to report a killed actor (measured); its gRPC port refuses at once.
        self.suspect_until = 0.0
        self.routed = 0
        self.restarts = 0

    async def connect(self, info: dict, metadata: tuple) -> None:
        if self.channel is not None:
            await self.channel.close()
        self.info, self.target = info, info["grpc"]
        self.channel = grpc.aio.insecure_channel(self.target)
        self.stub = pb_grpc.LockstepStub(self.channel)
        self.metadata = metadata
        self.suspect_until = 0.0
        self.up = True


class RoutedAdmission:
    """What the front ends admit through when the engines are replicas elsewhere."""

    def __init__(self, config: ServeConfig, replicas: int, policy: str = "prediction", auth_token: bytes = b""):
        if policy not in POLICIES:
            raise ValueError(f"--route must be one of {list(POLICIES)}, got {policy!r}")
        if replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {replicas}")
        self.config, self.n, self.policy = config, replicas, policy
        self.metadata = (("authorization", "Bearer " + auth_token.decode()),) if auth_token else ()
        self.replicas: list[Replica] = []
        self.accepting = False
        self._route = asyncio.Lock()
        self._turn = 0
        self._calls: dict[str, asyncio.Task] = {}  # request id -> the task reading its replica's stream
        self._supervisor: asyncio.Task | None = None
        self.pg = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, bundle: dict | None = None) -> dict:
        """Places and starts every replica; returns the first one's server info."""
        bundle = bundle or {"CPU": 1}
        self.pg = placement_group([dict(bundle) for _ in range(self.n)], strategy="SPREAD")
        await self.pg.ready()
        actor_cls = ray.remote(EngineActor)
        for i in range(self.n):
            actor = actor_cls.options(
                num_cpus=bundle.get("CPU", 1), num_gpus=bundle.get("GPU", 0), max_concurrency=1000,
                max_restarts=-1, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote()
            self.replicas.append(Replica(i, actor))
        infos = await asyncio.gather(*(self._start_replica(r) for r in self.replicas))
        self.accepting = True
        self._supervisor = asyncio.ensure_future(self._supervise())
        return infos[0]

    async def _start_replica(self, rep: Replica) -> dict:
        info = await rep.actor.start.remote(self.config)
        await rep.connect(info, self.metadata)
        rep.failed = rep.actor.wait_failed.remote()  # resolves if its engine dies; raises if its actor does
        return info

    async def _supervise(self) -> None:
        looks = 0
        while True:
            looks += 1
            for rep in self.replicas:
                try:
                    if rep.up and _done(rep.failed):
                        await self._lost(rep)
                    elif rep.up and looks % STATUS_EVERY == 0:
                        rep.status = await asyncio.wait_for(rep.actor.status.remote(), PREDICT_TIMEOUT_S)
                except Exception:  # noqa: BLE001 - never let one replica's trouble stop the watch
                    log.exception("replica %d: watch failed", rep.index)
            await asyncio.sleep(WATCH_INTERVAL_S)

    async def _lost(self, rep: Replica) -> None:
        """Out of routing now; its streams break with UNAVAILABLE; back once Ray has
        restarted its actor and its server is up again."""
        rep.up = False
        rep.restarts += 1
        log.warning("replica %d is down; restarting it", rep.index)
        try:
            await rep.failed  # the engine died but the actor lives: restart the actor
            ray.kill(rep.actor, no_restart=False)
        except Exception:  # noqa: BLE001 - the actor died: Ray restarts it by itself
            pass
        asyncio.ensure_future(self._restart(rep))

    async def _restart(self, rep: Replica) -> None:
        while self.accepting:
            try:
                await self._start_replica(rep)
                log.warning("replica %d is back at %s", rep.index, rep.target)
                return
            except Exception as exc:  # noqa: BLE001 - restarting: try again
                log.info("replica %d not back yet: %s", rep.index, type(exc).__name__)
                await asyncio.sleep(RESTART_BACKOFF_S)

    async def stop(self, grace_s: float) -> None:
        self.accepting = False
        if self._supervisor is not None:
            self._supervisor.cancel()
        stops = [asyncio.ensure_future(r.actor.stop.remote(grace_s)) for r in self.replicas if r.up]
        if stops:  # bounded: a replica that does not answer is killed below all the same
            await asyncio.wait(stops, timeout=grace_s + STOP_SLACK_S)
        for rep in self.replicas:
            if rep.channel is not None:
                await rep.channel.close()
            ray.kill(rep.actor, no_restart=True)
        if self.pg is not None:
            remove_placement_group(self.pg)

    def export(self, metrics) -> None:
        """Adds the replicas' series to the front end's `metrics` (server/frontend/metrics.py)
        and lists their /metrics for Prometheus' HTTP service discovery."""
        metrics.registry.register(ReplicaCollector(self))
        metrics.targets = self.scrape_targets

    def scrape_targets(self) -> list[dict]:
        """Each replica's own /metrics, labelled with its index (Prometheus HTTP SD): its
        engine series (ticks, steps, overruns, slots), per replica; summed by a query."""
        return [{"targets": [urlsplit(r.info["metrics"]).netloc], "labels": {"replica": str(r.index)}}
                for r in self.replicas if r.up and r.info.get("metrics")]

    # -- the admission interface (server/api.LocalAdmission) --------------------------------
    @property
    def up(self) -> bool:
        return any(r.up for r in self.replicas)

    def status(self) -> dict:
        """The replicas' last statuses (refreshed every STATUS_EVERY x WATCH_INTERVAL_S), summed."""
        up = [r.status for r in self.replicas if r.up and r.status]
        total = lambda k: sum(s.get(k, 0) for s in up)  # noqa: E731
        return {"queue_length": total("queue_length"), "running": total("running"),
                "slots_in_use": total("slots_in_use"), "max_slots": total("max_slots"), "ticks": total("ticks"),
                "overruns": total("overruns"), "accepting": self.accepting and self.up,
                "max_queue": total("max_queue"), "engine_up": self.up,
                "pace_factor": max((s.get("pace_factor", 0.0) for s in up), default=0.0),
                "repaces": total("repaces")}

    async def _ask(self, rep: Replica, prompt_tokens: int, max_tokens: int) -> pb.ArrivalPrediction | None:
        try:
            return await rep.stub.PredictArrival(pb.PredictArrivalRequest(prompt_tokens=prompt_tokens,
                                                                          max_tokens=max_tokens),
                                                 timeout=PREDICT_TIMEOUT_S, metadata=rep.metadata)
        except grpc.aio.AioRpcError as exc:
            _suspect(rep, exc)
            return None

    async def candidates(self, prompt_tokens: int, max_tokens: int, ask: bool) -> list[tuple[Candidate, float]]:
        """(Candidate, predicted e2e) for every replica that is up (and, if `ask`, answered
        PredictArrival; else TTFT inf: round-robin and least-outstanding do not ask)."""
        now = time.perf_counter()
        up = [r for r in self.replicas if r.up and r.suspect_until <= now]
        asked = (await asyncio.gather(*(self._ask(r, prompt_tokens, max_tokens) for r in up))
                 if ask else [None] * len(up))
        out = []
        for rep, a in zip(up, asked):
            if ask and a is None:
                continue
            full = a is not None and not a.admissible
            ttft = a.ttft_s if a is not None and a.admissible else math.inf
            e2e = a.e2e_s if a is not None and a.admissible else 0.0
            out.append((Candidate(rep.index, ttft, rep.outstanding, full), e2e))
        return out

    async def predict_arrival(self, prompt_tokens: int, max_tokens: int) -> pb.ArrivalPrediction:
        """The best any replica would promise now (what routing would choose)."""
        cands = [(c, e2e) for c, e2e in await self.candidates(prompt_tokens, max_tokens, ask=True) if not c.full]
        outstanding = sum(r.outstanding for r in self.replicas)
        if not self.accepting or not cands:
            return pb.ArrivalPrediction(admissible=False, outstanding=outstanding,
                                        refusal="server is shutting down" if not self.accepting
                                        else "no replica can take it now")
        c, e2e = min(cands, key=lambda x: (x[0].ttft_s, x[0].index))
        return pb.ArrivalPrediction(admissible=True, ttft_s=c.ttft_s, e2e_s=e2e, outstanding=outstanding)

    async def admit(self, parsed: Parsed, time_remaining_s: float | None,
                    arrival_s: float | None = None) -> tuple[Request, asyncio.Queue]:
        called = time.perf_counter()  # time_remaining_s counts from here
        arrival = called if arrival_s is None else arrival_s
        if not self.accepting:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "server is shutting down; not admitting")
        if not self.up:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "no replica is up; try again shortly")
        async with self._route:
            cands = await self.candidates(len(parsed.prompt), parsed.max_tokens, ask=self.policy == "prediction")
            if time_remaining_s is not None and self.policy == "prediction":
                meeting = [(c, e2e) for c, e2e in cands if not c.full and e2e <= time_remaining_s]
                if cands and not meeting and any(not c.full for c, _ in cands):
                    best = min(e2e for c, e2e in cands if not c.full)
                    raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"no replica can finish by the deadline of {time_remaining_s:.3f} s "
                                  f"(the soonest predicted finish is in {best:.3f} s)")
                cands = meeting or cands
            chosen = pick(self.policy, [c for c, _ in cands], self._turn)
            self._turn += 1
            if chosen is None:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "every replica's queue is full")
            rep = self.replicas[chosen]
            r, queue, call = await self._send(rep, parsed, arrival, called, time_remaining_s)
            r.route = {c.index: c.ttft_s for c, _ in cands}
        rep.outstanding += 1
        rep.routed += 1
        self._calls[r.request_id] = asyncio.ensure_future(self._pump(rep, r, call, queue))
        return r, queue

    async def _send(self, rep: Replica, parsed: Parsed, arrival: float, called: float,
                    time_remaining_s: float | None):
        s = parsed.sampling
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=parsed.prompt), max_tokens=parsed.max_tokens,
                                 sampling=pb.SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                                            seed=s.seed),
                                 stop_token_ids=sorted(parsed.stop_ids),
                                 request_id=parsed.request_id or new_request_id())
        sent = time.perf_counter()
        timeout = None if time_remaining_s is None else max(0.001, time_remaining_s - (sent - called))
        call = rep.stub.Generate(req, timeout=timeout, metadata=rep.metadata)
        try:
            # Bounded: routing waits for this answer with its lock held.
            md = dict(await asyncio.wait_for(call.initial_metadata(), ADMIT_TIMEOUT_S))
        except asyncio.TimeoutError:
            call.cancel()
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"replica {rep.index} did not admit the request within "
                                                       f"{ADMIT_TIMEOUT_S:g} s") from None
        except grpc.aio.AioRpcError as exc:
            _suspect(rep, exc)
            raise Refused(exc.code(), f"replica {rep.index}: {exc.details()}") from None
        if "lockstep-predicted-ttft-s" not in md:  # refused there: the status says why
            code, details = await call.code(), await call.details()
            raise Refused(code, f"replica {rep.index}: {details}")
        # The replica's promise counts from its receipt (~ the send); this one from the door's.
        ttft, e2e = (float(md[k]) + sent - arrival for k in ("lockstep-predicted-ttft-s", "lockstep-predicted-e2e-s"))
        r = Request(req.request_id, list(parsed.prompt), parsed.max_tokens, s, parsed.stop_ids, lambda *_: None,
                    arrival_s=arrival, predicted_ttft_s=ttft, predicted_e2e_s=e2e,
                    predicted_tpot_s=(e2e - ttft) / (parsed.max_tokens - 1) if parsed.max_tokens > 1 else 0.0)
        r.replica = rep.index
        return r, asyncio.Queue(), call

    async def _pump(self, rep: Replica, r: Request, call, queue: asyncio.Queue) -> None:
        """The replica's stream into the queue the front end reads, as an engine's emits."""
        try:
            async for msg in call:
                now = time.perf_counter()
                if msg.WhichOneof("kind") == "token":
                    queue.put_nowait((msg.token.id, msg.token.tick, now))
                else:
                    f = msg.finished
                    r.admitted_s = r.arrival_s + f.queue_s
                    queue.put_nowait((Finished(_FINISHED.get(f.finish_reason, "stop")), 0, now))
                    return
            queue.put_nowait((Finished("unavailable", f"replica {rep.index} ended the stream early"), 0,
                              time.perf_counter()))
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError as exc:
            _suspect(rep, exc)
            code = exc.code()
            reason = ("unavailable" if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                      else "error")
            queue.put_nowait((Finished(reason, f"replica {rep.index}: {exc.details()}"), 0, time.perf_counter()))
        finally:
            rep.outstanding -= 1
            self._calls.pop(r.request_id, None)

    def cancel(self, r: Request) -> None:
        """The client left or a stop string ended it: the call to its replica is cancelled
        (the replica frees the slot next tick)."""
        r.cancelled = True
        task = self._calls.get(r.request_id)
        if task is not None:
            task.cancel()


# How long a replica whose call failed UNAVAILABLE is passed over: longer than Ray takes to
# report a killed actor (~1.6 s measured quiet; a CI run on a loaded host picked the dead
# replica again after 1 s, a second UNAVAILABLE). A restarted replica is cleared at once on
# reconnect (Replica.connect), so this delays no comeback.
SUSPECT_S = 5.0


def _suspect(rep: Replica, exc: grpc.aio.AioRpcError) -> None:
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        rep.suspect_until = time.perf_counter() + SUSPECT_S


def _done(ref) -> bool:
    ready, _ = ray.wait([ref], timeout=0)
    return bool(ready)


class ReplicaCollector:
    """The router's per-replica series, read at scrape time: up, requests routed,
    outstanding. (Each replica's engine series are on its own /metrics.)"""

    def __init__(self, admission: RoutedAdmission):
        self.admission = admission

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily("lockstep_replica_up", "1 while a replica is in routing", labels=["replica"])
        routed = CounterMetricFamily("lockstep_replica_requests_routed", "Requests the router sent to a replica",
                                     labels=["replica"])
        outstanding = GaugeMetricFamily("lockstep_replica_outstanding", "Requests routed to a replica, not finished",
                                        labels=["replica"])
        restarts = CounterMetricFamily("lockstep_replica_restarts", "Times a replica was lost and restarted",
                                       labels=["replica"])
        for rep in self.admission.replicas:
            i = str(rep.index)
            up.add_metric([i], 1.0 if rep.up else 0.0)
            routed.add_metric([i], rep.routed)
            outstanding.add_metric([i], rep.outstanding)
            restarts.add_metric([i], rep.restarts)
        return [up, routed, outstanding, restarts]


def replica_config(config: ServeConfig, replicas: int, cluster: bool, cpus: int) -> ServeConfig:
    """A replica's server: its own ports, no HTTP (the router serves it), and an equal
    share of this host's cores when the replicas share it."""
    return replace(config, host=NODE_IP if cluster else "127.0.0.1", port=0, metrics_port=0, metrics_host="",
                   http_port=-1, tls_cert="", tls_key="",  # the router terminates TLS
                   torch_threads=config.torch_threads or max(1, cpus // replicas))
