"""Placement: layers to pipeline stages over the pool, each stage tensor-parallel over
`tp` consecutive identical devices.

Search space (what "optimal" means here): the layers [0, L) are cut into contiguous
stages; stage k runs on devices [d_k, d_k + tp_k), all of one pool group, with
d_{k+1} = d_k + tp_k (stages are adjacent, so a stage boundary is one hop); the first
stage starts at the first device of some group; devices after the last stage stay idle;
tp divides the number of attention heads; every device's weights + KV cache
(max_slots x max_context) + step workspace fit its usable memory.

Objectives, over the reference decode step (batch, context) given by the caller:
- latency: minimize the token's trip through all stages plus the feedback of the
  sampled ids to the first stage;
- throughput: minimize the slowest stage (the pipeline's steady-state interval), then
  the latency among placements within 1e-9 of that.
Ties go to the earlier start group, then to fewer devices, then to the earliest start
layer of each stage counted from the last and to smaller tp (a total order, so the same
inputs always give the same placement).

Algorithm: dynamic programming over (layers placed, next free device), O(L^2 N T) with
T tp widths; per-layer costs and memory are prefix sums, so a stage's cost is O(1) and
each (end layer, tp) step is one vectorized min over (start layer, start device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from scheduler.cost import CostModel
from scheduler.errors import FitError, SpecError

OBJECTIVES = ("latency", "throughput")
REL_TIE = 1e-9


@dataclass(frozen=True)
class Stage:
    index: int
    layer_start: int  # layers [layer_start, layer_end)
    layer_end: int
    device_start: int  # devices [device_start, device_start + tp)
    tp: int
    device: str  # DeviceSpec name

    @property
    def device_end(self) -> int:
        return self.device_start + self.tp


@dataclass(frozen=True)
class Option:
    """Costs of putting layers on one device of a width-`tp` group in pool group `group`."""

    group: int
    tp: int
    time_s: np.ndarray  # [L] seconds per layer at the reference step (compute + collectives)
    mem_bytes: np.ndarray  # [L] resident bytes per device: weights + KV for all slots
    fixed_bytes: float  # step workspace per device, reused across the stage's layers
    capacity_bytes: float
    xfer_in_s: float  # receiving the previous stage's activations (one hop)


@dataclass(frozen=True)
class StageTable:
    """Everything placement needs, as plain numbers (so brute force can check it)."""

    num_layers: int
    groups: tuple[tuple[int, int], ...]  # [start, end) device ranges
    device_names: tuple[str, ...]  # per group
    options: tuple[Option, ...]
    # feedback_s[g][d]: sending the sampled ids from device d back to group g's first device.
    feedback_s: tuple[tuple[float, ...], ...]

    @property
    def num_devices(self) -> int:
        return self.groups[-1][1]

    def feedback(self, last_device: int, first_device: int) -> float:
        g = next(g for g, (lo, _) in enumerate(self.groups) if lo == first_device)
        return self.feedback_s[g][last_device]


@dataclass(frozen=True)
class Placement:
    stages: tuple[Stage, ...]
    objective: str
    cost_s: float  # the objective's value
    latency_s: float  # reference step: all stages + transfers + feedback
    bottleneck_s: float  # slowest stage at the reference step

    @property
    def devices_used(self) -> int:
        return sum(stage.tp for stage in self.stages)


def tp_widths(num_heads: int, limit: int) -> list[int]:
    return [t for t in range(1, min(num_heads, limit) + 1) if num_heads % t == 0]


def build_table(cost: CostModel, batch: int, context: int, max_slots: int, max_context: int,
                step_tokens: int) -> StageTable:
    """Per-layer costs for every (group, tp) at the reference decode step (batch, context)."""
    ir, pool = cost.ir, cost.pool
    starts = pool.group_starts()
    groups = tuple((s, s + g.count) for s, g in zip(starts, pool.groups))
    options = []
    for gi, group in enumerate(pool.groups):
        dev = group.device
        for tp in tp_widths(ir.model.num_heads, group.count):
            per_kind: dict[str, tuple[float, float]] = {}
            times, mems = [], []
            for layer in ir.layers:
                if layer.kind not in per_kind:  # blocks are identical: cost them once
                    t = cost.layer_time(layer, dev, tp, batch, 1, context - 1)
                    m = ir.resident_bytes(layer, tp) + \
                        ir.kv_bytes_per_token_per_device(layer, tp) * max_slots * max_context
                    per_kind[layer.kind] = (t, m)
                times.append(per_kind[layer.kind][0])
                mems.append(per_kind[layer.kind][1])
            xfer = cost.transfer_time(batch * ir.handoff_bytes_per_token, dev, hops=1)
            options.append(Option(gi, tp, np.array(times), np.array(mems),
                                  ir.workspace_bytes(tp, step_tokens), dev.usable_memory_bytes, xfer))
    ids_bytes = batch * 4  # int32 token ids
    feedback = []
    for first, _ in groups:
        row, at = [], 0
        for group in pool.groups:  # per group: the sending device's links
            row += [cost.transfer_time(ids_bytes, group.device, pool.hops(d, first))
                    for d in range(at, at + group.count)]
            at += group.count
        feedback.append(tuple(row))
    names = tuple(g.device.name for g in pool.groups)
    return StageTable(len(ir.layers), groups, names, tuple(options), tuple(feedback))


def place(table: StageTable, objective: str) -> Placement:
    if objective not in OBJECTIVES:
        raise SpecError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    starts = [start for start, _ in table.groups]
    bound = math.inf
    if objective == "throughput":
        # Lexicographic: the smallest bottleneck over every start group first, then the
        # least latency among placements (from any start) within REL_TIE of it.
        bottlenecks = [found[0] for found in (_solve(table, s, combine="max") for s in starts) if found]
        if bottlenecks:
            bound = min(bottlenecks) * (1 + REL_TIE)
    best = None
    for start in starts:
        found = _solve(table, start, combine="sum", bound=bound)
        if found is not None and (best is None or found[0] < best[0] * (1 - REL_TIE)):
            best = found
    if best is None:
        raise FitError("no placement fits")  # the compiler checks capacity first with a better message
    stages = best[1]
    latency, bottleneck = evaluate(table, stages)
    cost = latency if objective == "latency" else bottleneck
    return Placement(stages, objective, cost, latency, bottleneck)


def evaluate(table: StageTable, stages: tuple[Stage, ...]) -> tuple[float, float]:
    """(latency, bottleneck) of a placement, summed directly from per-layer costs."""
    latency = bottleneck = 0.0
    for stage in stages:
        opt = _option(table, stage)
        t = float(opt.time_s[stage.layer_start:stage.layer_end].sum()) + (opt.xfer_in_s if stage.index else 0.0)
        latency += t
        bottleneck = max(bottleneck, t)
    latency += table.feedback(stages[-1].device_end - 1, stages[0].device_start)
    return latency, bottleneck


def _option(table: StageTable, stage: Stage) -> Option:
    for opt in table.options:
        lo, hi = table.groups[opt.group]
        if opt.tp == stage.tp and lo <= stage.device_start < hi:
            return opt
    raise KeyError(stage)


def _solve(table: StageTable, start: int, combine: str, bound: float = math.inf):
    """DP from device `start`. Returns (objective incl. feedback for sums, stages) or None.

    dp[i, j]: best cost of layers [0, i) on devices [start, j). Invariant: every finite
    entry is reachable by a valid chain of stages, recorded in (prev_layer, prev_tp).
    """
    L, N = table.num_layers, table.num_devices
    dp = np.full((L + 1, N + 1), np.inf)
    dp[0, start] = 0.0
    prev_layer = np.full((L + 1, N + 1), -1, dtype=np.int64)
    prev_tp = np.zeros((L + 1, N + 1), dtype=np.int64)
    prefix = [(opt, np.concatenate(([0.0], np.cumsum(opt.time_s))), np.concatenate(([0.0], np.cumsum(opt.mem_bytes))))
              for opt in table.options]
    for i2 in range(1, L + 1):
        for opt, p_time, p_mem in prefix:
            g_lo, g_hi = table.groups[opt.group]
            j_lo, j_hi = max(g_lo, start), g_hi - opt.tp  # stage starts j in [j_lo, j_hi]
            if j_lo > j_hi:
                continue
            # Layers [i, i2) fit iff p_mem[i2] - p_mem[i] + fixed <= capacity.
            lo = int(np.searchsorted(p_mem, p_mem[i2] + opt.fixed_bytes - opt.capacity_bytes, side="left"))
            if lo >= i2:
                continue
            stage_s = p_time[i2] - p_time[lo:i2]  # [W] over start layer i
            if lo == 0:
                stage_s = stage_s.copy()
                stage_s[1:] += opt.xfer_in_s
            else:
                stage_s = stage_s + opt.xfer_in_s
            stage_s = np.where(stage_s <= bound, stage_s, np.inf)
            before = dp[lo:i2, j_lo:j_hi + 1]  # [W, J]
            cand = before + stage_s[:, None] if combine == "sum" else np.maximum(before, stage_s[:, None])
            arg = np.argmin(cand, axis=0)  # first minimum: the earliest start layer
            val = cand[arg, np.arange(cand.shape[1])]
            target = dp[i2, j_lo + opt.tp:j_hi + opt.tp + 1]
            better = val < target
            if better.any():
                cols = np.nonzero(better)[0] + j_lo + opt.tp
                dp[i2, cols] = val[better]
                prev_layer[i2, cols] = arg[better] + lo
                prev_tp[i2, cols] = opt.tp
    finals = dp[L].copy()
    if combine == "sum":
        for j in np.nonzero(np.isfinite(finals))[0]:
            finals[j] += table.feedback(int(j) - 1, start)
    if not np.isfinite(finals).any():
        return None
    j_best = int(np.argmin(finals))  # first minimum: fewest devices
    return float(finals[j_best]), _backtrack(table, prev_layer, prev_tp, L, j_best)


def _backtrack(table, prev_layer, prev_tp, i, j) -> tuple[Stage, ...]:
    spans = []
    while i > 0:
        i0, tp = int(prev_layer[i, j]), int(prev_tp[i, j])
        spans.append((i0, i, j - tp, tp))
        i, j = i0, j - tp
    stages = []
    for k, (i0, i1, d0, tp) in enumerate(reversed(spans)):
        group = next(g for g, (lo, hi) in enumerate(table.groups) if lo <= d0 < hi)
        stages.append(Stage(k, i0, i1, d0, tp, table.device_names[group]))
    return tuple(stages)
