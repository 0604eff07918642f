"""Placement is optimal: the DP agrees with brute force over the documented search space.

The brute-force enumerator below is written from placement.py's module docstring, not from
its code: layers [0, L) cut into contiguous stages; stage k on devices [d_k, d_k + tp_k)
inside one pool group; d_{k+1} = d_k + tp_k; the first stage starts at some group's first
device; memory fits when sum(mem_bytes) + fixed_bytes <= capacity_bytes. Latency = sum of
stage times (+ xfer_in_s after the first) + feedback; throughput = slowest stage, ties
(within 1e-9) broken by latency.
"""

import dataclasses
import random

import numpy as np
import pytest

from scheduler.cost import CostModel
from scheduler.devices import DeviceGroup, Pool, get_device
from scheduler.errors import FitError, SpecError
from scheduler.ir import build_ir
from scheduler.model import ModelSpec, get_model
from scheduler.placement import Option, StageTable, build_table, place, tp_widths

REL = 1e-9


def group_of(table, device):
    return next(g for g, (lo, hi) in enumerate(table.groups) if lo <= device < hi)


def all_placements(table):
    """Every valid placement, as a tuple of (layer_start, layer_end, device_start, option)."""
    by_group = {}
    for opt in table.options:
        by_group.setdefault(opt.group, []).append(opt)
    L, N = table.num_layers, table.num_devices

    def extend(layer, device, stages):
        if layer == L:
            yield tuple(stages)
            return
        if device >= N:
            return
        g = group_of(table, device)
        for opt in by_group.get(g, []):
            if device + opt.tp > table.groups[g][1]:
                continue
            for end in range(layer + 1, L + 1):
                if sum(opt.mem_bytes[layer:end]) + opt.fixed_bytes > opt.capacity_bytes:
                    continue
                stages.append((layer, end, device, opt))
                yield from extend(end, device + opt.tp, stages)
                stages.pop()

    for first, _ in table.groups:
        yield from extend(0, first, [])


def stage_times(stages):
    return [sum(float(t) for t in opt.time_s[lo:hi]) + (opt.xfer_in_s if k else 0.0)
            for k, (lo, hi, _, opt) in enumerate(stages)]


def latency_of(table, stages):
    last = stages[-1][2] + stages[-1][3].tp - 1
    return sum(stage_times(stages)) + table.feedback(last, stages[0][2])


def bottleneck_of(stages):
    return max(stage_times(stages))


def brute_force(table):
    """(best latency, best bottleneck, best latency among bottleneck-optimal), or None."""
    found = [(latency_of(table, p), bottleneck_of(p)) for p in all_placements(table)]
    if not found:
        return None
    best_latency = min(lat for lat, _ in found)
    best_bottleneck = min(b for _, b in found)
    tie_latency = min(lat for lat, b in found if b <= best_bottleneck * (1 + REL))
    return best_latency, best_bottleneck, tie_latency


def check_valid(table, placement):
    """The returned stages lie in the search space; returns them in brute-force form."""
    stages = placement.stages
    assert stages, "a placement has at least one stage"
    assert stages[0].layer_start == 0 and stages[-1].layer_end == table.num_layers
    assert stages[0].device_start in [lo for lo, _ in table.groups]
    out = []
    for k, st in enumerate(stages):
        assert st.index == k
        assert st.layer_start < st.layer_end
        if k:
            assert st.layer_start == stages[k - 1].layer_end, "layers are contiguous"
            assert st.device_start == stages[k - 1].device_end, "stages are adjacent"
        g = group_of(table, st.device_start)
        assert st.device_end <= table.groups[g][1], "a stage stays inside one group"
        assert st.device == table.device_names[g]
        [opt] = [o for o in table.options if o.group == g and o.tp == st.tp]
        mem = sum(opt.mem_bytes[st.layer_start:st.layer_end]) + opt.fixed_bytes
        assert mem <= opt.capacity_bytes, f"stage {k} does not fit: {mem} > {opt.capacity_bytes}"
        out.append((st.layer_start, st.layer_end, st.device_start, opt))
    assert placement.devices_used == sum(st.tp for st in stages)
    assert placement.latency_s == pytest.approx(latency_of(table, out), rel=REL)
    assert placement.bottleneck_s == pytest.approx(bottleneck_of(out), rel=REL)
    return out


def check_optimal(table):
    """Returns a list of mismatch descriptions (empty when place() is optimal for both objectives)."""
    expected = brute_force(table)
    if expected is None:
        for objective in ("latency", "throughput"):
            with pytest.raises(FitError):
                place(table, objective)
        return []
    best_latency, best_bottleneck, tie_latency = expected
    problems = []
    lat = place(table, "latency")
    check_valid(table, lat)
    if lat.cost_s != pytest.approx(best_latency, rel=REL):
        problems.append(f"latency: got {lat.cost_s!r}, brute force {best_latency!r}")
    thr = place(table, "throughput")
    check_valid(table, thr)
    if thr.cost_s != pytest.approx(best_bottleneck, rel=REL):
        problems.append(f"throughput: got {thr.cost_s!r}, brute force {best_bottleneck!r}")
    elif thr.latency_s != pytest.approx(tie_latency, rel=REL):
        problems.append(f"throughput tie-break: latency {thr.latency_s!r}, brute force {tie_latency!r}")
    return problems


# ---- tables from the real cost model ---------------------------------------------------------

def small_device(name="lpu", memory_bytes=1.2e6, **changes):
    return dataclasses.replace(get_device(name), memory_bytes=memory_bytes, **changes)


def real_table(model, pool, dtype="bf16", batch=1, max_slots=1, max_context=16, step_tokens=16):
    cost = CostModel(build_ir(model, dtype), pool)
    return build_table(cost, batch, max_context, max_slots, max_context, step_tokens)


THREE_BLOCKS = ModelSpec("three", vocab_size=256, hidden_size=64, intermediate_size=256, num_layers=3,
                         num_heads=4, num_kv_heads=2, max_position=256)
TWO_BLOCKS_MOE = ModelSpec("moe2", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                           num_heads=4, num_kv_heads=4, num_experts=4, experts_per_token=2,
                           max_position=256)

REAL_CASES = {
    "tiny-cpu1": (get_model("tiny"), Pool((DeviceGroup(get_device("cpu"), 1),), "full", 0.0)),
    "tiny-lpu4-small-ring": (get_model("tiny"), Pool((DeviceGroup(small_device(), 4),), "ring", 0.0)),
    "tiny-lpu8-small-chain": (get_model("tiny"), Pool((DeviceGroup(small_device(memory_bytes=0.9e6), 8),),
                                                      "chain", 0.5e-6)),
    "tiny-lpu6-small-full": (get_model("tiny"), Pool((DeviceGroup(small_device(memory_bytes=0.7e6), 6),),
                                                     "full", 0.0)),
    "three-lpu4": (THREE_BLOCKS, Pool((DeviceGroup(small_device(memory_bytes=0.15e6), 4),), "ring", 0.0)),
    "moe-lpu4": (TWO_BLOCKS_MOE, Pool((DeviceGroup(small_device(memory_bytes=0.3e6), 4),), "chain", 0.0)),
    "tiny-hetero-lpu+h100": (get_model("tiny"), Pool((DeviceGroup(small_device(memory_bytes=0.8e6), 3),
                                                      DeviceGroup(small_device("h100", memory_bytes=1.5e6), 2)),
                                                     "ring", 0.0)),
    "three-hetero-a100+lpu": (THREE_BLOCKS, Pool((DeviceGroup(small_device("a100", memory_bytes=0.2e6), 2),
                                                  DeviceGroup(small_device(memory_bytes=0.3e6), 4)),
                                                 "chain", 1e-6)),
}


@pytest.mark.parametrize("case", sorted(REAL_CASES))
def test_place_matches_brute_force_on_real_tables(case):
    model, pool = REAL_CASES[case]
    table = real_table(model, pool)
    assert table.num_layers == model.num_layers + 2
    assert check_optimal(table) == []


def test_memory_forces_several_stages():
    model, pool = REAL_CASES["tiny-lpu8-small-chain"]
    placement = place(real_table(model, pool), "latency")
    assert len(placement.stages) >= 2 or placement.stages[0].tp >= 2
    assert placement.devices_used >= 2


def test_tight_memory_raises_fit_error():
    pool = Pool((DeviceGroup(small_device(memory_bytes=0.2e6), 2),), "ring", 0.0)
    table = real_table(get_model("tiny"), pool)
    assert brute_force(table) is None
    with pytest.raises(FitError):
        place(table, "latency")


def test_build_table_options_cover_each_group_and_tp_width():
    model, pool = REAL_CASES["tiny-hetero-lpu+h100"]
    table = real_table(model, pool)
    assert table.groups == ((0, 3), (3, 5))
    assert table.device_names == ("lpu", "h100")
    assert [(o.group, o.tp) for o in table.options] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for opt in table.options:
        device = pool.groups[opt.group].device
        assert opt.capacity_bytes == device.usable_memory_bytes
        assert len(opt.time_s) == len(opt.mem_bytes) == table.num_layers
        assert (opt.time_s > 0).all() and (opt.mem_bytes > 0).all()
    # Wider tensor parallelism holds less per device.
    assert (table.options[1].mem_bytes < table.options[0].mem_bytes).all()
    assert len(table.feedback_s) == 2 and all(len(row) == 5 for row in table.feedback_s)
    assert table.feedback(0, 0) == 0.0  # a single device feeds itself for free
    assert table.feedback(4, 0) > 0


def test_tp_widths_divide_heads():
    assert tp_widths(64, 576) == [1, 2, 4, 8, 16, 32, 64]
    assert tp_widths(12, 8) == [1, 2, 3, 4, 6]
    assert tp_widths(4, 1) == [1]


# ---- random hand-built tables ----------------------------------------------------------------

def random_table(rng, group_sizes, num_layers):
    groups, at = [], 0
    for size in group_sizes:
        groups.append((at, at + size))
        at += size
    options = []
    for g, size in enumerate(group_sizes):
        widths = [t for t in (1, 2, 3, 4) if t <= size and (t == 1 or rng.random() < 0.7)]
        base_mem = [rng.randint(1, 12) for _ in range(num_layers)]
        for tp in widths:
            options.append(Option(
                group=g, tp=tp,
                time_s=np.array([rng.uniform(0.05, 1.0) for _ in range(num_layers)]),
                mem_bytes=np.array([float(-(-m // tp)) for m in base_mem]),  # integers: exact sums
                fixed_bytes=float(rng.randint(0, 3)),
                capacity_bytes=float(rng.randint(8, 30)),
                xfer_in_s=rng.uniform(0.0, 0.4),
            ))
    feedback = tuple(tuple(0.0 if d == lo else rng.uniform(0.0, 0.5) for d in range(at)) for lo, _ in groups)
    names = tuple(f"dev{g}" for g in range(len(group_sizes)))
    return StageTable(num_layers, tuple(groups), names, tuple(options), feedback)


def run_random(seeds, shape):
    problems, feasible = [], 0
    for seed in seeds:
        rng = random.Random(seed)
        group_sizes, num_layers = shape(rng)
        table = random_table(rng, group_sizes, num_layers)
        feasible += brute_force(table) is not None
        problems += [f"seed {seed} {group_sizes} L={num_layers}: {p}" for p in check_optimal(table)]
    assert feasible >= len(seeds) // 2, "the generator should mostly make placeable tables"
    return problems


def one_group(rng):
    return [rng.randint(1, 7)], rng.randint(1, 7)


def several_groups(rng):
    return [rng.randint(1, 4) for _ in range(rng.randint(2, 3))], rng.randint(1, 6)


def test_random_single_group_tables_match_brute_force():
    problems = run_random(range(150), one_group)
    assert problems == []


def test_random_multi_group_tables_latency_matches_brute_force():
    problems = run_random(range(1000, 1150), several_groups)
    assert [p for p in problems if p.split(": ", 1)[1].startswith("latency")] == []


def test_random_multi_group_tables_throughput_matches_brute_force():
    problems = run_random(range(1000, 1150), several_groups)
    assert [p for p in problems if p.split(": ", 1)[1].startswith("throughput")] == []


def _two_group_table():
    # Group 0: two devices at 2 s a layer; group 1: one device at 4/3 s a layer; all fits anywhere.
    def opt(g, t):
        return Option(g, 1, np.array([t] * 3), np.ones(3), 0.0, 100.0, 0.0)
    return StageTable(3, ((0, 2), (2, 3)), ("a", "b"), (opt(0, 2.0), opt(1, 4 / 3)), ((0.0,) * 3, (0.0,) * 3))


def test_throughput_picks_smallest_bottleneck_across_start_groups():
    placement = place(_two_group_table(), "throughput")
    assert placement.cost_s == pytest.approx(2.0)
    assert [(s.layer_start, s.layer_end, s.device_start) for s in placement.stages] == \
        [(0, 1, 0), (1, 2, 1), (2, 3, 2)]


def test_latency_on_two_group_table():
    placement = place(_two_group_table(), "latency")
    assert placement.cost_s == pytest.approx(4.0)  # all three layers on the faster device
    assert [(s.device_start, s.tp, s.device) for s in placement.stages] == [(2, 1, "b")]


def test_ties_go_to_fewer_devices_and_earlier_group():
    # Every option costs the same per layer and nothing costs to move: one device, the first, wins.
    def opt(g, tp):
        return Option(g, tp, np.full(4, 0.25), np.full(4, 1.0), 0.0, 10.0, 0.0)
    table = StageTable(4, ((0, 2), (2, 4)), ("x", "x"), (opt(0, 1), opt(0, 2), opt(1, 1), opt(1, 2)),
                       ((0.0,) * 4, (0.0,) * 4))
    placement = place(table, "latency")
    assert [(s.layer_start, s.layer_end, s.device_start, s.tp) for s in placement.stages] == [(0, 4, 0, 1)]
    # Throughput wants one layer a stage (0.25 s); the only way is all four devices from device 0.
    placement = place(table, "throughput")
    assert placement.cost_s == pytest.approx(0.25)
    assert [(s.layer_start, s.device_start, s.tp) for s in placement.stages] == \
        [(0, 0, 1), (1, 1, 1), (2, 2, 1), (3, 3, 1)]


def test_place_is_deterministic():
    rng = random.Random(7)
    table = random_table(rng, [3, 4], 6)
    assert place(table, "latency") == place(table, "latency")
    assert place(table, "throughput") == place(table, "throughput")


def test_unknown_objective():
    with pytest.raises(SpecError, match="unknown objective 'speed'"):
        place(_two_group_table(), "speed")
