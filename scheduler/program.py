"""The timed program: the compiler's output and the runtime's input.

What it holds:
- `steps`: the time of every step shape the runtime runs (`ticks.StepKey`): decode and
  mixed steps per batch bucket and attended-key bucket (128, 256, ..., max_context),
  prefill per prompt-slice shape (4, 8, ..., prefill_chunk) and key bucket. A tick is
  paced for the keys its rows attend and the prompt tokens it carries.
- `slices`: the prompt tokens each bucket's mixed step carries (its decode rows plus one
  prompt's slice), the largest that fits in `tick_target_s`.
- `schedules`: the trace: the ordered ops of every stage (tensor-parallel devices run the
  same ops in lockstep) and the transfers between stages, with start and end times in
  seconds from the step's start, for each decode and mixed bucket and the prefill chunk
  at the longest context.

Runtime contract the times assume:
- a step's rows attend to their key bucket (a power of two >= their context), so a
  step's time is bounded by its key bucket's;
- in deterministic mode every decode and mixed tick at one key bucket lasts the same
  (`ProgramView.cadence_s`): the lockstep cadence, whatever the batch;
- a prompt's chunks pipeline through the stages (chunk k+1 enters stage 0 while chunk
  k is on stage 1);
- after the last stage the sampled ids (int32) go back to the first stage's device;
- with pipelined stages, row groups' steps follow each other into the first stage one
  bottleneck apart (`ProgramView.issue_s`): each step's `bottleneck_s` is its longest stage
  (incoming transfer included), the time the stage is busy with it.

Serialized as JSON with sorted keys; `plan_hash` is the SHA-256 of the canonical JSON of
everything else, so the same inputs give the same bytes and the same hash.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from scheduler.cost import CostModel
from scheduler.devices import DEVICE_KINDS
from scheduler.errors import SpecError
from scheduler.model import ModelSpec
from scheduler.placement import Placement, Stage
from scheduler.ticks import JOIN_SHARE, StepKey, TickScheduler, company_cadence

SCHEMA_VERSION = 3  # 2: steps per key bucket and slice shape, slices, stage kinds; 3: bottleneck_s per step


def canonical_json(data) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def fingerprint(data) -> str:
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Program:
    data: dict  # the JSON document, plan_hash included

    @property
    def plan_hash(self) -> str:
        return self.data["plan_hash"]

    def to_json(self) -> str:
        return json.dumps(self.data, sort_keys=True, indent=1, allow_nan=False) + "\n"

    @staticmethod
    def from_json(text: str) -> "Program":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"program is not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            raise SpecError(f"program schema_version must be {SCHEMA_VERSION}")
        body = {k: v for k, v in data.items() if k != "plan_hash"}
        if hash_body(body) != data.get("plan_hash"):
            raise SpecError("program plan_hash does not match its contents (edited or corrupt)")
        return Program(data)

    def view(self) -> "ProgramView":
        """The typed view the runtime reads."""
        return ProgramView.parse(self.data)

    def schedule(self, phase: str, batch: int) -> dict:
        for sched in self.data["schedules"]:
            if sched["phase"] == phase and sched["batch"] == batch:
                return sched
        raise KeyError((phase, batch))


@dataclass(frozen=True)
class StageView:
    index: int
    layers: tuple[int, int]  # [start, end) of the scheduler's layer list (0 = embed, n + 1 = head)
    devices: tuple[int, int]  # [start, end) of the pool's devices
    device: str  # the pool's device name (cpu, h100, lpu, ...)
    kind: str  # cpu | gpu | simulated (DeviceSpec.kind): where the runtime runs the stage's math
    tp: int


@dataclass(frozen=True)
class ProgramView:
    """A program's JSON parsed once into the typed values the runtime reads (engine,
    server, executors, simulator): no string-key reads of the plan past `parse`.

    Tick times (docs/architecture.md, "The timing model"): `step_s(key)` is the compiled
    time of a step shape; `cadence_s(keys)` the deterministic tick that every decode and
    mixed step at that key bucket shares, whatever its batch."""

    plan_hash: str
    model: ModelSpec
    weight_dtype: str
    pool: str  # description, e.g. "lpu:576@ring"
    pool_devices: tuple[tuple[str, str, int], ...]  # (name, kind, count) per device group
    stages: tuple[StageView, ...]
    max_slots: int
    max_context: int
    prefill_chunk: int
    buckets: tuple[int, ...]
    key_buckets: tuple[int, ...]
    slices: dict  # decode bucket -> prompt tokens its mixed step carries
    steps: dict  # StepKey -> program seconds
    bottlenecks: dict  # StepKey -> program seconds of its longest stage
    tick_target_s: float
    predictions: tuple[dict, ...]  # the compile table's rows (batch, prompt_len, ttft_s, tpot_s, ...)

    @staticmethod
    def parse(data: dict) -> "ProgramView":
        try:
            opts = data["options"]
            stages = tuple(StageView(st["index"], tuple(st["layers"]), tuple(st["devices"]), st["device"], st["kind"],
                                     st["tp"]) for st in data["stages"])
            groups = tuple((g["device"]["name"], g["device"]["kind"], g["count"]) for g in data["pool"]["spec"]["groups"])
            steps = {StepKey(x["phase"], x["batch"], x["keys"], x["tokens"]): x["step_s"] for x in data["steps"]}
            bottlenecks = {StepKey(x["phase"], x["batch"], x["keys"], x["tokens"]): x["bottleneck_s"]
                           for x in data["steps"]}
            view = ProgramView(
                plan_hash=data.get("plan_hash", ""), model=ModelSpec(**data["model"]["spec"]),
                weight_dtype=data["model"]["weight_dtype"], pool=data["pool"]["description"], pool_devices=groups,
                stages=stages, max_slots=opts["max_slots"], max_context=opts["max_context"],
                prefill_chunk=data["prefill_chunk"], buckets=tuple(data["buckets"]),
                key_buckets=tuple(data["key_buckets"]), slices={x["batch"]: x["tokens"] for x in data["slices"]},
                steps=steps, bottlenecks=bottlenecks, tick_target_s=data["tick_target_s"], predictions=tuple(data.get("predictions", ())))
        except (KeyError, TypeError) as exc:
            raise SpecError(f"program is missing or mistypes {exc} (compiled by another version? "
                            f"run lockstep compile again)") from None
        if any(st.kind not in DEVICE_KINDS for st in stages):
            raise SpecError(f"program stage kinds must be one of {DEVICE_KINDS}")
        return view

    @property
    def simulated(self) -> bool:
        """Whether any stage runs on a simulated chip (its math then runs on the host)."""
        return any(st.kind == "simulated" for st in self.stages)

    def step_s(self, key: StepKey) -> float:
        return self.steps[key]

    def tick_scheduler(self, max_queue: int = 64, tick_s=None, alone_own_step: bool = False,
                       join_share: float = JOIN_SHARE) -> TickScheduler:
        """A fresh tick scheduler for this program's slots, context, buckets and slices;
        `tick_s` (paced seconds per step shape): promised cadences bound its ticks."""
        return TickScheduler(self.max_slots, self.max_context, self.prefill_chunk, self.buckets, max_queue,
                             dict(self.slices), tick_s=tick_s, alone_own_step=alone_own_step, join_share=join_share)

    def holding_bucket(self, keys: int) -> int:
        """The smallest key bucket of decode and mixed steps with at least `keys` keys (a
        prefill step's keys start lower: ticks.MIN_PROMPT_KEYS)."""
        return next(b for b in self.key_buckets if b >= keys)

    def _longest(self, keys: int, factors: dict[str, float] | None) -> tuple[float, float]:
        """(longest decode step, longest mixed step) of any bucket at key bucket `keys`, each
        times its phase's pace factor (1 without factors)."""
        f = factors or {}
        decode = max(self.steps[StepKey("decode", b, keys, 1)] * f.get("decode", 1.0) for b in self.buckets)
        mixed = max(self.steps[StepKey("mixed", b, keys, self.slices[b])] * f.get("mixed", 1.0) for b in self.buckets)
        return decode, mixed

    def cadence_s(self, keys: int, factors: dict[str, float] | None = None) -> float:
        """The longest tick any batch may run at key bucket `keys` (the pipelined engine's
        tick, and the TPOT in company at join share 1): the longest decode or mixed step of
        any bucket there. A stream promised it keeps its pace whoever joins later (a cadence
        per bucket, re-chosen as the batch grew, broke it: measured ITL p99/p50 1.50 at 2
        req/s)."""
        return max(self._longest(keys, factors))

    def company_cadence_s(self, keys: int, factors: dict[str, float] | None = None) -> float:
        """The TPOT promised in company at key bucket `keys` by serve's default join share:
        the longest decode step of any bucket and JOIN_SHARE of what the longest mixed step
        takes past it (scheduler/ticks.company_cadence)."""
        return company_cadence(*self._longest(keys, factors))

    def lone_cadence_s(self, keys: int, factors: dict[str, float] | None = None) -> float:
        """The TPOT promised at key bucket `keys` to a request that arrives alone: its own
        decode step (scheduler/simulate.promise_cadence; `cadence_s` is the one promised in
        company)."""
        return self.steps[StepKey("decode", self.buckets[0], keys, 1)] * (factors or {}).get("decode", 1.0)

    def issue_s(self, keys: int, factors: dict[str, float] | None = None) -> float:
        """With pipelined stages, how long one row group's deterministic tick at key bucket
        `keys` holds the busiest stage: the longest stage of any decode or mixed step
        there (as `cadence_s` takes the longest step), so the next group's step may enter
        the first stage that much later without ever queueing behind it. P groups then
        tick every max(cadence, P x issue) (docs/architecture.md, "Pipelined stages")."""
        f = factors or {}
        return max(self.bottlenecks[StepKey(phase, b, keys, 1 if phase == "decode" else self.slices[b])]
                   * f.get(phase, 1.0) for b in self.buckets for phase in ("decode", "mixed"))


def hash_body(body: dict) -> str:
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


class Timeline:
    """Builds schedules and predictions from a placement and the cost model."""

    def __init__(self, cost: CostModel, placement: Placement):
        self.cost = cost
        self.ir = cost.ir
        self.pool = cost.pool
        self.placement = placement
        self.stages = placement.stages

    def _device(self, stage: Stage):
        return self.pool.device_at(stage.device_start)

    def _incoming(self, stage: Stage, tokens: int) -> float:
        if stage.index == 0:
            return 0.0
        nbytes = tokens * self.ir.handoff_bytes_per_token
        return self.cost.transfer_time(nbytes, self._device(stage), hops=1)

    def stage_time(self, stage: Stage, batch: int, new: int, past: int) -> float:
        """Seconds for one stage: incoming activations + its layers (blocks costed once)."""
        dev, total, cache = self._device(stage), 0.0, {}
        for layer in self.ir.layers[stage.layer_start:stage.layer_end]:
            if layer.kind not in cache:
                cache[layer.kind] = self.cost.layer_time(layer, dev, stage.tp, batch, new, past)
            total += cache[layer.kind]
        return total + self._incoming(stage, batch * new)

    def feedback_time(self, batch: int) -> float:
        last, first = self.stages[-1], self.stages[0]
        hops = self.pool.hops(last.device_end - 1, first.device_start)
        return self.cost.transfer_time(batch * 4, self._device(last), hops)

    def schedule(self, phase: str, batch: int, new: int, past: int) -> dict:
        """One step's ops and transfers. decode/prefill: `batch` rows of `new` tokens after
        `past`; mixed: `batch` decode rows after `past` plus a prompt slice of `new` tokens;
        packed: a prefill step of `new` tokens in several prompts, each within `past` keys."""
        return self._walk(phase, batch, new, past, record=True)

    def step_s(self, phase: str, batch: int, new: int, past: int) -> float:
        """`schedule(...)["step_s"]`, the same sums, without building the ops (the step
        table times ~100 shapes per program)."""
        return self._walk(phase, batch, new, past, record=False)[0]

    def step_and_bottleneck_s(self, phase: str, batch: int, new: int, past: int) -> tuple[float, float]:
        """(`step_s`, `bottleneck_s`) of `schedule(...)`, without building the ops."""
        return self._walk(phase, batch, new, past, record=False)

    def _walk(self, phase: str, batch: int, new: int, past: int, record: bool):
        mixed = phase == "mixed"
        tokens, rows = (batch + new, batch + 1) if mixed else (batch * new, batch)
        clock, stages_out, transfers, bottleneck = 0.0, [], [], 0.0
        for stage in self.stages:
            dev = self._device(stage)
            stage_start = clock
            if stage.index:
                prev = self.stages[stage.index - 1]
                end = clock + self._incoming(stage, tokens)
                if record:
                    transfers.append(_transfer(prev, stage, 1, tokens * self.ir.handoff_bytes_per_token, clock, end))
                clock = end
            ops, costs = [], {}  # costs: layer kind -> (compute s, [(collective, bytes, s)]): kinds cost alike
            for layer in self.ir.layers[stage.layer_start:stage.layer_end]:
                if layer.kind not in costs:
                    if mixed:
                        compute, _ = self.cost.mixed_layer_times(layer, dev, stage.tp, batch, new, past)
                        work = self.ir.mixed_work(layer, stage.tp, batch, new, past)
                    elif phase == "packed":  # `past` is the keys its prompts attend at most
                        compute, _ = self.cost.packed_layer_times(layer, dev, stage.tp, new, past)
                        work = self.ir.work(layer, stage.tp, 1, new, 0)
                    else:
                        compute, _ = self.cost.layer_times(layer, dev, stage.tp, batch, new, past)
                        work = self.ir.work(layer, stage.tp, batch, new, past)
                    costs[layer.kind] = (compute, [(c, n, self.cost.collective_time(c, n, dev, stage.tp))
                                                   for c, n in work.collectives])
                compute, collectives = costs[layer.kind]
                if record:
                    ops.append({"op": "compute", "layer": layer.name, "start_s": clock, "end_s": clock + compute})
                clock += compute
                for coll, nbytes, dt in collectives:
                    if record:
                        ops.append({"op": coll, "layer": layer.name, "bytes": nbytes, "start_s": clock,
                                    "end_s": clock + dt})
                    clock += dt
            bottleneck = max(bottleneck, clock - stage_start)
            if record:
                stages_out.append({"stage": stage.index, "devices": [stage.device_start, stage.device_end],
                                   "ops": ops})
        last, first = self.stages[-1], self.stages[0]
        hops = self.pool.hops(last.device_end - 1, first.device_start)
        end = clock + self.feedback_time(rows)
        if not record:
            return end, bottleneck
        if hops:
            transfers.append(_transfer(last, first, hops, rows * 4, clock, end))
        return {"phase": phase, "batch": batch, "new_tokens": new, "context": past + (1 if mixed else new),
                "step_s": end, "bottleneck_s": bottleneck, "stages": stages_out, "transfers": transfers}

    def ttft(self, prompt_len: int, chunk: int) -> float:
        """First token of one prompt: its chunks pipelined through the stages.
        finish[k][s] = max(finish[k-1][s], finish[k][s-1]) + time(k, s)."""
        finish = [0.0] * len(self.stages)
        for k in range(math.ceil(prompt_len / chunk)):
            new = min(chunk, prompt_len - k * chunk)
            ready = 0.0  # when chunk k leaves the previous stage
            for s, stage in enumerate(self.stages):
                finish[s] = max(finish[s], ready) + self.stage_time(stage, 1, new, k * chunk)
                ready = finish[s]
        return finish[-1]


def _transfer(src: Stage, dst: Stage, hops: int, nbytes: float, start: float, end: float) -> dict:
    return {"from_stage": src.index, "to_stage": dst.index, "src_device": src.device_end - 1,
            "dst_device": dst.device_start, "hops": hops, "bytes": nbytes, "start_s": start, "end_s": end}
