"""The timed program: deterministic bytes, hash checks, schedules, memory plan, predictions."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from scheduler import CompileOptions, Program, SpecError, compile, get_model, parse_pool
from scheduler.program import ProgramView
from scheduler.ticks import StepKey, key_bucket

APPROX = dict(rel=1e-9, abs=1e-15)


def test_same_inputs_same_bytes(staged_program, staged_inputs):
    again = compile(*staged_inputs)
    assert again.to_json() == staged_program.to_json()
    assert again.plan_hash == staged_program.plan_hash
    assert len(staged_program.plan_hash) == 64 and int(staged_program.plan_hash, 16) >= 0


COMPILE_IN_SUBPROCESS = """
import sys
from scheduler import CompileOptions, compile, get_model, parse_pool
program = compile(get_model("llama-2-70b"), parse_pool("lpu:576"), CompileOptions(dtype="int8"))
sys.stdout.write(program.to_json())
"""


def test_fresh_process_gives_same_bytes(big_program):
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", COMPILE_IN_SUBPROCESS], capture_output=True, text=True,
                         env=env, check=True, timeout=120)
    assert out.stdout == big_program.to_json()


@pytest.mark.parametrize("change", [
    dict(options=CompileOptions(max_slots=6, max_context=64, prompt_len=40, prefill_chunk=32)),
    dict(options=CompileOptions(max_slots=4, max_context=64, prompt_len=40, prefill_chunk=16)),
    dict(options=CompileOptions(max_slots=6, max_context=64, prompt_len=41, prefill_chunk=16)),
    dict(options=CompileOptions(max_slots=6, max_context=64, prompt_len=40, prefill_chunk=16, dtype="fp16")),
    dict(options=CompileOptions(max_slots=6, max_context=64, prompt_len=40, prefill_chunk=16,
                                objective="throughput")),
    dict(pool=parse_pool("lpu:8@chain")),
    dict(model=dataclasses.replace(get_model("tiny"), num_layers=3)),
    dict(model=dataclasses.replace(get_model("tiny"), rope_theta=5e5)),  # same costs, other model
])
def test_different_inputs_different_hash(staged_program, staged_inputs, change):
    model, pool, options = staged_inputs
    model, pool, options = change.get("model", model), change.get("pool", pool), change.get("options", options)
    assert compile(model, pool, options).plan_hash != staged_program.plan_hash


def test_from_json_round_trip(program):
    text = program.to_json()
    loaded = Program.from_json(text)
    assert loaded == program
    assert loaded.to_json() == text
    assert loaded.plan_hash == program.plan_hash


def test_from_json_rejects_tampering(staged_program):
    data = json.loads(staged_program.to_json())
    data["schedules"][0]["step_s"] *= 0.5  # a faster step than compiled
    with pytest.raises(SpecError, match="plan_hash does not match"):
        Program.from_json(json.dumps(data))
    data = json.loads(staged_program.to_json())
    data["plan_hash"] = "0" * 64
    with pytest.raises(SpecError, match="plan_hash does not match"):
        Program.from_json(json.dumps(data))
    del data["plan_hash"]
    with pytest.raises(SpecError, match="plan_hash does not match"):
        Program.from_json(json.dumps(data))


def test_from_json_rejects_other_documents(staged_program):
    with pytest.raises(SpecError, match="not JSON"):
        Program.from_json("{")
    with pytest.raises(SpecError, match="schema_version must be 3"):
        Program.from_json("[]")
    data = json.loads(staged_program.to_json())
    data["schema_version"] = 1
    with pytest.raises(SpecError, match="schema_version must be 3"):
        Program.from_json(json.dumps(data))


def test_a_decode_and_a_mixed_schedule_per_bucket_and_one_prefill(program):
    buckets = program.data["buckets"]
    max_slots = program.data["options"]["max_slots"]
    assert buckets == sorted(set([1 << k for k in range(max_slots.bit_length()) if 1 << k <= max_slots]
                                 + [max_slots]))
    phases = [(s["phase"], s["batch"]) for s in program.data["schedules"]]
    assert phases == [("decode", b) for b in buckets] + [("prefill", 1)] + [("mixed", b) for b in buckets]
    for b in buckets:
        sched = program.schedule("decode", b)
        assert sched["new_tokens"] == 1 and sched["context"] == program.data["options"]["max_context"]
    prefill = program.schedule("prefill", 1)
    assert prefill["new_tokens"] == program.data["prefill_chunk"]
    with pytest.raises(KeyError):
        program.schedule("decode", max_slots + 1)
    view = program.view()
    for b in buckets:  # a slice of 4, 8, 16, ... prompt tokens; within the target unless the smallest
        mixed, decode = program.schedule("mixed", b), program.schedule("decode", b)
        assert mixed["new_tokens"] == view.slices[b] in (4, 8, 16, 32, 64, 128, 256, prefill["new_tokens"])
        assert mixed["step_s"] >= decode["step_s"]
        at_least_keys = view.step_s(StepKey("mixed", b, view.key_buckets[0], view.slices[b]))
        assert at_least_keys <= view.tick_target_s or view.slices[b] == 4


def test_the_step_table_times_every_tick_the_scheduler_can_plan(program):
    """Every plan of a random run of the program's own tick scheduler names a step the
    program times; decode and mixed steps per bucket and key bucket, prefill per slice."""
    import random

    from scheduler.ticks import Seq

    view = program.view()
    rng, sched = random.Random(0), view.tick_scheduler(max_queue=1000)
    def run_all() -> set:
        seen = set()
        while not sched.idle():
            plan = sched.schedule()
            assert view.step_s(plan.key) > 0
            seen.add(plan.key)
            sched.update(plan)
        return seen

    for i in range(40):
        sched.add(Seq(i, rng.randint(1, view.max_context // 2), rng.randint(1, view.max_context // 2)))
    seen = run_all()
    # Short prompts at once: prefill steps pack several, more tokens than their keys.
    for i in range(40, 60):
        sched.add(Seq(i, rng.randint(2, 20), 2))
    packed = run_all()
    assert any(k.phase == "prefill" and k.tokens > k.keys for k in packed) or view.prefill_chunk <= 32
    assert {k.phase for k in seen} == {"prefill", "decode", "mixed"} and {k.keys for k in seen} >= set(view.key_buckets[1:])
    keys = view.key_buckets
    assert len([k for k in view.steps if k.phase == "decode"]) == len(keys) * len(view.buckets)
    for k in keys:  # more keys, no shorter step
        assert all(view.step_s(StepKey("decode", b, k, 1)) <= view.step_s(StepKey("decode", b, keys[-1], 1))
                   for b in view.buckets)


def test_the_itl_target_picks_the_slice(tiny_program):
    opts = tiny_program.data["options"]
    model, pool = get_model(tiny_program.data["model"]["name"]), parse_pool(tiny_program.data["pool"]["description"])
    slices = []
    for target_ms in (1e-6, 1e6):
        options = CompileOptions(**{**opts, "buckets": tuple(opts["buckets"]), "itl_target_ms": target_ms})
        slices.append(compile(model, pool, options).view().slices)
    top = opts["buckets"][-1]
    assert slices[0][top] == 4 and set(slices[1].values()) == {tiny_program.data["prefill_chunk"]}
    # Below the top bucket, a slice fills the tick the top bucket's mixed step sets.
    view = tiny_program.view()
    tick = view.tick_target_s
    for b, p in view.slices.items():
        assert view.step_s(StepKey("mixed", b, view.key_buckets[0], p)) <= tick or p == 4


def test_the_view_reads_the_stages_device_kinds(program, staged_program):
    for prog in (program, staged_program):
        view = prog.view()
        assert [st.kind for st in view.stages] == [s["kind"] for s in prog.data["stages"]]
        assert view.simulated == any(s["device"] not in ("cpu", "h100", "h200", "a100") for s in prog.data["stages"])
    data = json.loads(program.to_json())
    del data["steps"]
    with pytest.raises(SpecError, match="missing or mistypes 'steps'"):
        ProgramView.parse(data)


def test_buckets_when_max_slots_is_not_a_power_of_two(staged_program):
    assert staged_program.data["buckets"] == [1, 2, 4, 6]


def _spans(sched):
    return [op for st in sched["stages"] for op in st["ops"]] + sched["transfers"]


def test_ops_are_ordered_and_do_not_overlap(program):
    layer_names = None
    for sched in program.data["schedules"]:
        names = []
        for st in sched["stages"]:
            ops = st["ops"]
            assert ops, "every stage runs something"
            for op in ops:
                assert 0.0 <= op["start_s"] <= op["end_s"]
            for a, b in zip(ops, ops[1:]):
                assert a["end_s"] <= b["start_s"] + 1e-15
            names += [op["layer"] for op in ops if op["op"] == "compute"]
        # Each layer computes exactly once per step, in model order, across the stages.
        assert names == list(dict.fromkeys(names))
        layer_names = layer_names or names
        assert names == layer_names
        # Stages run one after the other within a step.
        for a, b in zip(sched["stages"], sched["stages"][1:]):
            assert a["ops"][-1]["end_s"] <= b["ops"][0]["start_s"] + 1e-15
    assert layer_names[0] == "embed" and layer_names[-1] == "head"


def test_step_time_is_the_last_end(program):
    for sched in program.data["schedules"]:
        assert sched["step_s"] == pytest.approx(max(s["end_s"] for s in _spans(sched)), **APPROX)
        assert 0 < sched["bottleneck_s"] <= sched["step_s"]


def test_single_stage_on_one_device_has_no_transfers(tiny_program):
    assert len(tiny_program.data["stages"]) == 1
    for sched in tiny_program.data["schedules"]:
        assert sched["transfers"] == []
        assert [op["op"] for op in sched["stages"][0]["ops"]] == ["compute"] * 6  # tp=1: no collectives


def test_transfers_link_consecutive_stages(staged_program):
    stages = staged_program.data["stages"]
    assert len(stages) >= 2
    for sched in staged_program.data["schedules"]:
        hand_offs = [t for t in sched["transfers"] if t["to_stage"] == t["from_stage"] + 1]
        assert [(t["from_stage"], t["to_stage"]) for t in hand_offs] == [(k, k + 1) for k in range(len(stages) - 1)]
        for t in hand_offs:
            src, dst = sched["stages"][t["from_stage"]], sched["stages"][t["to_stage"]]
            assert t["start_s"] == pytest.approx(src["ops"][-1]["end_s"], **APPROX)
            assert t["end_s"] == pytest.approx(dst["ops"][0]["start_s"], **APPROX)
            assert t["end_s"] > t["start_s"]
            assert t["src_device"] == stages[t["from_stage"]]["devices"][1] - 1
            assert t["dst_device"] == stages[t["to_stage"]]["devices"][0]
            tokens = sched["batch"] + sched["new_tokens"] if sched["phase"] == "mixed" else \
                sched["batch"] * sched["new_tokens"]
            hidden_bytes = tokens * 128 * 2  # [T, h] bf16
            assert t["bytes"] == hidden_bytes
        # The sampled ids go back to the first stage at the end of the step.
        feedback = sched["transfers"][-1]
        assert (feedback["from_stage"], feedback["to_stage"]) == (len(stages) - 1, 0)
        assert feedback["bytes"] == (sched["batch"] + (sched["phase"] == "mixed")) * 4  # int32 ids
        assert feedback["end_s"] == pytest.approx(sched["step_s"], **APPROX)


def test_tensor_parallel_stages_run_collectives(big_program):
    sched = big_program.schedule("decode", 1)
    ops = [op["op"] for op in sched["stages"][1]["ops"]]
    assert big_program.data["stages"][1]["tp"] > 1
    assert ops.count("all_reduce") == 2 * ops.count("compute")  # after attention and after the MLP


def test_memory_plan_fits_usable_memory(program):
    plan = program.data["memory_plan"]
    assert [m["stage"] for m in plan] == [s["index"] for s in program.data["stages"]]
    for m in plan:
        assert m["total_bytes"] == pytest.approx(m["weights_bytes"] + m["kv_bytes"] + m["activation_bytes"])
        assert m["total_bytes"] <= m["usable_bytes"] <= m["capacity_bytes"]
        assert m["kv_bytes"] == m["kv_bytes_per_token"] * m["kv_slots"] * program.data["options"]["max_context"]


def test_stages_cover_every_layer_once(program):
    stages = program.data["stages"]
    num_layers = program.data["model"]["spec"]["num_layers"] + 2
    assert stages[0]["layers"][0] == 0 and stages[-1]["layers"][1] == num_layers
    for a, b in zip(stages, stages[1:]):
        assert a["layers"][1] == b["layers"][0]
        assert a["devices"][1] == b["devices"][0]
    assert program.data["devices_used"] == sum(s["tp"] for s in stages)
    assert program.data["devices_used"] <= program.data["pool"]["num_devices"]


def test_predictions(program):
    preds = program.data["predictions"]
    assert [p["batch"] for p in preds] == program.data["buckets"]
    for p in preds:
        assert {"batch", "prompt_len", "ttft_s", "tpot_s", "tokens_per_s"} <= set(p)
        assert p["prompt_len"] == program.data["options"]["prompt_len"]
        # TPOT: what a request is promised in company at the prompt's key bucket (the longest
        # decode tick and JOIN_SHARE of the mixed tick's excess), the same for every batch.
        view = program.view()
        keys = key_bucket(p["prompt_len"] + 1, view.max_context)
        # Pipelined stages tick at the longest tick (scheduler/pipeline.py).
        expected = view.cadence_s(keys) if len(view.stages) > 1 else view.company_cadence_s(keys)
        assert p["tpot_s"] == expected <= view.cadence_s(keys)
        assert p["tokens_per_s"] == pytest.approx(p["batch"] / p["tpot_s"], rel=1e-12)
        assert p["ttft_s"] > 0
        assert p["pipelined_tokens_per_s"] >= p["tokens_per_s"] * (1 - 1e-12)
    tpots = [p["tpot_s"] for p in preds]
    assert tpots == sorted(tpots), "a bigger batch never steps faster"
    throughput = [p["tokens_per_s"] for p in preds]
    assert throughput == sorted(throughput), "a bigger batch never yields fewer tokens per second"


def test_ttft_grows_with_prompt_length(program):
    table = program.data["ttft_by_prompt_len"]
    lens = [row["prompt_len"] for row in table]
    assert lens == sorted(set(lens)) and program.data["options"]["prompt_len"] in lens
    ttfts = [row["ttft_s"] for row in table]
    assert all(a < b for a, b in zip(ttfts, ttfts[1:]))


def test_larger_prompt_option_predicts_larger_ttft(staged_inputs):
    model, pool, _ = staged_inputs

    def ttft(prompt_len):
        options = CompileOptions(max_slots=6, max_context=1024, prompt_len=prompt_len, prefill_chunk=16)
        return compile(model, pool, options).data["predictions"][0]["ttft_s"]
    assert ttft(16) < ttft(100) < ttft(900)


def test_program_json_is_plain_and_sorted(staged_program):
    text = staged_program.to_json()
    assert text.endswith("\n")
    assert json.loads(text) == staged_program.data
    assert list(json.loads(text)) == sorted(staged_program.data)


def test_the_step_table_is_the_schedules_own_sums(program, staged_inputs):
    """One timing model: `Timeline.step_s` (the step table, no ops built) is exactly the
    `step_s` of the schedule with its ops, for every phase, at short and long contexts."""
    from scheduler.compiler import plan

    model, pool, options = staged_inputs
    timeline = plan(model, pool, options)
    for phase, batch, new, past in (("decode", 1, 1, 0), ("decode", 4, 1, 40), ("prefill", 1, 16, 0),
                                    ("prefill", 1, 8, 30), ("mixed", 2, 8, 20), ("mixed", 4, 4, 50)):
        sched = timeline.schedule(phase, batch, new, past)
        assert timeline.step_s(phase, batch, new, past) == sched["step_s"]
        assert timeline.step_and_bottleneck_s(phase, batch, new, past) == (sched["step_s"], sched["bottleneck_s"])
    view = program.view()
    for sched in program.data["schedules"]:  # the trace's steps at the longest context are in the table
        if sched["phase"] != "prefill":
            key = StepKey(sched["phase"], sched["batch"], view.max_context,
                          1 if sched["phase"] == "decode" else sched["new_tokens"])
            assert view.step_s(key) == sched["step_s"]
            assert view.bottlenecks[key] == sched["bottleneck_s"]
