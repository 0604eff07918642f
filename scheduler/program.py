"""The timed program: the compiler's output and the runtime's input.

For each decode bucket (batch 1, 2, 4, ... max_slots) and for a prefill chunk, the ordered
ops of every stage (its tensor-parallel devices run the same ops in lockstep, so a stage's
list is each of its devices' list) and the transfers on the links between stages, with
start and end times in seconds from the step's start.

Runtime contract the times assume:
- a decode step is sized for the longest context the program admits (max_context), so
  one tick's time bounds every decode step of that bucket: the lockstep cadence;
- prefill runs one sequence's chunk per step (`prefill_chunk` tokens); a prompt's chunks
  pipeline through the stages (chunk k+1 enters stage 0 while chunk k is on stage 1);
- after the last stage the sampled ids (int32) go back to the first stage's device.

Serialized as JSON with sorted keys; `plan_hash` is the SHA-256 of the canonical JSON of
everything else, so the same inputs give the same bytes and the same hash.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from scheduler.cost import CostModel
from scheduler.errors import SpecError
from scheduler.placement import Placement, Stage

SCHEMA_VERSION = 1


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

    def schedule(self, phase: str, batch: int) -> dict:
        for sched in self.data["schedules"]:
            if sched["phase"] == phase and sched["batch"] == batch:
                return sched
        raise KeyError((phase, batch))


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
        `past`; mixed: `batch` decode rows after `past` plus a prompt slice of `new` tokens."""
        mixed = phase == "mixed"
        tokens, rows = (batch + new, batch + 1) if mixed else (batch * new, batch)
        clock, stages_out, transfers, bottleneck = 0.0, [], [], 0.0
        for stage in self.stages:
            dev = self._device(stage)
            stage_start = clock
            if stage.index:
                prev = self.stages[stage.index - 1]
                end = clock + self._incoming(stage, tokens)
                transfers.append(_transfer(prev, stage, 1, tokens * self.ir.handoff_bytes_per_token, clock, end))
                clock = end
            ops = []
            for layer in self.ir.layers[stage.layer_start:stage.layer_end]:
                if mixed:
                    compute, _ = self.cost.mixed_layer_times(layer, dev, stage.tp, batch, new, past)
                    work = self.ir.mixed_work(layer, stage.tp, batch, new, past)
                else:
                    compute, _ = self.cost.layer_times(layer, dev, stage.tp, batch, new, past)
                    work = self.ir.work(layer, stage.tp, batch, new, past)
                ops.append({"op": "compute", "layer": layer.name, "start_s": clock, "end_s": clock + compute})
                clock += compute
                for coll, nbytes in work.collectives:
                    dt = self.cost.collective_time(coll, nbytes, dev, stage.tp)
                    ops.append({"op": coll, "layer": layer.name, "bytes": nbytes, "start_s": clock, "end_s": clock + dt})
                    clock += dt
            bottleneck = max(bottleneck, clock - stage_start)
            stages_out.append({"stage": stage.index, "devices": [stage.device_start, stage.device_end], "ops": ops})
        last, first = self.stages[-1], self.stages[0]
        hops = self.pool.hops(last.device_end - 1, first.device_start)
        end = clock + self.feedback_time(rows)
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
