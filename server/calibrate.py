"""Calibration: measure this host's device and the model's per-layer step times, so the
compiler's predictions for this machine come true.

What is measured (medians over `repeats` runs after warm-up):
- memory read bandwidth (sum over a 256 MB fp32 tensor), bytes/s;
- dense fp32/bf16 matmul throughput (2048 x 2048 x 2048), FLOP/s;
- the real executor step (`LocalExecutor.step`, sampling included) for every decode
  bucket at each attended-key length the runtime uses (powers of two from 128 up to
  max_context), and for one prefill chunk per bucket of the program (batch 1).
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
from scheduler.program import fingerprint
from server.executor import LocalExecutor, RuntimePlan, StageSpec
from server.sampling import GREEDY
from server.step import MIN_KEY_BUCKET, StepBatch


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


def key_buckets(max_context: int) -> list[int]:
    out, k = [], MIN_KEY_BUCKET
    while k < max_context:
        out.append(k)
        k *= 2
    return out + [max_context]


def calibrate(model: scheduler.ModelSpec, dtype: str = "fp32", max_slots: int = 8, max_context: int = 2048,
              prefill_chunk: int = 256, repeats: int = 10, seed: int = 0, progress=None) -> dict:
    """Measures on the host CPU; returns the calibration JSON document."""
    options = scheduler.CompileOptions(dtype=dtype, max_slots=max_slots, max_context=max_context,
                                       prefill_chunk=min(prefill_chunk, max_context),
                                       prompt_len=min(128, max_context - 1))
    plan = RuntimePlan(model, dtype, max_slots, max_context,
                       (StageSpec(0, 0, model.num_layers + 2, "cpu"),), seed=seed)
    executor = LocalExecutor(plan)
    stage = executor.runners[0].model
    timer = _Timer()
    handles = timer.attach(stage)
    entries = []

    def measure(phase: str, bucket: int, chunk: int, context: int, tokens_key: int):
        rows = range(bucket)
        n = chunk if phase == "prefill" else 1
        position = context - n
        batch = StepBatch(phase, bucket, chunk, tuple(rows), tuple((1,) * n for _ in rows),
                          tuple(position for _ in rows), tuple(GREEDY for _ in rows))
        for _ in range(2):
            executor.step(batch)
        steps, embeds, blocks = [], [], []
        for _ in range(repeats):
            timer.embed_s = timer.blocks_s = 0.0
            steps.append(executor.step(batch).step_time_s)
            embeds.append(timer.embed_s)
            blocks.append(timer.blocks_s / model.num_layers)
        step, embed, block = statistics.median(steps), statistics.median(embeds), statistics.median(blocks)
        head = max(step - embed - block * model.num_layers, 0.0)
        for kind, seconds in (("embed", embed), ("block", block), ("head", head)):
            entries.append({"layer": kind, "phase": phase, "batch": bucket, "tokens": tokens_key, "seconds": seconds})
        if progress:
            progress(f"{phase:<7} batch {bucket:>3} tokens {tokens_key:>5}: step {step * 1e3:8.3f} ms")

    try:
        for bucket in options.buckets:
            for keys in key_buckets(max_context):
                measure("decode", bucket, 1, keys, keys)
        measure("prefill", 1, options.prefill_chunk, options.prefill_chunk, options.prefill_chunk)
    finally:
        for handle in handles:
            handle.remove()
        executor.close()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    measured = {"mem_bw_bytes_per_s": measure_memory_bandwidth(), dtype: measure_matmul_flops(torch_dtype)}
    return {
        "device": "cpu",
        "model": model.name,
        "model_fingerprint": fingerprint(model.to_dict()),
        "dtype": dtype,
        "max_slots": max_slots,
        "max_context": max_context,
        "key_bucket_min": MIN_KEY_BUCKET,
        "source": f"lockstep calibrate on {platform.node()} ({platform.processor() or platform.machine()}), "
                  f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
                  f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
        "measured": measured,
        "entries": entries,
    }


def merge(docs: list[dict]) -> dict:
    """Several calibration runs of the same model as one: the median of each entry, and
    of each measured device figure. On a shared, noisy host, rounds spread over time
    (interleaved with whatever else is measured) track its drift better than one run."""
    by_key: dict[tuple, list[float]] = {}
    for doc in docs:
        for e in doc["entries"]:
            by_key.setdefault((e["layer"], e["phase"], e["batch"], e["tokens"]), []).append(e["seconds"])
    entries = [{"layer": k[0], "phase": k[1], "batch": k[2], "tokens": k[3], "seconds": statistics.median(v)}
               for k, v in by_key.items()]
    measured = {key: statistics.median(doc["measured"][key] for doc in docs) for key in docs[0]["measured"]}
    return {**docs[0], "entries": entries, "measured": measured,
            "source": f"median of {len(docs)} runs; first: {docs[0]['source']}"}
