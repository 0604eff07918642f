"""`RayExecutor`: one Ray actor per stage, chained with a Ray Compiled Graph.

Each actor builds its stage's `StageRunner`, so weights and KV cache live in the actor.
Per step the driver tensorizes the `StepBatch` (as `LocalExecutor` does) and executes the
compiled graph once: stage i runs its layers and hands a `Hop` to stage i + 1; the last
stage samples and returns the token ids. Same plan and batches give the same tokens as
`LocalExecutor`, provided both compute with the same torch thread count (see
`threads_per_actor`).

Compiled Graphs (ray >= 2.40) set up the shared-memory channels and each actor's
execution loop once, at compile time; a step then costs ~0.5 ms per hop instead of
~1.9 ms for a chain of actor calls (docs/architecture.md, "Budget").
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import ray
import torch
from ray.dag import InputNode

from server.runtime.stage import RuntimePlan, StageRunner, StageSpec
from server.runtime.sampling import SamplingParams, sample
from server.runtime.signals import exit_on_signal
from server.runtime.step import ExecutorFailed, StepBatch, StepResult, StepTensors, tensorize

# Ray's CPU count is a scheduling token, not a pin: a small share lets a 2-core host
# hold several stage actors. What really bounds CPU use is `threads_per_actor`.
ACTOR_CPUS = 0.1
WATCH_EVERY_S = 0.5  # how often the stage actors' liveness is read
READY_TIMEOUT_S = 120.0  # building a stage (weights, KV cache) in a fresh worker


@dataclass
class Hop:
    """What one stage hands the next (and the driver hands the first), host tensors only."""

    meta: StepTensors  # the step's static-shape inputs
    x: torch.Tensor  # token ids [N] into the first stage; hidden [N, h] between stages
    stage_times_s: tuple[float, ...]  # measured so far, one per stage
    sampling: tuple[SamplingParams, ...]  # one per real row, for the last stage
    sample_positions: tuple[int, ...]

    def __reduce__(self):
        # Pickling a torch tensor goes through torch.save, ~0.2 ms each (measured: 1.2 ms
        # per Hop round trip); as raw bytes a Hop round trip costs ~50-75 us.
        meta = tuple(_pack(getattr(self.meta, f.name)) for f in fields(StepTensors))
        return _unpack_hop, (meta, _pack(self.x), self.stage_times_s, self.sampling, self.sample_positions)


class _Packed(NamedTuple):
    data: bytes
    dtype: str
    shape: tuple


def _pack(value):
    if not isinstance(value, torch.Tensor):
        return value
    t = value.detach().contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # via uint8: numpy has no bf16
    return _Packed(data, str(t.dtype).removeprefix("torch."), tuple(t.shape))


def _unpack(value):
    if not isinstance(value, _Packed):
        return value
    dtype = getattr(torch, value.dtype)
    if not value.data:
        return torch.empty(value.shape, dtype=dtype)
    return torch.frombuffer(bytearray(value.data), dtype=dtype).reshape(value.shape)  # bytearray: writable, owned


def _unpack_hop(meta, x, stage_times_s, sampling, sample_positions) -> Hop:
    return Hop(StepTensors(*map(_unpack, meta)), _unpack(x), stage_times_s, sampling, sample_positions)


class Submitted(NamedTuple):
    ref: object  # the compiled graph's CompiledDAGRef
    at: float  # time.time() at submission


class StageActor:
    """A Ray actor around one `StageRunner` (wrapped with `ray.remote` in `RayExecutor`)."""

    def __init__(self, plan: RuntimePlan, stage: StageSpec, threads: int):
        exit_on_signal(f"stage actor {stage.index}")  # a SIGTERM ends it (Ray's own handler never runs)
        # One intra-op thread by default: N stage actors + the driver must fit the host's
        # cores, and oversubscribed cores ruin step-time jitter (docs/architecture.md, "Budget").
        # GPU stages only launch kernels, so one thread loses nothing there either.
        torch.set_num_threads(threads)
        if stage.device.startswith("cuda"):
            # Ray sets CUDA_VISIBLE_DEVICES to the GPU it assigned, so that GPU is cuda:0 here.
            stage = replace(stage, device="cuda:0")
        self.runner = StageRunner(plan, stage)

    def ready(self) -> int:
        """Returns once the stage is built: its scratch KV slot."""
        return self.runner.scratch_slot

    def compiled(self) -> bool:
        """Whether this stage runs compiled steps (asked before the graph is compiled)."""
        return self.runner.compiled is not None

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def forward(self, hop: Hop) -> Hop | tuple[list[int], tuple[float, ...], float]:
        out, seconds = self.runner.run(hop.x, hop.meta)
        times = hop.stage_times_s + (seconds,)
        if self.runner.is_last:
            # And when the step ended, on the wall clock (comparable across the nodes of a
            # cluster, unlike perf_counter): a pipelined step's latency without its wait to be collected.
            return sample(out, list(hop.sampling), list(hop.sample_positions)), times, time.time()
        # Channels carry host memory: a GPU stage's activation crosses to the next stage
        # through it (StageRunner.run moves it onto the next stage's device).
        return Hop(hop.meta, out.cpu(), times, hop.sampling, hop.sample_positions)


def actor_options(stage: StageSpec) -> dict:
    """What a stage's actor asks Ray for: its GPU, its simulated chip, or a CPU share."""
    options = {"num_cpus": ACTOR_CPUS}
    if stage.device.startswith("cuda"):
        options["num_gpus"] = 1
    elif stage.resource:
        options["resources"] = {stage.resource: 1}
    return options


def _demand(plan: RuntimePlan) -> Counter:
    need = Counter()
    for stage in plan.stages:
        opts = actor_options(stage)
        need["GPU"] += opts.get("num_gpus", 0)
        for name, amount in opts.get("resources", {}).items():
            need[name] += amount
    return +need  # drops zero counts


class RayExecutor:
    """Same `step` / `close` as `LocalExecutor`, with each stage in its own Ray actor.

    Args:
        plan: the runtime plan; stage i's actor asks for one GPU (cuda stages), one unit of
            `stage.resource` (simulated chips) or a CPU share.
        threads_per_actor: torch intra-op threads in each actor. CPU attention kernels
            split work by thread count, so tokens match `LocalExecutor`'s bit for bit only
            when it runs with the same count.
        step_timeout_s: the longest a step may take before `step` raises.
        in_flight: steps that may be in the stages at once (`submit` without `collect`;
            Ray's default, 10); the pipelined engine has one per row group
            (scheduler/pipeline.py). Each channel keeps this many shared-memory buffers.

    If Ray is not initialized, starts a local instance that declares the plan's simulated
    chips as custom resources; call `ray.init(address=...)` first to use a cluster.
    """

    def __init__(self, plan: RuntimePlan, *, threads_per_actor: int = 1, step_timeout_s: float = 60.0,
                 in_flight: int = 10):
        if threads_per_actor < 1:
            raise ValueError(f"threads_per_actor must be >= 1, got {threads_per_actor!r}")
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {in_flight!r}")
        self.plan = plan
        self.step_timeout_s = step_timeout_s
        self._dag, self._actors = None, []
        self._compiled = False
        self._started_ray = _init_ray(plan)
        try:
            _check_resources(plan)
            remote = ray.remote(StageActor)
            self._actors = [remote.options(**actor_options(s)).remote(plan, s, threads_per_actor)
                            for s in plan.stages]
            slots = ray.get([a.ready.remote() for a in self._actors], timeout=READY_TIMEOUT_S)
            self.scratch_slot = slots[0]
            self._compiled = all(ray.get([a.compiled.remote() for a in self._actors], timeout=READY_TIMEOUT_S))
            with InputNode() as inp:
                node = inp
                for actor in self._actors:
                    node = actor.forward.bind(node)
            self._dag = node.experimental_compile(_max_inflight_executions=in_flight)
        except BaseException:
            self.close()
            raise

    def compiled(self) -> bool:
        """Whether every stage actor runs compiled steps."""
        return self._compiled

    def watch(self, on_dead, every_s: float = WATCH_EVERY_S) -> None:
        """Calls `on_dead(why)` once, from a daemon thread, when a stage actor dies (Ray's GCS
        says DEAD), so the engine ends then rather than at its next step: an idle server
        with a dead stage would otherwise look up until a request came. A query costs ~1 ms,
        mostly waiting on the GCS."""
        from ray._private import state  # the GCS's actor table; the public state API needs the dashboard

        actors = list(self._actors)

        def run() -> None:
            while self._actors:
                for i, actor in enumerate(actors):
                    try:
                        dead = state.actors(actor._actor_id.hex()).get("State") == "DEAD"
                    except Exception:  # noqa: BLE001 - the GCS is going away with Ray: nothing to report
                        return
                    if dead and self._actors:
                        on_dead(f"stage actor {i} died")
                        return
                time.sleep(every_s)

        threading.Thread(target=run, name="lockstep-stage-watch", daemon=True).start()

    def stage_nodes(self) -> list[str]:
        """The Ray node each stage's actor runs on."""
        return ray.get([a.node_id.remote() for a in self._actors])

    def step(self, batch: StepBatch) -> StepResult:
        start = time.perf_counter()
        # ray.get spins here (see _wait_ready): polling lengthened a lone step by 5-10%
        # (measured, `small`: 58-61 -> 64-67 ms), and the unpipelined engine has nothing
        # else in the stages to take the core from.
        ids, times, _ = self._get(self.submit(batch).ref, poll=False)
        return StepResult(tuple(ids), tuple(times), time.perf_counter() - start)

    def submit(self, batch: StepBatch) -> Submitted:
        """Sends a step into the stages and returns at once (`collect` waits for it); up to
        `in_flight` steps may be in the stages together, each behind the one before it."""
        if self._dag is None:
            raise RuntimeError("RayExecutor is closed")
        meta = tensorize(batch, self.scratch_slot, self.plan.max_context)
        hop = Hop(meta, meta.tokens, (), batch.sampling, tuple(batch.sample_positions()))
        at = time.time()
        try:
            return Submitted(self._dag.execute(hop), at)
        except ray.exceptions.RayError as exc:
            raise ExecutorFailed(f"Ray executor failed: {type(exc).__name__}: {str(exc)[:300]}") from exc

    def collect(self, submitted: Submitted) -> StepResult:
        """The step's sampled ids, waiting for them if need be (without spinning: other
        steps are in the stages). `step_time_s`: from its submission to its last stage's
        end (not to this call)."""
        ids, times, ended = self._get(submitted.ref, poll=True)
        return StepResult(tuple(ids), tuple(times), max(0.0, ended - submitted.at))

    def _get(self, ref, poll: bool):
        try:
            if poll:
                _wait_ready(ref, self.step_timeout_s)
            return ray.get(ref, timeout=self.step_timeout_s)
        except ray.exceptions.RayTaskError as exc:  # a stage raised: the batch's fault, the graph lives
            raise exc.as_instanceof_cause() from None
        except ray.exceptions.RayError as exc:  # an actor died, a channel broke, a step timed out
            raise ExecutorFailed(f"Ray executor failed: {type(exc).__name__}: {str(exc)[:300]}") from exc

    def close(self) -> None:
        """Tears down the graph, then kills the actors (their devices return to Ray)."""
        try:
            if self._dag is not None:
                self._dag, dag = None, self._dag
                dag.teardown()
        finally:
            for actor in self._actors:
                ray.kill(actor)
            self._actors = []
            if self._started_ray:
                ray.shutdown()
                self._started_ray = False


# Between polls of a step's result: a tenth of the time waited so far, within these bounds
# (a poll costs this thread ~66 us and Ray's own processes some more: polling every 0.5 ms
# lengthened a 20 ms stage to 26-28 ms, every 2 ms did not).
POLL_MIN_S, POLL_MAX_S = 0.0001, 0.002


def _wait_ready(ref, timeout_s: float) -> None:
    """Waits for a compiled graph's result without spinning. `ray.get` on a CompiledDAGRef
    busy-waits: measured, 45-54 ms of the calling thread's CPU per 61 ms step of `small`
    over 2 stage actors, a whole core of a 2-core host taken from the stages (two steps in
    flight then ran 1.05x one, against 1.5x when the caller slept) and from the front end.
    A read with timeout 0 returns at once and leaves the result in place (Ray buffers it
    for `ray.get`); between reads this thread sleeps, a tenth of the time waited so far
    (at most 2 ms: a step's end is seen ~1 ms late at worst, on average). Ray keeps that read private: on a
    Ray without it, plain `ray.get` (spinning) is used."""
    dag = getattr(ref, "_dag", None)
    execute_until = getattr(dag, "_execute_until", None)
    index, channel = getattr(ref, "_execution_index", None), getattr(ref, "_channel_index", None)
    if execute_until is None or index is None:
        return
    start = time.perf_counter()
    while True:
        try:
            execute_until(index, channel, timeout=0)
            return
        except ray.exceptions.RayChannelTimeoutError:
            waited = time.perf_counter() - start
            if waited > timeout_s:
                return  # ray.get raises the timeout
            time.sleep(min(POLL_MAX_S, max(POLL_MIN_S, waited / 10)))


def _init_ray(plan: RuntimePlan) -> bool:
    """Starts a local Ray unless one is running; returns whether it did."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):  # a cluster named in the environment declares its own resources
        ray.init(log_to_driver=False)
        return True
    chips = Counter(s.resource for s in plan.stages if s.resource)
    ray.init(resources=dict(chips), include_dashboard=False, log_to_driver=False)
    return True


def _check_resources(plan: RuntimePlan) -> None:
    """Refuses up front what the cluster cannot place (Ray would wait forever)."""
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0)) for k, v in _demand(plan).items() if have.get(k, 0) < v}
    if short:
        detail = ", ".join(f"{k}: needs {v:g}, cluster has {h:g}" for k, (v, h) in sorted(short.items()))
        raise ValueError(f"the Ray cluster cannot place the plan's {len(plan.stages)} stages ({detail})")
