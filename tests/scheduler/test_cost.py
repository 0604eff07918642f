"""The cost model: roofline, collectives, transfers and calibration overrides."""

import dataclasses
import json

import pytest

from scheduler.cost import Calibration, CostModel
from scheduler.devices import DeviceGroup, DeviceSpec, Pool
from scheduler.errors import SpecError
from scheduler.ir import Work, build_ir
from scheduler.model import get_model

# Round numbers so expected seconds are exact: achieved 50 TFLOP/s, 1 TB/s, 1 GB/s per link.
DEV = DeviceSpec("testchip", memory_bytes=1e9, mem_bw_bytes_per_s=2e12, flops_per_s={"bf16": 100e12},
                 op_overhead_s=1e-6, links=4, link_bw_bytes_per_s=2e9, link_latency_s=2e-6,
                 compute_efficiency=0.5, memory_efficiency=0.5, link_efficiency=0.5)


def cost_model(topology="full", hop_latency_s=0.0, calibration=None, dtype="bf16", device=DEV):
    pool = Pool((DeviceGroup(device, 8),), topology, hop_latency_s)
    return CostModel(build_ir(get_model("tiny"), dtype), pool, calibration)


def test_roofline_compute_bound():
    cm = cost_model()
    work = Work(flops=100e12, bytes=1e9, ops=3)  # 2 s of compute vs 1 ms of memory
    assert cm.compute_time(work, DEV) == pytest.approx(2.0 + 3e-6, rel=1e-12)


def test_roofline_memory_bound():
    cm = cost_model()
    work = Work(flops=1e9, bytes=3e12, ops=2)  # 20 us of compute vs 3 s of memory
    assert cm.compute_time(work, DEV) == pytest.approx(3.0 + 2e-6, rel=1e-12)


def test_roofline_uses_activation_dtype_peak():
    # int8 weights compute in fp16: a chip with only an int8 figure has no fp16 peak to use.
    chip = dataclasses.replace(DEV, flops_per_s={"fp16": 10e12, "int8": 1000e12})
    cm = cost_model(dtype="int8", device=chip)
    assert cm.compute_time(Work(flops=5e12, bytes=0, ops=0), chip) == pytest.approx(1.0)


def test_collective_free_without_tensor_parallelism():
    cm = cost_model()
    assert cm.collective_time("all_reduce", 1e6, DEV, 1) == 0.0
    assert cm.collective_time("all_gather", 1e6, DEV, 1) == 0.0


def test_all_reduce_ring_formula_on_full_topology():
    cm = cost_model("full", hop_latency_s=1e-6)
    n, tp = 1e6, 4
    bw = 2e9 * 0.5 * 3  # min(links=4, tp-1=3) links
    step = 2e-6 + 1e-6
    expected = 2 * (tp - 1) / tp * n / bw + 2 * (tp - 1) * step
    assert cm.collective_time("all_reduce", n, DEV, tp) == pytest.approx(expected, rel=1e-12)


def test_all_gather_on_ring_uses_two_links():
    cm = cost_model("ring")
    n, tp = 1e6, 8
    expected = (tp - 1) * n / (2e9 * 0.5 * 2) + (tp - 1) * 2e-6
    assert cm.collective_time("all_gather", n, DEV, tp) == pytest.approx(expected, rel=1e-12)


def test_collective_latency_grows_with_tp():
    cm = cost_model("ring")
    times = [cm.collective_time("all_reduce", 0.0, DEV, tp) for tp in (2, 4, 8, 16)]
    assert times == pytest.approx([2 * (tp - 1) * 2e-6 for tp in (2, 4, 8, 16)])
    assert times == sorted(times) and times[0] > 0


def test_transfer_time_pays_bandwidth_once_and_latency_per_hop():
    cm = cost_model(hop_latency_s=0.5e-6)
    assert cm.transfer_time(1e6, DEV, 0) == 0.0
    assert cm.transfer_time(1e6, DEV, 1) == pytest.approx(1e6 / 1e9 + 2.5e-6)
    assert cm.transfer_time(1e6, DEV, 3) == pytest.approx(1e6 / 1e9 + 3 * 2.5e-6)


def test_layer_time_is_roofline_plus_collectives():
    cm = cost_model()
    block = cm.ir.layers[1]
    compute, comm = cm.layer_times(block, DEV, 2, 4, 1, 99)
    work = cm.ir.work(block, 2, 4, 1, 99)
    assert compute == cm.compute_time(work, DEV)
    assert comm == pytest.approx(sum(cm.collective_time(op, n, DEV, 2) for op, n in work.collectives))
    assert cm.layer_time(block, DEV, 2, 4, 1, 99) == pytest.approx(compute + comm)


CAL_DOC = {
    "device": "testchip",
    "source": "bench host, 2024-01-01",
    "entries": [
        {"layer": "block", "phase": "decode", "batch": 1, "tokens": 300, "seconds": 3e-3},
        {"layer": "block", "phase": "decode", "batch": 1, "tokens": 100, "seconds": 1e-3},
        {"layer": "block", "phase": "prefill", "batch": 1, "tokens": 64, "seconds": 5e-3},
        {"layer": "head", "phase": "decode", "batch": 1, "tokens": 100, "seconds": 7e-3},
    ],
}


def test_calibration_overrides_tp1_on_matching_device():
    cm = cost_model(calibration=Calibration.from_json(CAL_DOC))
    block = cm.ir.layers[1]
    assert cm.layer_time(block, DEV, 1, 1, 1, 99) == pytest.approx(1e-3)  # context 100
    assert cm.layer_time(block, DEV, 1, 1, 1, 299) == pytest.approx(3e-3)
    assert cm.layer_time(block, DEV, 1, 1, 1, 199) == pytest.approx(2e-3)  # linear in between
    assert cm.layer_time(block, DEV, 1, 1, 1, 249) == pytest.approx(2.5e-3)
    assert cm.layer_time(block, DEV, 1, 1, 1, 499) == pytest.approx(5e-3)  # extrapolated
    assert cm.layer_time(cm.ir.layers[-1], DEV, 1, 1, 1, 5000) == pytest.approx(7e-3)  # one point: flat


def test_calibration_ignored_elsewhere():
    cal = Calibration.from_json(CAL_DOC)
    plain, calibrated = cost_model(), cost_model(calibration=cal)
    block = plain.ir.layers[1]
    other = dataclasses.replace(DEV, name="otherchip")
    cases = [
        (other, 1, 1, 1, 99),  # another device name
        (DEV, 2, 1, 1, 99),  # tensor-parallel
        (DEV, 1, 2, 1, 99),  # no entries for batch 2
    ]
    for device, tp, batch, new, past in cases:
        assert calibrated.layer_time(block, device, tp, batch, new, past) == \
            plain.layer_time(block, device, tp, batch, new, past)
    assert calibrated.layer_time(plain.ir.layers[0], DEV, 1, 1, 1, 99) == \
        plain.layer_time(plain.ir.layers[0], DEV, 1, 1, 1, 99)  # no embed entries


def test_calibrated_prefill_adds_analytic_attention_for_later_chunks():
    cm, plain = cost_model(calibration=Calibration.from_json(CAL_DOC)), cost_model()
    block = cm.ir.layers[1]
    assert cm.layer_time(block, DEV, 1, 1, 64, 0) == pytest.approx(5e-3)
    later = cm.layer_time(block, DEV, 1, 1, 64, 1000)
    delta = plain.layer_time(block, DEV, 1, 1, 64, 1000) - plain.layer_time(block, DEV, 1, 1, 64, 0)
    assert later == pytest.approx(5e-3 + delta)


def test_measured_history_prices_later_chunks_and_slices():
    """With history points (the largest chunk, 64 tokens, ending at longer key buckets), a
    later chunk or mixed slice costs what they measured, per token and by key bucket, not
    the FLOP count's estimate."""
    doc = {**CAL_DOC, "key_bucket_min": 128, "max_context": 1024, "entries": [
        *CAL_DOC["entries"],
        {"layer": "block", "phase": "history", "batch": 1, "tokens": 512, "seconds": 13e-3},
        {"layer": "block", "phase": "history", "batch": 1, "tokens": 1024, "seconds": 21e-3},
        {"layer": "block", "phase": "mixed", "batch": 1, "tokens": 16, "seconds": 3e-3},
    ]}
    cal = Calibration.from_json(doc)
    assert cal.history_per_token("block", 100) == 0.0  # within the position-0 chunk's bucket
    assert cal.history_per_token("block", 512) == pytest.approx(8e-3 / 64)
    assert cal.history_per_token("block", 1000) == pytest.approx(16e-3 / 64)  # bucket 1024
    assert cal.history_per_token("head", 1000) is None  # no history points: analytic
    cm = cost_model(calibration=cal)
    block = cm.ir.layers[1]
    assert cm.layer_time(block, DEV, 1, 1, 64, 0) == pytest.approx(5e-3)
    assert cm.layer_time(block, DEV, 1, 1, 64, 960) == pytest.approx(21e-3)  # the chunk ending at 1024
    assert cm.layer_time(block, DEV, 1, 1, 32, 400) == pytest.approx(5e-3 + 32 * 8e-3 / 64)  # one 64 point: flat
    # A 16-token slice beside one decoding row, ending at 1000: the bucket's mixed step
    # less its decode step (both measured at the smallest key bucket), plus 16 tokens of
    # measured history, on top of the row's decode step there.
    decode, _ = cm.layer_times(block, DEV, 1, 1, 1, 999)
    mixed, _ = cm.mixed_layer_times(block, DEV, 1, 1, 16, 999)
    slice_extra = 3e-3 - cal.lookup("block", "decode", 1, 128)
    assert mixed - decode == pytest.approx(slice_extra + 16 * 16e-3 / 64)


def test_a_prefill_step_packing_short_prompts_costs_its_tokens_and_the_keys_its_prompts_attend():
    """Eight 25-token prompts in one 200-token step attend 32 keys each, not the 256 of one
    200-token prompt: the packed measurement (prompts of `prompt_key_min` tokens) at 32
    keys, the one prompt's at its own bucket, linear in keys between; without packed
    points, the one prompt's (an upper bound)."""
    doc = {**CAL_DOC, "key_bucket_min": 128, "prompt_key_min": 32, "max_context": 1024, "entries": [
        *CAL_DOC["entries"],
        {"layer": "block", "phase": "prefill", "batch": 1, "tokens": 256, "seconds": 20e-3},
        {"layer": "block", "phase": "packed", "batch": 1, "tokens": 64, "seconds": 4e-3},
        {"layer": "block", "phase": "packed", "batch": 1, "tokens": 256, "seconds": 10e-3},
    ]}
    cm = cost_model(calibration=Calibration.from_json(doc))
    block = cm.ir.layers[1]
    single = cm.layer_time(block, DEV, 1, 1, 256, 0)
    assert single == pytest.approx(20e-3)
    assert cm.packed_layer_times(block, DEV, 1, 256, 32)[0] == pytest.approx(10e-3)
    assert cm.packed_layer_times(block, DEV, 1, 256, 144)[0] == pytest.approx(15e-3)  # halfway in keys 32..256
    assert cm.packed_layer_times(block, DEV, 1, 256, 256)[0] == pytest.approx(single)  # its own keys: one prompt
    assert cm.packed_layer_times(block, DEV, 1, 160, 32)[0] == pytest.approx(7e-3)  # between packed points
    noisy = cost_model(calibration=Calibration.from_json({**doc, "entries": [
        *doc["entries"], {"layer": "head", "phase": "packed", "batch": 1, "tokens": 256, "seconds": 1.0}]}))
    head = noisy.ir.layers[-1]  # packed measured above one prompt (the host's noise): one prompt's time
    assert noisy.packed_layer_times(head, DEV, 1, 256, 32) == noisy.layer_times(head, DEV, 1, 1, 256, 0)
    head = cm.ir.layers[-1]  # no packed points for the head: one prompt's time
    assert cm.packed_layer_times(head, DEV, 1, 256, 32) == cm.layer_times(head, DEV, 1, 1, 256, 0)
    plain = cost_model()  # no calibration: the analytic one prompt
    assert plain.packed_layer_times(block, DEV, 1, 256, 32) == plain.layer_times(block, DEV, 1, 1, 256, 0)


def test_calibration_round_trips_through_json():
    cal = Calibration.from_json(CAL_DOC)
    assert cal.source == "bench host, 2024-01-01"
    doc = cal.to_json()
    assert json.loads(json.dumps(doc)) == doc  # plain JSON
    again = Calibration.from_json(doc)
    assert again == cal
    assert again.lookup("block", "decode", 1, 200) == pytest.approx(2e-3)
    assert sorted(doc["entries"], key=json.dumps) == sorted(CAL_DOC["entries"], key=json.dumps)


def test_calibration_load(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(CAL_DOC))
    assert Calibration.load(path) == Calibration.from_json(CAL_DOC)


def _entry(**overrides):
    return {"layer": "block", "phase": "decode", "batch": 1, "tokens": 10, "seconds": 1e-3, **overrides}


@pytest.mark.parametrize("doc, message", [
    ({"entries": []}, "malformed"),
    ({"device": "cpu"}, "malformed"),
    ({"device": "cpu", "entries": 3}, "malformed"),
    ({"device": "cpu", "entries": [{"layer": "block"}]}, "malformed"),
    ({"device": "cpu", "entries": [_entry(batch="two")]}, "malformed"),
    ({"device": "cpu", "entries": [_entry(layer="mlp")]}, "out of range"),
    ({"device": "cpu", "entries": [_entry(phase="train")]}, "out of range"),
    ({"device": "cpu", "entries": [_entry(batch=0)]}, "out of range"),
    ({"device": "cpu", "entries": [_entry(tokens=-1)]}, "out of range"),
    ({"device": "cpu", "entries": [_entry(seconds=-1e-3)]}, "out of range"),
    ({"device": "cpu", "entries": [_entry(seconds="nan")]}, "out of range"),
    ([1, 2], "malformed"),
])
def test_malformed_calibration(doc, message):
    with pytest.raises(SpecError, match=message):
        Calibration.from_json(doc)


def test_calibration_file_errors(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        Calibration.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("nope")
    with pytest.raises(SpecError, match="not readable JSON"):
        Calibration.load(bad)
