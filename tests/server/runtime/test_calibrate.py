"""Calibration: a real (short) measurement of the tiny model that the compiler then uses."""

from __future__ import annotations

import pytest

import scheduler
from server.runtime.calibrate import Calibrator, calibrate, key_buckets


@pytest.fixture(scope="module")
def doc():
    return calibrate(scheduler.get_model("tiny"), "fp32", max_slots=2, max_context=256, prefill_chunk=32, repeats=2)


def test_key_buckets_are_powers_of_two_up_to_the_context():
    assert key_buckets(1024) == [128, 256, 512, 1024]
    assert key_buckets(300) == [128, 256, 300]


def test_every_bucket_and_key_length_is_measured(doc):
    keys = {(e["layer"], e["phase"], e["batch"], e["tokens"]) for e in doc["entries"]}
    for batch in (1, 2):
        for tokens in (128, 256):
            assert {("embed", "decode", batch, tokens), ("block", "decode", batch, tokens),
                    ("head", "decode", batch, tokens)} <= keys
    assert ("block", "prefill", 1, 32) in keys
    # The largest chunk ending at each key bucket past its own (32: a prefill step's keys
    # start at MIN_PROMPT_KEYS): its history measured.
    assert {("block", "history", 1, k) for k in (64, 128, 256)} <= keys
    assert not any(k[1] == "history" and k[3] <= 32 for k in keys)
    assert doc["prompt_key_min"] == 32 and doc["key_bucket_min"] == 128
    assert all(e["seconds"] >= 0 for e in doc["entries"])
    assert doc["measured"]["mem_bw_bytes_per_s"] > 1e8 and doc["measured"]["fp32"] > 1e8


def test_compile_with_the_calibration_predicts_the_measured_step(doc):
    cal = scheduler.Calibration.from_json(doc)
    options = scheduler.CompileOptions(dtype="fp32", max_slots=2, max_context=256, prefill_chunk=32, prompt_len=16)
    program = scheduler.compile(scheduler.get_model("tiny"), scheduler.parse_pool("cpu:1"), options, cal)
    entries = {(e["layer"], e["phase"], e["batch"], e["tokens"]): e["seconds"] for e in doc["entries"]}
    spec = scheduler.get_model("tiny")
    expected = (entries[("embed", "decode", 1, 256)] + spec.num_layers * entries[("block", "decode", 1, 256)]
                + entries[("head", "decode", 1, 256)])
    assert program.schedule("decode", 1)["step_s"] == pytest.approx(expected, rel=1e-9)
    assert program.data["calibration"]["device"] == "cpu"


def test_a_calibration_for_another_model_is_refused(doc):
    cal = scheduler.Calibration.from_json(doc)
    with pytest.raises(scheduler.SpecError, match="another model"):
        scheduler.compile(scheduler.get_model("small"), scheduler.parse_pool("cpu:1"), scheduler.CompileOptions(
            dtype="fp32", max_context=256, prefill_chunk=32, prompt_len=16), cal)


def test_samples_accumulate_per_point():
    cal = Calibrator(scheduler.get_model("tiny"), "fp32", 1, 128, 32)
    try:
        point = cal.points()[0]
        for _ in range(3):
            assert cal.sample(point) > 0
        assert len(cal.samples[point]) == 3
    finally:
        cal.close()


@pytest.mark.parametrize("slots, chunk, packed", [(2, 64, [48, 64]), (8, 256, [48, 64, 96, 128, 192, 256]),
                                                  (8, 32, [])])
def test_packed_prompts_are_measured_for_every_slice_a_prefill_step_can_pack(slots, chunk, packed):
    """A prefill step packs one prompt per free slot (at most ticks.PREFILL_ROWS), each
    within MIN_PROMPT_KEYS keys at the least: slices past 32 tokens, up to slots x 32."""
    cal = Calibrator(scheduler.get_model("tiny"), "fp32", slots, 512, chunk)
    try:
        points = [p for p in cal.points() if p.phase == "packed"]
        assert [p.tokens for p in points] == packed
        for p in points:
            step = cal.batch(p.phase, p.batch, p.tokens)
            assert sum(map(len, step.token_ids)) == p.tokens and max(map(len, step.token_ids)) == 32
            assert cal.sample(p) > 0
    finally:
        cal.close()
