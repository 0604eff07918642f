"""`compile()`: model + pool + options -> timed Program."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field

from scheduler.cost import Calibration, CostModel
from scheduler.devices import Pool
from scheduler.errors import FitError, SpecError
from scheduler.ir import build_ir
from scheduler.model import ModelSpec, activation_dtype, check_dtype
from scheduler.placement import OBJECTIVES, build_table, place
from scheduler.program import SCHEMA_VERSION, Program, ProgramView, Timeline, fingerprint, hash_body
from scheduler.ticks import MIN_PROMPT_KEYS, key_bucket, key_buckets, prompt_keys, slice_sizes


@dataclass(frozen=True)
class CompileOptions:
    dtype: str = "bf16"  # weight dtype: fp32 | bf16 | fp16 | int8
    max_slots: int = 8  # KV slots: sequences decoded at once; decode buckets go up to it
    max_context: int = 2048  # tokens per slot (prompt + output); KV is preallocated for it
    prefill_chunk: int = 256  # prompt tokens per prefill step
    prompt_len: int = 128  # prompt length the predictions table is for
    objective: str = "latency"  # latency | throughput
    buckets: tuple[int, ...] = field(default=())  # decode batch sizes; () = powers of two + max_slots
    # The tick every decode bucket shares, ms: each bucket's mixed step (its decode rows + a
    # prompt slice) carries the largest slice that fits in it; 0: the largest bucket's
    # decode step x MIXED_STEP_FACTOR.
    itl_target_ms: float = 0.0

    def __post_init__(self):
        check_dtype(self.dtype)
        for name in ("max_slots", "max_context", "prefill_chunk", "prompt_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpecError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not (isinstance(self.itl_target_ms, (int, float)) and 0 <= self.itl_target_ms < float("inf")):
            raise SpecError(f"itl-target-ms must be a finite number >= 0, got {self.itl_target_ms!r}")
        if self.objective not in OBJECTIVES:
            raise SpecError(f"unknown objective {self.objective!r}; expected one of {', '.join(OBJECTIVES)}")
        if self.prompt_len >= self.max_context:
            raise SpecError(f"prompt-len {self.prompt_len} must be below max-context {self.max_context}")
        if not self.buckets:
            sizes = [1 << k for k in range(self.max_slots.bit_length()) if 1 << k <= self.max_slots]
            object.__setattr__(self, "buckets", tuple(sorted(set(sizes + [self.max_slots]))))
        elif (any(not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= self.max_slots for b in self.buckets)
              or list(self.buckets) != sorted(set(self.buckets))):
            raise SpecError(f"buckets {self.buckets} must be increasing, each in 1..max-slots {self.max_slots}")

    @property
    def reference_batch(self) -> int:
        """The decode batch placement optimizes: 1 for latency, the largest for throughput."""
        return 1 if self.objective == "latency" else self.max_slots

    @property
    def step_tokens(self) -> int:
        """Tokens in the largest step (a mixed step: max_slots decode rows + a slice of at
        most one prefill chunk): sizes the workspace."""
        return self.max_slots + self.prefill_chunk


def plan(model: ModelSpec, pool: Pool, options: CompileOptions = CompileOptions(),
         calibration: Calibration | None = None) -> Timeline:
    """Validates, applies the calibration, places; the Timeline predicts any step."""
    if options.max_context > model.max_position:
        raise SpecError(f"max-context {options.max_context} exceeds {model.name}'s "
                        f"max_position {model.max_position}")
    ir = build_ir(model, options.dtype)
    if calibration is not None:
        if calibration.model_fingerprint and calibration.model_fingerprint != fingerprint(model.to_dict()):
            raise SpecError(f"the calibration was measured for another model than {model.name} "
                            f"(run lockstep calibrate --model {model.name})")
        pool = dataclasses.replace(pool, groups=tuple(
            dataclasses.replace(g, device=calibration.apply_to(g.device)) for g in pool.groups))
    cost = CostModel(ir, pool, calibration)
    _check_capacity(ir, pool, options)
    table = build_table(cost, options.reference_batch, options.max_context, options.max_slots,
                        options.max_context, options.step_tokens)
    try:
        placement = place(table, options.objective)
    except FitError:
        raise FitError(f"{model.name} {options.dtype} does not fit on {pool.describe()}: no layout of whole "
                       f"layers over tensor-parallel groups fits each device's memory "
                       f"(try more devices or a smaller --max-slots / --max-context)") from None
    return Timeline(cost, placement)


def compile(model: ModelSpec, pool: Pool, options: CompileOptions = CompileOptions(),
            calibration: Calibration | None = None) -> Program:
    timeline = plan(model, pool, options, calibration)
    placement, pool, ir = timeline.placement, timeline.pool, timeline.ir
    chunk = min(options.prefill_chunk, options.max_context)
    keys = key_buckets(options.max_context)
    tick, slices = _choose_slices(timeline, options, chunk, keys[0])
    steps = _step_table(timeline, options, chunk, keys, slices)
    # The trace: every step's ops, at the longest context (the worst case of each shape).
    last = options.max_context - 1
    schedules = [timeline.schedule("decode", b, 1, last) for b in options.buckets]
    schedules.append(timeline.schedule("prefill", 1, chunk, options.max_context - chunk))
    schedules += [timeline.schedule("mixed", b, slices[b], last) for b in options.buckets]
    body = {
        "schema_version": SCHEMA_VERSION,
        "model": {"name": model.name, "fingerprint": fingerprint(model.to_dict()), "spec": model.to_dict(),
                  "num_params": model.num_params, "weight_dtype": options.dtype,
                  "act_dtype": activation_dtype(options.dtype)},
        "pool": {"description": pool.describe(), "fingerprint": fingerprint(pool.to_dict()),
                 "num_devices": pool.num_devices, "spec": pool.to_dict()},
        "options": {**asdict(options), "buckets": list(options.buckets)},
        "calibration": None if calibration is None else
        {"device": calibration.device, "source": calibration.source, "fingerprint": fingerprint(calibration.to_json())},
        "objective": {"name": options.objective, "value_s": placement.cost_s,
                      "reference_step": {"batch": options.reference_batch, "context": options.max_context}},
        "devices_used": placement.devices_used,
        "stages": [_stage_json(ir, pool, s) for s in placement.stages],
        "memory_plan": [_memory_json(ir, pool, s, options) for s in placement.stages],
        "buckets": list(options.buckets),
        "prefill_chunk": chunk,
        "key_buckets": keys,
        "tick_target_s": tick,
        "slices": [{"batch": b, "tokens": slices[b]} for b in options.buckets],
        "steps": steps,
        "schedules": schedules,
        "ttft_by_prompt_len": [{"prompt_len": p, "ttft_s": timeline.ttft(p, chunk)}
                               for p in _prompt_lens(options)],
    }
    body["predictions"] = _predictions(body, timeline, options, chunk, len(placement.stages))
    return Program({**body, "plan_hash": hash_body(body)})


def _check_capacity(ir, pool: Pool, options: CompileOptions) -> None:
    """A lower bound on devices from memory alone, for a message that says how many are needed."""
    weights = sum(ir.resident_bytes(layer, 1) for layer in ir.layers)
    kv = ir.kv_bytes_per_token * options.max_slots * options.max_context
    need = weights + kv
    have = sum(g.device.usable_memory_bytes * g.count for g in pool.groups)
    if need > have:
        big = max(pool.groups, key=lambda g: g.device.usable_memory_bytes).device
        at_least = math.ceil(need / big.usable_memory_bytes)
        raise FitError(f"{ir.model.name} {options.dtype} needs at least {at_least} x {big.name} "
                       f"({need / 1e9:.1f} GB of weights and KV cache); the pool has {pool.num_devices}")


def _stage_json(ir, pool: Pool, stage) -> dict:
    return {"index": stage.index, "layers": [stage.layer_start, stage.layer_end],
            "first_layer": ir.layers[stage.layer_start].name, "last_layer": ir.layers[stage.layer_end - 1].name,
            "devices": [stage.device_start, stage.device_end], "device": stage.device,
            "kind": pool.device_at(stage.device_start).kind, "tp": stage.tp}


def _memory_json(ir, pool: Pool, stage, options: CompileOptions) -> dict:
    """Bytes on EACH device of the stage (its tp devices hold equal shares)."""
    layers = ir.layers[stage.layer_start:stage.layer_end]
    weights = sum(ir.resident_bytes(layer, stage.tp) for layer in layers)
    kv_per_token = sum(ir.kv_bytes_per_token_per_device(layer, stage.tp) for layer in layers)
    kv = kv_per_token * options.max_slots * options.max_context
    work = ir.workspace_bytes(stage.tp, options.step_tokens)
    device = pool.device_at(stage.device_start)
    return {"stage": stage.index, "devices": [stage.device_start, stage.device_end],
            "weights_bytes": weights, "kv_bytes": kv, "kv_slots": options.max_slots,
            "kv_bytes_per_token": kv_per_token, "activation_bytes": work, "total_bytes": weights + kv + work,
            "usable_bytes": device.usable_memory_bytes, "capacity_bytes": device.memory_bytes}


def _predictions(body: dict, timeline: Timeline, options: CompileOptions, chunk: int, num_stages: int) -> list:
    """Per decode bucket, for a `prompt_len` prompt on an idle server: TTFT, and the TPOT
    promised (docs/architecture.md, "Promises per request"): in company, the longest decode
    tick and half the mixed tick's excess (ticks.JOIN_SHARE; pipelined: the longest tick)
    (`serve --alone-tpot own` promises a lone request its own
    decode step, which the summary shows beside it)."""
    view = ProgramView.parse(body)
    ttft = timeline.ttft(options.prompt_len, chunk)
    keys = key_bucket(options.prompt_len + 1, options.max_context)
    issue = view.issue_s(keys)
    out = []
    for b in options.buckets:
        # Pipelined: m row groups of b in flight, each ticking every max(tick, m x issue),
        # as the pipelined engine paces them (scheduler/pipeline.py) at the longest tick.
        m = max(1, min(num_stages, options.max_slots // b))
        tpot = view.cadence_s(keys) if num_stages > 1 else view.company_cadence_s(keys)
        interval = max(tpot, m * issue) if num_stages > 1 else tpot
        out.append({"batch": b, "prompt_len": options.prompt_len, "ttft_s": ttft, "tpot_s": tpot,
                    "tokens_per_s": b / tpot, "tokens_per_s_per_user": 1 / tpot,
                    "pipelined_tokens_per_s": m * b / interval})
    return out


# Default tick target: the largest bucket's decode step at the smallest key bucket, plus 35%.
# With 25%, smollm2-135m here got 4-token slices at buckets 4 and 8 (a 35-token prompt
# beside running streams: 9 ticks); with 35%, 8-token slices for a 3% longer company tick
# (53.1 -> 54.9 ms program): at 2 req/s (gamma, shape 4) first tokens 34-49% sooner at p50,
# two servers side by side (bench/tick_target.py, BENCHMARKS.md). A full house
# (scheduler/simulate.group_cadence) decodes at the decode tick either way.
MIXED_STEP_FACTOR = 1.35


def _choose_slices(timeline: Timeline, options: CompileOptions, chunk: int, keys: int) -> tuple[float, dict[int, int]]:
    """(tick s, bucket -> prompt slice), at the smallest key bucket. Every bucket shares
    one tick (see `ProgramView.cadence_s`): the largest bucket's mixed step with the
    largest slice (4, 8, ..., chunk) within the target (--itl-target-ms, else
    MIXED_STEP_FACTOR x its decode step; the smallest slice where none fits) sets it, and
    every smaller bucket carries the largest slice that fits in that tick, so a lone
    stream's prompt goes in faster without lengthening anyone's tick."""
    def fill(b: int, limit: float) -> int:
        fits = [p for p in slice_sizes(chunk) if timeline.step_s("mixed", b, p, keys - 1) <= limit]
        return fits[-1] if fits else slice_sizes(chunk)[0]

    top = options.buckets[-1]
    decode = timeline.step_s("decode", top, 1, keys - 1)
    target = options.itl_target_ms / 1e3 or MIXED_STEP_FACTOR * decode
    slices = {top: fill(top, target)}
    tick = max(decode, timeline.step_s("mixed", top, slices[top], keys - 1))
    slices.update({b: fill(b, tick) for b in options.buckets[:-1]})
    return tick, slices


def _step_table(timeline: Timeline, options: CompileOptions, chunk: int, keys: list[int],
                slices: dict[int, int]) -> list[dict]:
    """Seconds of every step shape the runtime runs (ticks.StepKey): decode and mixed per
    bucket and key bucket, prefill per slice shape and key bucket, from MIN_PROMPT_KEYS
    (the slice ending at the bucket's last key)."""
    time = timeline.step_and_bottleneck_s
    rows = []
    for k in keys:
        for b in options.buckets:
            rows.append(("decode", b, k, 1, *time("decode", b, 1, k - 1)))
            rows.append(("mixed", b, k, slices[b], *time("mixed", b, slices[b], k - 1)))
    # Every slice shape at every key bucket: a step packing several prompts may hold more
    # tokens than its keys (three 21-token prompts: a 64-token step at 32 keys), costed as
    # such (CostModel.packed_layer_times), else as the slice ending at the bucket's last key.
    for k in key_buckets(options.max_context, MIN_PROMPT_KEYS):
        rows += [("prefill", 1, k, p, *(time("packed", 1, p, k) if k < prompt_keys(p, options.max_context)
                                        else time("prefill", 1, p, k - p))) for p in slice_sizes(chunk)]
    return [{"phase": ph, "batch": b, "keys": k, "tokens": t, "step_s": s, "bottleneck_s": neck}
            for ph, b, k, t, s, neck in sorted(rows)]


def _prompt_lens(options: CompileOptions) -> list[int]:
    lens = {options.prompt_len}
    p = 16
    while p < options.max_context:
        lens.add(p)
        p *= 2
    return sorted(lens)
