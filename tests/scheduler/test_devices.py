"""Devices and pools: pool strings, TOML pool files, hop counts."""

import dataclasses

import pytest

from scheduler.devices import PRESETS, DeviceGroup, DeviceSpec, Pool, get_device, load_pool, parse_pool
from scheduler.errors import SpecError


def write(tmp_path, text, name="pool.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_parse_single_group_uses_device_default_topology():
    pool = parse_pool("lpu:576")
    assert pool.num_devices == 576
    assert [(g.device.name, g.count) for g in pool.groups] == [("lpu", 576)]
    assert pool.topology == "ring"  # the LPU's default
    assert pool.hop_latency_s == 0.0
    assert parse_pool("h100:8").topology == "full"
    assert parse_pool("cpu:1").topology == "full"


def test_parse_explicit_topology():
    pool = parse_pool("h100:8@full")
    assert (pool.num_devices, pool.topology) == (8, "full")
    assert parse_pool("lpu:4@chain").topology == "chain"


def test_parse_heterogeneous_pool():
    pool = parse_pool("h100:4+a100:4@chain")
    assert [(g.device.name, g.count) for g in pool.groups] == [("h100", 4), ("a100", 4)]
    assert pool.topology == "chain"
    assert pool.group_starts() == [0, 4]
    assert pool.device_at(3).name == "h100" and pool.device_at(4).name == "a100"
    with pytest.raises(IndexError):
        pool.device_at(8)
    assert pool.describe() == "h100:4+a100:4@chain"


def test_heterogeneous_default_topology_is_first_groups():
    assert parse_pool("h100:4+lpu:4").topology == "full"
    assert parse_pool("lpu:4+h100:4").topology == "ring"


def test_describe_round_trips():
    for text in ("lpu:576@ring", "h100:4+a100:4@full", "cpu:1@chain"):
        assert parse_pool(parse_pool(text).describe()) == parse_pool(text)


@pytest.mark.parametrize("text, message", [
    ("lpu:", "malformed pool 'lpu:'.*e.g. lpu:576"),
    ("lpu:x", "malformed pool 'lpu:x'"),
    ("lpu:-2", "malformed pool"),
    (":4", "malformed pool"),
    ("lpu:4+", "malformed pool"),
    ("", "malformed pool"),
    ("foo:3", "unknown device 'foo'; presets: lpu, h100"),
    ("lpu:0", "count of 'lpu' must be a positive integer, got 0"),
    ("lpu:4@star", "unknown topology 'star'; expected one of chain, ring, full"),
])
def test_malformed_pool_strings(text, message):
    with pytest.raises(SpecError, match=message):
        parse_pool(text)


def test_bare_device_name_means_one_device():
    pool = parse_pool("cpu")
    assert pool.num_devices == 1 and pool.groups[0].device.name == "cpu"


def test_unicode_digit_count_is_spec_error():
    with pytest.raises(SpecError, match="malformed pool"):
        parse_pool("lpu:²")


def test_hops_chain_ring_full():
    chain, ring, full = (Pool((DeviceGroup(get_device("lpu"), 8),), topo, 0.0) for topo in ("chain", "ring", "full"))
    assert [chain.hops(0, d) for d in range(8)] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert [ring.hops(0, d) for d in range(8)] == [0, 1, 2, 3, 4, 3, 2, 1]
    assert [full.hops(0, d) for d in range(8)] == [0, 1, 1, 1, 1, 1, 1, 1]
    assert chain.hops(6, 2) == chain.hops(2, 6) == 4
    assert ring.hops(7, 1) == 2


def test_hops_span_groups():
    pool = parse_pool("h100:2+a100:2@ring")
    assert pool.hops(3, 0) == 1  # the ring closes over both groups
    assert parse_pool("h100:2+a100:2@chain").hops(3, 0) == 3


def test_toml_heterogeneous_pool(tmp_path):
    pool = load_pool(write(tmp_path, """
topology = "chain"
hop_latency_us = 0.5

[[devices]]
preset = "h100"
count = 4

[[devices]]
preset = "a100"
count = 2
memory_bytes = 40e9
"""))
    assert [(g.device.name, g.count) for g in pool.groups] == [("h100", 4), ("a100", 2)]
    assert pool.topology == "chain"
    assert pool.hop_latency_s == pytest.approx(0.5e-6)
    a100 = pool.groups[1].device
    assert a100.memory_bytes == 40e9
    assert a100 == dataclasses.replace(get_device("a100"), memory_bytes=40e9)  # other fields kept


def test_toml_defaults(tmp_path):
    pool = load_pool(write(tmp_path, '[[devices]]\npreset = "lpu"\n'))
    assert pool.num_devices == 1  # count defaults to 1
    assert pool.topology == "ring"  # the device's default
    assert pool.hop_latency_s == 0.0


def test_toml_preset_renamed(tmp_path):
    pool = load_pool(write(tmp_path, '[[devices]]\npreset = "lpu"\nname = "lpu-small"\ncount = 2\n'
                                     'memory_bytes = 1e6\n'))
    device = pool.groups[0].device
    assert device.name == "lpu-small" and device.memory_bytes == 1e6
    assert device.mem_bw_bytes_per_s == get_device("lpu").mem_bw_bytes_per_s


def test_toml_custom_device(tmp_path):
    pool = load_pool(write(tmp_path, """
[[devices]]
name = "npu"
count = 3
memory_bytes = 16e9
mem_bw_bytes_per_s = 1e12
flops_per_s = { bf16 = 100e12 }
links = 4
default_topology = "chain"
"""))
    device = pool.groups[0].device
    assert device == DeviceSpec("npu", memory_bytes=16e9, mem_bw_bytes_per_s=1e12,
                                flops_per_s={"bf16": 100e12}, links=4, default_topology="chain")
    assert pool.topology == "chain"
    assert pool.num_devices == 3


def test_parse_pool_reads_toml_path(tmp_path):
    path = write(tmp_path, '[[devices]]\npreset = "h100"\ncount = 2\n')
    assert parse_pool(path) == load_pool(path)


@pytest.mark.parametrize("text, message", [
    ("[[devices]\n", "not valid TOML"),
    ('topology = "ring"\n', "needs at least one \\[\\[devices\\]\\] table"),
    ('devices = []\n', "needs at least one"),
    ('[devices]\npreset = "lpu"\n', "needs at least one"),
    ('color = "red"\n[[devices]]\npreset = "lpu"\n', "unknown keys color"),
    ('[[devices]]\npreset = "lpu"\nspeed = 3\n', r"devices\[0\]: unknown keys speed"),
    ('[[devices]]\npreset = "tpu"\n', r"devices\[0\]: unknown device 'tpu'"),
    ('[[devices]]\ncount = 2\n', "give preset = NAME or name = NAME"),
    ('[[devices]]\nname = "npu"\nmemory_bytes = 1e9\n', r"devices\[0\].*mem_bw_bytes_per_s"),
    ('[[devices]]\npreset = "lpu"\ncount = 0\n', "count of 'lpu' must be a positive integer"),
    ('[[devices]]\npreset = "lpu"\ncount = "4"\n', "count of 'lpu' must be a positive integer"),
    ('[[devices]]\npreset = "lpu"\nmemory_bytes = -1\n', "memory_bytes must be a positive number"),
    ('[[devices]]\npreset = "lpu"\nmemory_bytes = "lots"\n', "memory_bytes must be a positive number"),
    ('[[devices]]\npreset = "lpu"\ncompute_efficiency = 1.5\n', r"compute_efficiency must be in \(0, 1\]"),
    ('[[devices]]\npreset = "lpu"\ncompute_efficiency = "high"\n', r"devices\[0\]"),
    ('[[devices]]\npreset = "lpu"\nlinks = 0\n', "links must be a positive integer"),
    ('[[devices]]\npreset = "lpu"\nflops_per_s = {}\n', "flops_per_s must be a table of dtype"),
    ('[[devices]]\npreset = "lpu"\ndefault_topology = "mesh"\n', "default_topology must be one of"),
    ('topology = "torus"\n[[devices]]\npreset = "lpu"\n', "unknown topology 'torus'"),
    ('hop_latency_us = "fast"\n[[devices]]\npreset = "lpu"\n', "hop_latency_us must be a number"),
    ('hop_latency_us = -1\n[[devices]]\npreset = "lpu"\n', "hop latency must be a finite number >= 0"),
    ('devices = [1]\n', r"devices\[0\]: must be a table"),
])
def test_bad_pool_files(tmp_path, text, message):
    with pytest.raises(SpecError, match=message):
        load_pool(write(tmp_path, text))


def test_missing_pool_file(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        parse_pool(str(tmp_path / "nope.toml"))


def test_flops_per_s_must_be_a_table(tmp_path):
    with pytest.raises(SpecError, match="flops_per_s"):
        load_pool(write(tmp_path, '[[devices]]\npreset = "lpu"\nflops_per_s = 5\n'))


def test_nan_hop_latency_rejected(tmp_path):
    with pytest.raises(SpecError, match="hop"):
        load_pool(write(tmp_path, 'hop_latency_us = nan\n[[devices]]\npreset = "lpu"\n'))


def test_nan_link_latency_rejected():
    with pytest.raises(SpecError, match="link_latency_s"):
        dataclasses.replace(get_device("lpu"), link_latency_s=float("nan"))


def test_device_spec_validation():
    lpu = get_device("lpu")
    with pytest.raises(SpecError, match="usable_memory_fraction must be in"):
        dataclasses.replace(lpu, usable_memory_fraction=0)
    with pytest.raises(SpecError, match="mem_bw_bytes_per_s must be a positive number, got inf"):
        dataclasses.replace(lpu, mem_bw_bytes_per_s=float("inf"))
    with pytest.raises(SpecError, match="op_overhead_s must be a finite number >= 0"):
        dataclasses.replace(lpu, op_overhead_s=-1e-6)
    with pytest.raises(SpecError, match=r"flops_per_s\[fp16\] must be a positive number"):
        dataclasses.replace(lpu, flops_per_s={"fp16": 0})


def test_unknown_device_lists_presets():
    with pytest.raises(SpecError, match="unknown device 'tpu'; presets: " + ", ".join(PRESETS)):
        get_device("tpu")


def test_usable_memory_and_peak_fallbacks():
    cpu = get_device("cpu")
    assert cpu.usable_memory_bytes == cpu.memory_bytes * cpu.usable_memory_fraction
    only_bf16 = DeviceSpec("x", memory_bytes=1e9, mem_bw_bytes_per_s=1e9, flops_per_s={"bf16": 10e12})
    assert only_bf16.peak_flops("bf16") == 10e12
    assert only_bf16.peak_flops("fp16") == 10e12
    assert only_bf16.peak_flops("fp32") == 5e12


def test_empty_pool_rejected():
    with pytest.raises(SpecError, match="pool has no devices"):
        Pool((), "ring", 0.0)
