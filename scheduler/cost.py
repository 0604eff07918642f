"""The cost model: roofline time per layer per device, collective and link transfer times,
and a calibration table of measured per-layer times that overrides the analytic estimate.

Roofline (Williams et al. 2009): a kernel takes max(FLOPs / achieved compute,
bytes / achieved bandwidth), plus a fixed overhead per op. Achieved = peak x efficiency
(the fractions on each `DeviceSpec`, documented there).

Collectives over a tensor-parallel group of width t (ring algorithms; Patarasuk & Yuan 2009):
  all-reduce of n bytes: 2 (t-1)/t * n / bw + 2 (t-1) * step latency
  all-gather, n bytes per device: (t-1) * n / bw + (t-1) * step latency
where bw uses min(links, t-1) links on a fully connected topology and min(links, 2) on a
ring or chain, and a step costs the link latency plus the pool's per-hop latency.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.devices import DeviceSpec, Pool
from scheduler.errors import SpecError, read_file
from scheduler.ir import KINDS, Layer, ModelIR, Work

PHASES = ("prefill", "decode", "mixed", "history", "packed")


@dataclass(frozen=True)
class Calibration:
    """Measured seconds per layer kind on one device (tensor-parallel width 1).

    Keyed by (kind, phase, batch); each key holds points (tokens, seconds), where tokens is
    the context for decode, the prompt chunk length for prefill (a chunk at position 0),
    the prompt slice for mixed (`batch` decode rows at the smallest key bucket plus a
    slice at position 0), the context for history (the largest prefill chunk ending
    there: what attending a prompt's earlier tokens costs), and the step's tokens for
    packed (prompts of `prompt_key_min` tokens at position 0 in one prefill step: its
    linears, with the least attention). Between points the time
    is interpolated linearly; past the ends it is extrapolated from the nearest two.
    """

    device: str
    table: dict = field(default_factory=dict)  # (kind, phase, batch) -> ((tokens, seconds), ...)
    source: str = ""  # what measured it (hostname, date, command), kept in the program
    model_fingerprint: str = ""  # the model it was measured for ("" = any)
    # The runtime attends to a power-of-two number of keys >= key_bucket_min (0 = exact
    # context), capped at max_context: a decode step costs what its key bucket costs.
    key_bucket_min: int = 0
    # Prefill steps attend from prompt_key_min keys (ticks.MIN_PROMPT_KEYS; 0: key_bucket_min,
    # as every step did before it): their chunks at position 0 were measured so.
    prompt_key_min: int = 0
    max_context: int = 0
    measured: dict = field(default_factory=dict)  # mem_bw_bytes_per_s, and FLOP/s per dtype

    @staticmethod
    def from_json(data: dict, source: str = "") -> "Calibration":
        try:
            device = data["device"]
            rows = data["entries"]
            table: dict = {}
            for row in rows:
                kind, phase = row["layer"], row["phase"]
                batch, tokens, seconds = int(row["batch"]), int(row["tokens"]), float(row["seconds"])
                if kind not in KINDS or phase not in PHASES or batch < 1 or tokens < 0 or not seconds >= 0:
                    raise SpecError(f"calibration entry out of range: {row}")
                table.setdefault((kind, phase, batch), []).append((tokens, seconds))
            measured = {str(k): float(v) for k, v in data.get("measured", {}).items()}
            if any(not v > 0 for v in measured.values()):
                raise SpecError(f"calibration 'measured' figures must be positive: {measured}")
            extra = dict(model_fingerprint=str(data.get("model_fingerprint", "")),
                         key_bucket_min=int(data.get("key_bucket_min", 0)),
                         prompt_key_min=int(data.get("prompt_key_min", 0)),
                         max_context=int(data.get("max_context", 0)), measured=measured)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, SpecError):
                raise
            raise SpecError(f"calibration is malformed ({exc!r}); expected "
                            "{'device': NAME, 'entries': [{layer, phase, batch, tokens, seconds}]}") from None
        table = {key: tuple(sorted(points)) for key, points in sorted(table.items())}
        return Calibration(device, table, source or data.get("source", ""), **extra)

    @staticmethod
    def load(path: str | Path) -> "Calibration":
        return Calibration.from_json(read_file(path, "calibration file", json.loads, "readable JSON"))

    def to_json(self) -> dict:
        entries = [{"layer": k, "phase": p, "batch": b, "tokens": t, "seconds": s}
                   for (k, p, b), points in self.table.items() for t, s in points]
        return {"device": self.device, "source": self.source, "entries": entries,
                "model_fingerprint": self.model_fingerprint, "key_bucket_min": self.key_bucket_min,
                "prompt_key_min": self.prompt_key_min,
                "max_context": self.max_context, "measured": self.measured}

    def attended_keys(self, context: int, prompt: bool = False) -> int:
        """Keys a row at `context` attends: in a decode or mixed step; `prompt`: in a prefill step."""
        least = (self.prompt_key_min or self.key_bucket_min) if prompt else self.key_bucket_min
        if not least:
            return context
        keys = max(least, 1 << (context - 1).bit_length())
        return min(keys, self.max_context) if self.max_context else keys

    def apply_to(self, device: DeviceSpec) -> DeviceSpec:
        """The device with its measured figures (achieved, so efficiency 1) where this
        calibration is for it; otherwise unchanged."""
        if device.name != self.device or not self.measured:
            return device
        flops = dict(device.flops_per_s)
        flops.update({k: v for k, v in self.measured.items() if k != "mem_bw_bytes_per_s"})
        changes = {"flops_per_s": flops, "compute_efficiency": 1.0}
        if "mem_bw_bytes_per_s" in self.measured:
            changes.update(mem_bw_bytes_per_s=self.measured["mem_bw_bytes_per_s"], memory_efficiency=1.0)
        return dataclasses.replace(device, **changes)

    def history_per_token(self, kind: str, end: int, own: int = 0, prompt: bool = True) -> float | None:
        """Seconds a prompt token ending at context `end` spends attending keys beyond `own`
        (the keys its measured step attended; 0: those of the largest measured chunk at
        position 0), from the history points (that chunk ending at longer key buckets),
        linear in keys between them and that chunk at position 0, per token of the chunk.
        `prompt`: the token is in a prefill step (else a mixed one). None without history
        points (older calibrations: the analytic estimate applies)."""
        chunks, history = self.table.get((kind, "prefill", 1)), self.table.get((kind, "history", 1))
        if not chunks or not history:
            return None
        tokens, first = chunks[-1]
        base = self.attended_keys(tokens, prompt=True)
        keys, own = self.attended_keys(end, prompt), own or base
        if keys <= own:
            return 0.0
        points = sorted({base: first, **{k: s for k, s in history if k > base}}.items())
        return max(_interpolate(points, keys) - _interpolate(points, own), 0.0) / tokens

    def lookup(self, kind: str, phase: str, batch: int, tokens: int) -> float | None:
        points = self.table.get((kind, phase, batch))
        return _interpolate(points, tokens) if points else None


def _interpolate(points, x: float) -> float:
    """points: sorted (x, seconds): linear between them, extrapolated from the nearest two past the ends."""
    if len(points) == 1:
        return points[0][1]
    xs = [p[0] for p in points]
    i = min(max(bisect.bisect_left(xs, x), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.0) if x1 != x0 else y1


class CostModel:
    def __init__(self, ir: ModelIR, pool: Pool, calibration: Calibration | None = None):
        self.ir = ir
        self.pool = pool
        self.calibration = calibration

    def compute_time(self, work: Work, device: DeviceSpec) -> float:
        """Roofline time of one device's work, collectives excluded. Seconds."""
        flops_per_s = device.peak_flops(self.ir.act_dtype) * device.compute_efficiency
        bytes_per_s = device.mem_bw_bytes_per_s * device.memory_efficiency
        return max(work.flops / flops_per_s, work.bytes / bytes_per_s) + work.ops * device.op_overhead_s

    def collective_time(self, op: str, nbytes: float, device: DeviceSpec, tp: int) -> float:
        if tp <= 1:
            return 0.0
        links = min(device.links, tp - 1) if self.pool.topology == "full" else min(device.links, 2)
        bw = device.link_bw_bytes_per_s * device.link_efficiency * links
        step = device.link_latency_s + self.pool.hop_latency_s
        if op == "all_reduce":
            return 2 * (tp - 1) / tp * nbytes / bw + 2 * (tp - 1) * step
        return (tp - 1) * nbytes / bw + (tp - 1) * step  # all_gather

    def transfer_time(self, nbytes: float, device: DeviceSpec, hops: int) -> float:
        """Point-to-point send over `hops` links (store-and-forward per hop is not modelled:
        links cut through, so bandwidth is paid once and latency per hop)."""
        if hops == 0:
            return 0.0
        bw = device.link_bw_bytes_per_s * device.link_efficiency
        return nbytes / bw + hops * (device.link_latency_s + self.pool.hop_latency_s)

    def layer_times(self, layer: Layer, device: DeviceSpec, tp: int, batch: int,
                    new_tokens: int, past_tokens: int) -> tuple[float, float]:
        """(compute seconds, collective seconds) for one layer on one device of a width-tp group."""
        measured = self._calibrated(layer, device, tp, batch, new_tokens, past_tokens)
        work = self.ir.work(layer, tp, batch, new_tokens, past_tokens)
        compute = measured if measured is not None else self.compute_time(work, device)
        comm = sum(self.collective_time(op, n, device, tp) for op, n in work.collectives)
        return compute, comm

    def mixed_layer_times(self, layer: Layer, device: DeviceSpec, tp: int, batch: int, slice_tokens: int,
                          past_tokens: int) -> tuple[float, float]:
        """(compute, collective) seconds of a mixed step (see ModelIR.mixed_work): the decode
        part as `layer_times` has it (calibrated where measured), plus the analytic time the
        slice adds on top of it."""
        decode, _ = self.layer_times(layer, device, tp, batch, 1, past_tokens)
        work = self.ir.mixed_work(layer, tp, batch, slice_tokens, past_tokens)
        extra = self._calibrated_slice(layer, device, tp, batch, slice_tokens, past_tokens)
        if extra is None:
            extra = self.compute_time(work, device) - self.compute_time(
                self.ir.work(layer, tp, batch, 1, past_tokens), device)
        comm = sum(self.collective_time(op, n, device, tp) for op, n in work.collectives)
        return decode + max(0.0, extra), comm

    def _calibrated_slice(self, layer, device, tp, batch, slice_tokens, past_tokens) -> float | None:
        """Seconds a prompt slice adds to the bucket's decode step, from the calibration:
        the measured mixed step over the measured decode step of the same bucket (both at
        the smallest key bucket), plus the cost of attending the slice's history (`_history`).
        Without mixed entries: the measured prefill chunk's time over a one-token step's,
        per token, times the slice. Measured on the 2-core host (small, fp32): the analytic
        FLOP-based extra gave mixed steps 1.4-1.75x shorter than they ran, the per-token
        prefill share 1.15-1.18x (a few-token slice uses the cores worse than a chunk)."""
        cal = self.calibration
        if cal is None or tp != 1 or cal.device != device.name:
            return None
        keys = cal.attended_keys(1)
        mixed, decode = cal.lookup(layer.kind, "mixed", batch, slice_tokens), cal.lookup(layer.kind, "decode", batch, keys)
        if mixed is not None and decode is not None:
            extra = mixed - decode
        else:
            points = cal.table.get((layer.kind, "prefill", 1))
            one = cal.lookup(layer.kind, "decode", 1, keys)
            if not points or one is None:
                return None
            tokens, seconds = points[-1]  # the largest chunk measured, at position 0
            extra = (seconds - one) * slice_tokens / tokens
        # Measured beside decode rows at the smallest key bucket, which the slice attends too.
        history = self._history(layer, device, tp, 1, slice_tokens, past_tokens + 1 - slice_tokens, keys, False)
        return max(0.0, extra) + max(0.0, history)

    def _history(self, layer, device, tp, batch, tokens, start, own: int = 0, prompt: bool = True) -> float:
        """Seconds `tokens` prompt tokens from position `start` spend attending the ones
        before them, beyond the `own` keys they were measured at (Calibration.history_per_token):
        per token from the calibration's history points where it has them, else the FLOP
        count's difference against the same tokens at position 0."""
        per_token = self.calibration.history_per_token(layer.kind, start + tokens, own, prompt)
        if per_token is not None:
            return per_token * tokens
        return (self.compute_time(self.ir.work(layer, tp, batch, tokens, start), device)
                - self.compute_time(self.ir.work(layer, tp, batch, tokens, 0), device))

    def packed_layer_times(self, layer: Layer, device: DeviceSpec, tp: int, tokens: int,
                           keys: int) -> tuple[float, float]:
        """(compute, collective) seconds of a prefill step of `tokens` tokens packing several
        prompts at position 0, none attending more than `keys` keys (fewer than one prompt
        of `tokens` tokens would). The compiled step reduces each token over its step's key
        bucket, so attention costs tokens x keys and the linears the tokens alone: linear
        in keys between the packed measurement (prompts of `prompt_key_min` tokens) and one
        prompt of `tokens` tokens at its own keys, and never more than that one prompt
        (measured so, it is the host's noise: one calibration here timed two 32-token
        prompts at 45.9 ms and one 64-token prompt at 42.3). Without packed points, the one
        prompt's time (an upper bound: docs/architecture.md, "Prompts packed")."""
        single, comm = self.layer_times(layer, device, tp, 1, tokens, 0)
        cal = self.calibration
        if cal is None or tp != 1 or cal.device != device.name:
            return single, comm
        packed = cal.lookup(layer.kind, "packed", 1, tokens)
        own, least = cal.attended_keys(tokens, prompt=True), cal.prompt_key_min or cal.key_bucket_min
        if packed is None or keys >= own or own <= least:
            return single, comm
        packed = min(packed, single)
        return packed + (single - packed) * max(0, keys - least) / (own - least), comm

    def layer_time(self, layer: Layer, device: DeviceSpec, tp: int, batch: int,
                   new_tokens: int, past_tokens: int) -> float:
        return sum(self.layer_times(layer, device, tp, batch, new_tokens, past_tokens))

    def _calibrated(self, layer, device, tp, batch, new_tokens, past_tokens) -> float | None:
        cal = self.calibration
        if cal is None or tp != 1 or cal.device != device.name:
            return None
        if new_tokens == 1:
            return cal.lookup(layer.kind, "decode", batch, cal.attended_keys(past_tokens + 1))
        measured = cal.lookup(layer.kind, "prefill", batch, new_tokens)  # a chunk at position 0
        if measured is None or past_tokens == 0:
            return measured
        # A later chunk (or one that ends in a wider key bucket than measured at position 0).
        return measured + self._history(layer, device, tp, batch, new_tokens, past_tokens,
                                        cal.attended_keys(new_tokens, prompt=True))
