"""`lockstep serve`: calibrate (or load a calibration), compile, start the engine actor,
print one ready line, run until SIGTERM / SIGINT (or --duration-s), shut down cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import scheduler
from scheduler.errors import SpecError
from scheduler.program import fingerprint
from server.app import EngineActor, LockstepServer, ServeConfig

CACHE_DIR = Path(os.environ.get("LOCKSTEP_CACHE", Path.home() / ".cache" / "lockstep"))


def _calibration(args, model, pool) -> scheduler.Calibration | None:
    if args.calibration == "none":
        return None
    if args.calibration != "auto":
        return scheduler.Calibration.load(args.calibration)
    if not any(g.device.name == "cpu" for g in pool.groups):
        return None  # simulated or GPU pools use the device presets
    key = f"{model.name}-{fingerprint(model.to_dict())}-{args.dtype}-{args.max_slots}-{args.max_context}-{args.prefill_chunk}"
    path = CACHE_DIR / f"calib-{key}.json"
    if not path.exists():
        # In a process of its own: this process must not run torch on a second thread
        # (see app.LockstepServer.start), and a calibration is a clean measurement.
        print(f"lockstep serve: calibrating {model.name} on this host (once; cached in {path})", file=sys.stderr)
        tmp = path.with_suffix(".tmp")
        subprocess.run([sys.executable, "-m", "server.cli", "calibrate", "--model", args.model, "--dtype", args.dtype,
                        "--max-slots", str(args.max_slots), "--max-context", str(args.max_context),
                        "--prefill-chunk", str(args.prefill_chunk), "--repeats", "3", "-o", str(tmp)],
                       check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        tmp.replace(path)
    return scheduler.Calibration.load(path)


def _validate(args) -> None:
    if args.executor not in ("local", "ray"):
        raise SpecError(f"--executor must be local or ray, got {args.executor!r}")
    if args.no_ray and args.executor == "ray":
        raise SpecError("--executor ray needs Ray; drop --no-ray")
    for name in ("port", "metrics_port"):
        if not 0 <= getattr(args, name) <= 65535:
            raise SpecError(f"--{name.replace('_', '-')} must be in 0..65535, got {getattr(args, name)}")
    for name in ("max_queue", "max_tokens"):
        if getattr(args, name) < 1:
            raise SpecError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.time_scale, args.guard_band_ms, args.guard_band_pct, args.grace_s, args.duration_s) < 0:
        raise SpecError("--time-scale, --guard-band-ms, --guard-band-pct, --grace-s and --duration-s must be >= 0")
    if args.dtype not in ("fp32", "bf16", "fp16"):
        raise SpecError(f"serve runs fp32, bf16 or fp16 weights, not {args.dtype!r}")


def build_config(args) -> tuple[ServeConfig, scheduler.Program]:
    _validate(args)
    model_arg = args.model
    if args.checkpoint and model_arg == "checkpoint":
        model_arg = args.checkpoint
    model = scheduler.get_model(model_arg)
    pool = scheduler.parse_pool(args.pool)
    options = scheduler.CompileOptions(dtype=args.dtype, max_slots=args.max_slots, max_context=args.max_context,
                                       prefill_chunk=args.prefill_chunk, prompt_len=min(128, args.max_context - 1))
    program = scheduler.compile(model, pool, options, _calibration(args, model, pool))
    config = ServeConfig(program.to_json(), executor=args.executor, seed=args.seed, checkpoint=args.checkpoint,
                         deterministic=not args.throughput, time_scale=args.time_scale,
                         guard_band_s=args.guard_band_ms / 1e3, guard_band_frac=args.guard_band_pct / 100,
                         host=args.host, port=args.port,
                         metrics_port=args.metrics_port, max_queue=args.max_queue, max_tokens=args.max_tokens)
    return config, program


def _ready_line(info: dict) -> str:
    return (f"lockstep serve: ready grpc={info['grpc']} metrics={info['metrics']} model={info['model']} "
            f"plan={info['plan_hash'][:16]} executor={info['executor']} mode={info['mode']} "
            f"time_scale={info['time_scale']:.3f}")


def serve(args) -> int:
    config, program = build_config(args)
    stop = threading.Event()
    if args.no_ray:
        _on_signals(stop)
        return asyncio.run(_serve_here(config, args, stop))
    return _serve_in_ray(config, program, args, stop)


def _on_signals(stop: threading.Event) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())


async def _serve_here(config: ServeConfig, args, stop: threading.Event) -> int:
    server = LockstepServer(config)
    print(_ready_line(await server.start()), flush=True)
    await asyncio.to_thread(stop.wait, args.duration_s or None)
    await server.stop(args.grace_s)
    print("lockstep serve: stopped", flush=True)
    return 0


def _serve_in_ray(config: ServeConfig, program: scheduler.Program, args, stop: threading.Event) -> int:
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        if args.ray_address:
            ray.init(address=args.ray_address, log_to_driver=False)
        else:
            chips = {}
            for group in program.data["pool"]["spec"]["groups"]:
                name = group["device"]["name"]
                if name not in ("cpu", "h100", "h200", "a100"):
                    chips[name] = chips.get(name, 0) + group["count"]
            ray.init(num_cpus=os.cpu_count(), resources=chips or None, include_dashboard=False, log_to_driver=False)
    _on_signals(stop)  # after ray.init, which installs handlers of its own that end the driver
    gpus = len({s["devices"][0] for s in program.data["stages"] if s["device"] in ("h100", "h200", "a100")})
    options = {"num_cpus": 1, "max_concurrency": 1000}
    if gpus and config.executor == "local":
        options["num_gpus"] = gpus
    actor = ray.remote(EngineActor).options(**options).remote()
    try:
        info = ray.get(actor.start.remote(config))
        print(_ready_line(info), flush=True)
        stop.wait(args.duration_s or None)
        ray.get(actor.stop.remote(args.grace_s))
        print("lockstep serve: stopped", flush=True)
    finally:
        ray.kill(actor)
        if started_ray:
            ray.shutdown()
    return 0
