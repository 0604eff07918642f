"""Calibration: measure this host's device and the model's per-layer step times, so the
compiler's predictions for this machine come true.

What is measured (medians over `repeats` runs after warm-up):
- memory read bandwidth (sum over a 256 MB fp32 tensor), bytes/s;
- dense fp32/bf16 matmul throughput (2048 x 2048 x 2048), FLOP/s;
- the real executor step (`LocalExecutor.step`, sampling included) for every decode
  bucket at each attended-key length the runtime uses (powers of two from 128 up to
  max_context), for a prefill slice of every static shape (4, 8, ..., the chunk; batch
  1, at position 0), for the largest slice ending at each longer key bucket (`history`:
  what attending a prompt's earlier tokens adds), and for every bucket's mixed step with
  every slice shape.
  Forward hooks time the embedding and each block inside the same steps; the head's
  entry is the rest of the step (final norm, LM head, sampling, host glue), so the
  entries of one step add up to the measured step.

The result is the scheduler's `Calibration` JSON (per layer kind, phase, batch, tokens),
plus the measured device figures, which `lockstep compile --calibration` uses for
anything the table does not cover.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass

import torch

import scheduler
from scheduler.ticks import MIN_KEY_BUCKET, MIN_PROMPT_KEYS, PREFILL_ROWS, key_buckets, prompt_keys, slice_sizes
from scheduler.program import fingerprint
from server.runtime.executor import LocalExecutor
from server.runtime.stage import RuntimePlan, StageSpec
from server.runtime.step import StepBatch, full_batch


def _median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_memory_bandwidth(repeats: int = 7, nbytes: int = 256 << 20) -> float:
    """Read bandwidth in bytes/s: decode streams weights, so reads are what matter."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / _median_time(lambda: x.sum(), repeats)


def measure_matmul_flops(dtype: torch.dtype, repeats: int = 5, n: int = 2048) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / _median_time(lambda: a @ b, repeats)


@dataclass
class _Timer:
    """Forward hooks that time the embedding and every block of a stage."""

    embed_s: float = 0.0
    blocks_s: float = 0.0
    _start: float = 0.0

    def attach(self, model) -> list:
        handles = []
        modules = [("embed", model.model.embed_tokens)] + [("block", b) for b in model.model.layers.values()]
        for kind, module in modules:
            handles.append(module.register_forward_pre_hook(self._pre))
            handles.append(module.register_forward_hook(self._post_embed if kind == "embed" else self._post_block))
        return handles

    def _pre(self, *_):
        self._start = time.perf_counter()

    def _post_embed(self, *_):
        self.embed_s += time.perf_counter() - self._start

    def _post_block(self, *_):
        self.blocks_s += time.perf_counter() - self._start


def _layer_shares(model: scheduler.ModelSpec) -> tuple[float, float]:
    """(embedding, all blocks) shares of a compiled step, which runs as one call: by the
    bytes each part reads (a decode step streams its weights), the head taking the rest.
    The embedding reads one row per token: ~0."""
    blocks = model.num_layers * model.block_params
    head = model.hidden_size + model.embed_params  # final norm + the LM head's matrix, tied or not
    return 0.0, blocks / (blocks + head)


@dataclass(frozen=True)
class Point:
    """One calibrated step: `tokens` is the attended keys for decode (the step runs at
    context = tokens), the chunk length for prefill (a chunk at position 0), the prompt
    slice for mixed (`batch` decode rows at the smallest key bucket, the slice at 0), the
    context for history (the largest slice, ending there), the step's tokens for packed
    (prompts of MIN_PROMPT_KEYS tokens at position 0, packed into one prefill step)."""

    phase: str
    batch: int
    tokens: int


class Calibrator:
    """Owns a one-stage executor with timing hooks; `sample` measures one step of a point.
    Points can be sampled round-robin, interleaved with other measurements, so that all
    see the same drift of a shared host (bench/decode.py does that)."""

    def __init__(self, model: scheduler.ModelSpec, dtype: str = "fp32", max_slots: int = 8,
                 max_context: int = 2048, prefill_chunk: int = 256, seed: int = 0, checkpoint: str = "",
                 compiled: bool = False):
        self.model, self.dtype, self.max_slots, self.max_context = model, dtype, max_slots, max_context
        self.options = scheduler.CompileOptions(dtype=dtype, max_slots=max_slots, max_context=max_context,
                                                prefill_chunk=min(prefill_chunk, max_context),
                                                prompt_len=min(128, max_context - 1))
        plan = RuntimePlan(model, dtype, max_slots, max_context, (StageSpec(0, 0, model.num_layers + 2, "cpu"),),
                           seed=seed, checkpoint=checkpoint, compiled=compiled)
        self.executor = LocalExecutor(plan)
        self.timer = _Timer()
        runner = self.executor.runners[0]
        # A stage that cannot be compiled (MoE, ...) is measured eager: serve falls back the
        # same way, for the same reason (StageRunner logs it), so the calibration is of what runs.
        # A compiled step is one call: no per-layer hooks (see sample).
        self._handles = [] if runner.compiled is not None else self.timer.attach(runner.model)
        self._layer_share = _layer_shares(model) if runner.compiled is not None else None
        self.samples: dict[Point, list[tuple[float, float, float]]] = {}

    def points(self) -> list[Point]:
        chunks = slice_sizes(self.options.prefill_chunk)
        decode = [Point("decode", b, k) for b in self.options.buckets for k in key_buckets(self.max_context)]
        mixed = [Point("mixed", b, p) for b in self.options.buckets for p in chunks]
        prefill = [Point("prefill", 1, p) for p in chunks]
        # Prompts packed into one prefill step (scheduler/ticks.PREFILL_ROWS): each attends
        # its own key bucket, so a step of short prompts costs its tokens' linears and far
        # less attention than one prompt of as many tokens (measured as rows of
        # MIN_PROMPT_KEYS tokens; the timing model interpolates in keys between the two,
        # Calibration.packed_s).
        rows = min(PREFILL_ROWS, self.max_slots)  # prompts a prefill step packs: one slot each
        packed = [Point("packed", 1, p) for p in chunks if MIN_PROMPT_KEYS < p <= rows * MIN_PROMPT_KEYS]
        # The largest slice later in a prompt: measured, not the FLOP count's guess. With a
        # chunk at position 0 plus the analytic cost of its history, a 1000-token prompt of
        # smollm2-135m was predicted 1488 ms and ran 1935 eager, 1193 and 2905 compiled
        # (bench/decode.py --only predictions; BENCHMARKS.md).
        # From the chunk's own key bucket (a prefill step's rows attend from MIN_PROMPT_KEYS).
        chunk_keys = prompt_keys(self.options.prefill_chunk, self.max_context)
        history = [Point("history", 1, k) for k in key_buckets(self.max_context, MIN_PROMPT_KEYS) if k > chunk_keys]
        return decode + prefill + packed + history + mixed

    def batch(self, phase: str, bucket: int, context: int) -> StepBatch:
        """All rows real, each ending at `context` (decode: one new token; prefill: a chunk);
        mixed: `bucket` decode rows (at most max_slots - 1) at the smallest key bucket and a
        slice of `context` tokens at position 0."""
        if phase == "mixed":
            return full_batch("mixed", bucket, context, min(MIN_KEY_BUCKET, self.max_context), self.max_slots,
                              slice_end=context)
        if phase == "packed":  # `context` tokens in prompts of MIN_PROMPT_KEYS tokens at position 0
            return full_batch("prefill", 1, context, MIN_PROMPT_KEYS, self.max_slots)
        if phase == "history":  # the largest slice (the chunk), ending at `context`
            return full_batch("prefill", bucket, self.options.prefill_chunk, context, self.max_slots)
        n = context if phase == "prefill" else 1  # a prefill slice of `context` tokens at position 0
        return full_batch(phase, bucket, n, context, self.max_slots)

    def sample(self, point: Point) -> float:
        self.timer.embed_s = self.timer.blocks_s = 0.0
        step = self.executor.step(self.batch(point.phase, point.batch, point.tokens)).step_time_s
        if self._layer_share is not None:  # compiled: the step split by each part's share of the weights
            embed, blocks = self._layer_share
            self.timer.embed_s, self.timer.blocks_s = step * embed, step * blocks
        self.samples.setdefault(point, []).append(
            (step, self.timer.embed_s, self.timer.blocks_s / self.model.num_layers))
        return step

    def run(self, batch: StepBatch) -> float:
        """A step that is not recorded (for measuring against predictions)."""
        return self.executor.step(batch).step_time_s

    def document(self) -> dict:
        entries = []
        for point, rows in self.samples.items():
            step, embed, block = (statistics.median(col) for col in zip(*rows))
            head = max(step - embed - block * self.model.num_layers, 0.0)  # norm, LM head, sampling, glue
            for kind, seconds in (("embed", embed), ("block", block), ("head", head)):
                entries.append({"layer": kind, "phase": point.phase, "batch": point.batch, "tokens": point.tokens,
                                "seconds": seconds})
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]
        measured = {"mem_bw_bytes_per_s": measure_memory_bandwidth(), self.dtype: measure_matmul_flops(torch_dtype)}
        return {
            "device": "cpu",
            "model": self.model.name,
            "model_fingerprint": fingerprint(self.model.to_dict()),
            "dtype": self.dtype,
            "max_slots": self.max_slots,
            "max_context": self.max_context,
            "key_bucket_min": MIN_KEY_BUCKET,
            "prompt_key_min": MIN_PROMPT_KEYS,
            "source": f"lockstep calibrate on {platform.node()} ({platform.processor() or platform.machine()}), "
                      f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
                      f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
            "measured": measured,
            "entries": entries,
        }

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.executor.close()


def calibrate(model: scheduler.ModelSpec, dtype: str = "fp32", max_slots: int = 8, max_context: int = 2048,
              prefill_chunk: int = 256, repeats: int = 10, seed: int = 0, progress=None, checkpoint: str = "",
              compiled: bool = False) -> dict:
    """Measures on the host CPU, point by point (2 warm-up steps, then `repeats`); returns
    the calibration JSON document."""
    cal = Calibrator(model, dtype, max_slots, max_context, prefill_chunk, seed, checkpoint, compiled)
    try:
        for point in cal.points():
            for _ in range(2):
                cal.run(cal.batch(point.phase, point.batch, point.tokens))
            steps = [cal.sample(point) for _ in range(repeats)]
            if progress:
                progress(f"{point.phase:<7} batch {point.batch:>3} tokens {point.tokens:>5}: "
                         f"step {statistics.median(steps) * 1e3:8.3f} ms")
        return cal.document()
    finally:
        cal.close()

