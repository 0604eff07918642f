"""Accelerator specs and pools.

A `DeviceSpec` holds a chip's public peak figures and the fraction of each peak the cost
model assumes it achieves. A `Pool` is an ordered list of device groups plus a topology;
stages take devices in pool order, so the order is the physical chain or ring.

Pool strings: `lpu:576`, `h100:8@full`, `h100:4+a100:4@ring`. Pool files: TOML, see
`load_pool`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.errors import SpecError, read_file

TOPOLOGIES = ("chain", "ring", "full")
DEVICE_KINDS = ("cpu", "gpu", "simulated")
GB = 1e9
US = 1e-6


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    memory_bytes: float
    mem_bw_bytes_per_s: float
    # Dense peak per compute dtype, FLOP/s. int8 weights compute in fp16 (see model.activation_dtype).
    flops_per_s: dict = field(default_factory=dict)
    op_overhead_s: float = 0.0  # fixed cost per kernel / instruction group
    links: int = 1  # chip-to-chip links
    link_bw_bytes_per_s: float = 1.0 * GB  # each link, each way
    link_latency_s: float = 1.0 * US
    # Achieved fraction of each peak (decode GEMVs are memory-bound; see README "Cost model").
    compute_efficiency: float = 0.7
    memory_efficiency: float = 0.8
    link_efficiency: float = 0.8
    usable_memory_fraction: float = 0.9  # the rest is runtime, fragmentation, code
    default_topology: str = "ring"
    # Where the runtime runs a stage on it: "cpu" (this host), "gpu" (a CUDA device), or
    # "simulated" (a chip this host does not have: its math runs on the host CPU, paced
    # to the chip's predicted times).
    kind: str = "simulated"

    def __post_init__(self):
        for name in ("memory_bytes", "mem_bw_bytes_per_s", "link_bw_bytes_per_s"):
            _positive(f"device {self.name!r}: {name}", getattr(self, name))
        for name in ("compute_efficiency", "memory_efficiency", "link_efficiency", "usable_memory_fraction"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise SpecError(f"device {self.name!r}: {name} must be in (0, 1], got {value!r}")
        if not isinstance(self.links, int) or self.links < 1:
            raise SpecError(f"device {self.name!r}: links must be a positive integer, got {self.links!r}")
        for name in ("op_overhead_s", "link_latency_s"):
            _non_negative(f"device {self.name!r}: {name}", getattr(self, name))
        if not isinstance(self.flops_per_s, dict) or not self.flops_per_s:
            raise SpecError(f"device {self.name!r}: flops_per_s must be a table of dtype = FLOP/s, "
                            f"got {self.flops_per_s!r}")
        for dtype, value in self.flops_per_s.items():
            _positive(f"device {self.name!r}: flops_per_s[{dtype}]", value)
        if self.kind not in DEVICE_KINDS:
            raise SpecError(f"device {self.name!r}: kind must be one of {DEVICE_KINDS}, got {self.kind!r}")
        if self.default_topology not in TOPOLOGIES:
            raise SpecError(f"device {self.name!r}: default_topology must be one of {TOPOLOGIES}")

    @property
    def usable_memory_bytes(self) -> float:
        return self.memory_bytes * self.usable_memory_fraction

    def peak_flops(self, dtype: str) -> float:
        """Peak for `dtype`, else the best 16-bit figure (fp32 falls back to half of it)."""
        if dtype in self.flops_per_s:
            return self.flops_per_s[dtype]
        half = self.flops_per_s.get("bf16") or self.flops_per_s.get("fp16")
        if half:
            return half / 2 if dtype == "fp32" else half
        return max(self.flops_per_s.values())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _non_negative(what: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (math.isfinite(value) and value >= 0):
        raise SpecError(f"{what} must be a finite number >= 0, got {value!r}")


def _positive(what: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or math.isinf(value):
        raise SpecError(f"{what} must be a positive number, got {value!r}")


# Public figures from docs/architecture.md ("public device figures"). Achieved fractions are assumptions, stated here:
# - LPU: weights stream from on-chip SRAM under a static schedule (no caches, no arbitration),
#   so we assume 90% of SRAM bandwidth and 80% of compute; one instruction group per op ~0.2 us;
#   links ~14 GB/s each way, ~1 us per hop (assumed; Groq publishes no per-hop figure).
# - GPUs: decode kernels reach ~80% of HBM bandwidth (vLLM / TensorRT-LLM decode GEMVs) and
#   ~60% of dense tensor-core peak; ~4 us per kernel launch+tail (CUDA graphs amortize launch);
#   NVLink bandwidth is the total each way split over 18 (H100/H200) or 12 (A100) links,
#   ~3 us per NCCL hop for small messages.
# - cpu: this development machine, measured (docs/architecture.md, "Budget"); `lockstep calibrate` replaces
#   these with a fresh measurement. Figures are achieved, so efficiencies are 1.
PRESETS: dict[str, DeviceSpec] = {
    spec.name: spec
    for spec in [
        DeviceSpec("lpu", memory_bytes=230e6, mem_bw_bytes_per_s=80e12,
                   flops_per_s={"fp16": 188e12, "bf16": 188e12, "fp32": 47e12, "int8": 750e12},
                   op_overhead_s=0.2 * US, links=16, link_bw_bytes_per_s=14 * GB, link_latency_s=1.0 * US,
                   compute_efficiency=0.8, memory_efficiency=0.9, link_efficiency=0.9,
                   usable_memory_fraction=0.95, default_topology="ring"),
        DeviceSpec("h100", kind="gpu", memory_bytes=80 * GB, mem_bw_bytes_per_s=3.35e12,
                   flops_per_s={"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "int8": 1979e12},
                   op_overhead_s=4 * US, links=18, link_bw_bytes_per_s=25 * GB, link_latency_s=3 * US,
                   compute_efficiency=0.6, memory_efficiency=0.8, default_topology="full"),
        DeviceSpec("h200", kind="gpu", memory_bytes=141 * GB, mem_bw_bytes_per_s=4.8e12,
                   flops_per_s={"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "int8": 1979e12},
                   op_overhead_s=4 * US, links=18, link_bw_bytes_per_s=25 * GB, link_latency_s=3 * US,
                   compute_efficiency=0.6, memory_efficiency=0.8, default_topology="full"),
        DeviceSpec("a100", kind="gpu", memory_bytes=80 * GB, mem_bw_bytes_per_s=2.0e12,
                   flops_per_s={"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "int8": 624e12},
                   op_overhead_s=5 * US, links=12, link_bw_bytes_per_s=25 * GB, link_latency_s=3 * US,
                   compute_efficiency=0.6, memory_efficiency=0.8, default_topology="full"),
        DeviceSpec("cpu", kind="cpu", memory_bytes=24 * GB, mem_bw_bytes_per_s=24 * GB,
                   flops_per_s={"fp32": 320e9, "bf16": 320e9, "fp16": 320e9},
                   op_overhead_s=10 * US, links=1, link_bw_bytes_per_s=10 * GB, link_latency_s=10 * US,
                   compute_efficiency=1.0, memory_efficiency=1.0, link_efficiency=1.0,
                   usable_memory_fraction=0.5, default_topology="full"),
    ]
}


def get_device(name: str) -> DeviceSpec:
    if name not in PRESETS:
        raise SpecError(f"unknown device {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class DeviceGroup:
    device: DeviceSpec
    count: int


@dataclass(frozen=True)
class Pool:
    """Devices in physical order: group by group, `count` identical devices each."""

    groups: tuple[DeviceGroup, ...]
    topology: str
    hop_latency_s: float  # added per hop on top of the link's own latency (switches, SerDes)

    def __post_init__(self):
        if not self.groups:
            raise SpecError("pool has no devices")
        for group in self.groups:
            if not isinstance(group.count, int) or group.count < 1:
                raise SpecError(f"pool: count of {group.device.name!r} must be a positive integer, got {group.count!r}")
        if self.topology not in TOPOLOGIES:
            raise SpecError(f"pool: unknown topology {self.topology!r}; expected one of {', '.join(TOPOLOGIES)}")
        _non_negative("pool: hop latency", self.hop_latency_s)

    @property
    def num_devices(self) -> int:
        return sum(group.count for group in self.groups)

    def group_starts(self) -> list[int]:
        """Index of each group's first device; a stage never spans two groups."""
        starts, at = [], 0
        for group in self.groups:
            starts.append(at)
            at += group.count
        return starts

    def device_at(self, index: int) -> DeviceSpec:
        for start, group in zip(self.group_starts(), self.groups):
            if start <= index < start + group.count:
                return group.device
        raise IndexError(index)

    def hops(self, src: int, dst: int) -> int:
        """Link hops between two device indices."""
        if src == dst:
            return 0
        if self.topology == "full":
            return 1
        distance = abs(src - dst)
        if self.topology == "ring":
            return min(distance, self.num_devices - distance)
        return distance

    def describe(self) -> str:
        parts = "+".join(f"{g.device.name}:{g.count}" for g in self.groups)
        return f"{parts}@{self.topology}"

    def to_dict(self) -> dict:
        return {
            "groups": [{"count": g.count, "device": g.device.to_dict()} for g in self.groups],
            "topology": self.topology,
            "hop_latency_s": self.hop_latency_s,
        }


def parse_pool(text: str) -> Pool:
    """`NAME[:COUNT][+NAME[:COUNT]...][@TOPOLOGY]` (COUNT defaults to 1, so `cpu` is `cpu:1`),
    or a path to a TOML pool file."""
    if text.endswith(".toml"):
        return load_pool(text)
    body, _, topology = text.partition("@")
    groups = []
    for part in body.split("+"):
        name, sep, count = part.strip().partition(":")
        if not sep:
            count = "1"
        if not name or not re.fullmatch(r"[0-9]+", count.strip()):
            raise SpecError(f"malformed pool {text!r}: expected NAME[:COUNT][+NAME[:COUNT]][@chain|ring|full], e.g. lpu:576")
        groups.append(DeviceGroup(get_device(name.strip()), int(count)))
    topology = topology.strip() or groups[0].device.default_topology
    return Pool(tuple(groups), topology, hop_latency_s=0.0)


_DEVICE_KEYS = {f.name for f in dataclasses.fields(DeviceSpec)} - {"name"}


def load_pool(path: str | Path) -> Pool:
    """A TOML pool file:

        topology = "ring"          # chain | ring | full (default: the first device's)
        hop_latency_us = 0.5       # per hop, on top of each link's latency
        [[devices]]
        preset = "h100"            # or name = "..." with every DeviceSpec field given
        count = 4
        memory_bytes = 40e9        # any DeviceSpec field overrides the preset
    """
    path = Path(path)
    data = read_file(path, "pool file", tomllib.loads, "valid TOML")
    entries = data.get("devices")
    if not isinstance(entries, list) or not entries:
        raise SpecError(f"pool file {str(path)!r}: needs at least one [[devices]] table")
    unknown = set(data) - {"topology", "hop_latency_us", "devices"}
    if unknown:
        raise SpecError(f"pool file {str(path)!r}: unknown keys {', '.join(sorted(unknown))}")
    groups = [_group_from_table(path, i, entry) for i, entry in enumerate(entries)]
    topology = data.get("topology", groups[0].device.default_topology)
    hop_us = data.get("hop_latency_us", 0.0)
    if not isinstance(hop_us, (int, float)):
        raise SpecError(f"pool file {str(path)!r}: hop_latency_us must be a number, got {hop_us!r}")
    return Pool(tuple(groups), topology, hop_latency_s=hop_us * US)


def _group_from_table(path: Path, index: int, entry: dict) -> DeviceGroup:
    where = f"pool file {str(path)!r}, devices[{index}]"
    if not isinstance(entry, dict):
        raise SpecError(f"{where}: must be a table")
    overrides = {k: v for k, v in entry.items() if k not in ("preset", "name", "count")}
    unknown = set(overrides) - _DEVICE_KEYS
    if unknown:
        raise SpecError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    count = entry.get("count", 1)
    try:
        if "preset" in entry:
            base = get_device(entry["preset"])
            device = dataclasses.replace(base, name=entry.get("name", base.name), **overrides)
        elif "name" in entry:
            device = DeviceSpec(name=entry["name"], **overrides)
        else:
            raise SpecError(f"{where}: give preset = NAME or name = NAME with every field")
    except TypeError as exc:
        raise SpecError(f"{where}: {exc}") from None
    except SpecError as exc:
        raise SpecError(f"{where}: {exc}") from None
    return DeviceGroup(device, count)
