"""compile(): the demo fits, oversized models fail with a useful count, options validate."""

import dataclasses
import math

import pytest

from scheduler import Calibration, CompileOptions, FitError, SpecError, compile, get_device, get_model, parse_pool
from scheduler.devices import DeviceGroup, Pool
from scheduler.ir import build_ir


def test_llama_2_70b_int8_on_576_lpus(big_program):
    d = big_program.data
    stages = d["stages"]
    assert len(stages) > 1
    assert sum(s["tp"] > 1 for s in stages) >= 2, "several tensor-parallel stages"
    assert d["devices_used"] <= 576
    assert d["model"]["weight_dtype"] == "int8" and d["model"]["act_dtype"] == "fp16"
    assert d["pool"]["description"] == "lpu:576@ring"
    # int8 weights (~69 GB) cannot live in fewer than 69e9 / 218.5e6 ~ 316 LPUs' SRAM.
    assert d["devices_used"] >= 316
    assert all(s["device"] == "lpu" for s in stages)
    assert d["objective"] == {"name": "latency", "value_s": d["objective"]["value_s"],
                              "reference_step": {"batch": 1, "context": 2048}}
    assert d["objective"]["value_s"] > 0


def test_llama_2_70b_fp16_on_8_lpus_does_not_fit():
    model, options = get_model("llama-2-70b"), CompileOptions(dtype="fp16")
    need = model.num_params * 2 + build_ir(model, "fp16").kv_bytes_per_token * 8 * 2048
    at_least = math.ceil(need / (230e6 * 0.95))
    with pytest.raises(FitError) as err:
        compile(model, parse_pool("lpu:8"), options)
    message = str(err.value)
    assert "needs at least" in message and "the pool has 8" in message
    assert f"needs at least {at_least} x lpu" in message


def test_fit_error_when_no_layer_layout_fits():
    # Plenty of memory in total, but no device (even 4-way tensor parallel) holds a whole block.
    lpu = dataclasses.replace(get_device("lpu"), memory_bytes=0.1e6)
    pool = Pool((DeviceGroup(lpu, 64),), "ring", 0.0)
    options = CompileOptions(max_slots=1, max_context=64, prompt_len=8, prefill_chunk=16)
    with pytest.raises(FitError, match="does not fit on lpu:64@ring: no layout of whole layers"):
        compile(get_model("tiny"), pool, options)


def test_throughput_objective_references_the_full_batch():
    program = compile(get_model("tiny"), parse_pool("lpu:8"), CompileOptions(objective="throughput", max_slots=4))
    ref = program.data["objective"]["reference_step"]
    assert program.data["objective"]["name"] == "throughput"
    assert ref == {"batch": 4, "context": 2048}


def test_heterogeneous_pool_compiles():
    program = compile(get_model("llama-2-70b"), parse_pool("h100:2+a100:2"), CompileOptions(max_slots=2))
    used = program.data["stages"]
    assert {s["device"] for s in used} <= {"h100", "a100"}
    for m in program.data["memory_plan"]:
        assert m["total_bytes"] <= m["usable_bytes"]


def test_calibration_recorded_and_for_its_device_only():
    cal = Calibration.from_json({"device": "cpu", "source": "test", "entries": [
        {"layer": "block", "phase": "decode", "batch": 1, "tokens": 2048, "seconds": 0.5}]})
    plain = compile(get_model("tiny"), parse_pool("cpu:1"))
    calibrated = compile(get_model("tiny"), parse_pool("cpu:1"), calibration=cal)
    assert calibrated.data["calibration"]["device"] == "cpu"
    assert calibrated.data["calibration"]["source"] == "test"
    assert plain.data["calibration"] is None
    # Four half-second blocks dominate the batch-1 step.
    assert calibrated.schedule("decode", 1)["step_s"] == pytest.approx(
        plain.schedule("decode", 1)["step_s"] + 4 * 0.5, rel=0.01)
    assert calibrated.plan_hash != plain.plan_hash
    on_lpu = compile(get_model("tiny"), parse_pool("lpu:1"), calibration=cal)
    assert on_lpu.schedule("decode", 1)["step_s"] < 0.01


def test_calibration_for_another_model_is_rejected():
    cal = Calibration.from_json({"device": "cpu", "model_fingerprint": "0123456789abcdef", "entries": []})
    with pytest.raises(SpecError, match="measured for another model"):
        compile(get_model("tiny"), parse_pool("cpu:1"), calibration=cal)


@pytest.mark.parametrize("field", ["max_slots", "max_context", "prefill_chunk", "prompt_len"])
@pytest.mark.parametrize("value", [0, -1, 2.0, True, "8"])
def test_sizes_must_be_positive_integers(field, value):
    with pytest.raises(SpecError, match=f"{field.replace('_', '-')} must be a positive integer"):
        CompileOptions(**{field: value})


def test_prompt_must_be_shorter_than_context():
    with pytest.raises(SpecError, match="prompt-len 2048 must be below max-context 2048"):
        CompileOptions(prompt_len=2048, max_context=2048)
    CompileOptions(prompt_len=2047, max_context=2048)


def test_context_within_model_positions():
    with pytest.raises(SpecError, match="max-context 4096 exceeds tiny's max_position 2048"):
        compile(get_model("tiny"), parse_pool("cpu:1"), CompileOptions(max_context=4096))


def test_bad_objective_and_dtype():
    with pytest.raises(SpecError, match="unknown objective 'speed'; expected one of latency, throughput"):
        CompileOptions(objective="speed")
    with pytest.raises(SpecError, match="unknown dtype 'fp8'"):
        CompileOptions(dtype="fp8")


@pytest.mark.parametrize("max_slots, buckets", [(8, (1, 2, 4, 8)), (6, (1, 2, 4, 6)), (1, (1,)), (3, (1, 2, 3))])
def test_default_buckets(max_slots, buckets):
    assert CompileOptions(max_slots=max_slots).buckets == buckets


@pytest.mark.parametrize("buckets", [(0, 4), (1, 9), (4, 2), (2, 2), (-1,)])
def test_bad_buckets(buckets):
    with pytest.raises(SpecError, match="must be increasing, each in 1..max-slots 8"):
        CompileOptions(max_slots=8, buckets=buckets)


def test_explicit_buckets_get_schedules():
    program = compile(get_model("tiny"), parse_pool("cpu:1"), CompileOptions(max_slots=8, buckets=(3, 8)))
    assert program.data["buckets"] == [3, 8]
    assert [p["batch"] for p in program.data["predictions"]] == [3, 8]


@pytest.mark.parametrize("buckets", [(1, 2.5), ("a",)])
def test_non_integer_buckets_rejected(buckets):
    with pytest.raises(SpecError, match="buckets"):
        CompileOptions(max_slots=8, buckets=buckets)
