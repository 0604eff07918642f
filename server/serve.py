"""`lockstep serve`: calibrate (or load a calibration), compile, start the front end here
and the engine core in a child process (docs/architecture.md, "The engine core process"),
print one ready line (`pid=`: this process, which owns shutdown; `core_pid=`: the core's),
run until SIGTERM / SIGINT to either (or --duration-s), shut down cleanly.

Exit codes: 0 after a signal or --duration-s (within --grace-s); 1 when the engine died
(its loop, its process, a stage actor): the server does not try to limp on, so a
supervisor (systemd, Kubernetes, a Ray job) restarts it. See docs/security.md.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time

import scheduler
from server.programs import compile_program, record_time_scale
from scheduler.errors import SpecError
from server.app import LockstepServer
from server.config import ServeConfig
from server.frontend.auth import read_secret

EXIT_ENGINE_DIED = 1
# Ray's own teardown (kill the actor, ray.shutdown, the driver's exit): kept out of the
# grace period the engine actor drains for, so the driver exits within --grace-s.
# Measured 1.1-1.3 s at first; later on this host ray.shutdown alone took 1.36-1.38 s and
# drivers exited 3.03-3.33 s after SIGTERM with a 3 s grace and a 1.5 s reserve.
RAY_TEARDOWN_S = 2.0
WATCH_INTERVAL_S = 0.2  # how often the driver checks for a signal or a dead engine


def _validate(args) -> None:
    if args.executor not in ("local", "ray"):
        raise SpecError(f"--executor must be local or ray, got {args.executor!r}")
    if args.no_ray and args.executor == "ray":
        raise SpecError("--executor ray needs Ray; drop --no-ray")
    for name in ("port", "metrics_port"):
        if not 0 <= getattr(args, name) <= 65535:
            raise SpecError(f"--{name.replace('_', '-')} must be in 0..65535, got {getattr(args, name)}")
    if not -1 <= args.http_port <= 65535:
        raise SpecError(f"--http-port must be in 0..65535, or -1 for no HTTP, got {args.http_port}")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SpecError("--tls-cert and --tls-key go together")
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                       ("--auth-token-file", args.auth_token_file)):
        if path:
            try:
                read_secret(path, flag)
            except ValueError as exc:
                raise SpecError(str(exc)) from None
    for name in ("max_queue", "max_tokens"):
        if getattr(args, name) < 1:
            raise SpecError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.front_end_nice <= 19:
        raise SpecError(f"--front-end-nice must be in 0..19, got {args.front_end_nice}")
    if not 0 <= args.core_nice <= 19:
        raise SpecError(f"--core-nice must be in 0..19, got {args.core_nice}")
    if min(args.time_scale, args.guard_band_pct or 0, args.grace_s, args.duration_s) < 0:
        raise SpecError("--time-scale, --guard-band-ms, --guard-band-pct, --grace-s and --duration-s must be >= 0")
    if args.guard_band_ms is not None and not 0 <= args.guard_band_ms <= MAX_GUARD_MS:  # NaN fails it too
        raise SpecError(f"--guard-band-ms must be in 0..{MAX_GUARD_MS:g}, got {args.guard_band_ms}")
    if args.pace_margin_pct is not None and not 0 <= args.pace_margin_pct <= 100:  # NaN fails it too
        raise SpecError(f"--pace-margin-pct must be in 0..100, got {args.pace_margin_pct}")
    if not 0 <= args.send_wait_ms <= MAX_SEND_WAIT_MS:  # NaN fails it too
        raise SpecError(f"--send-wait-ms must be in 0..{MAX_SEND_WAIT_MS:g}, got {args.send_wait_ms}")
    from server.cli import check_promise_flags

    for flag in ("pace_quantile", "prefill_quantile"):
        if not 0 < getattr(args, flag) <= 1:  # NaN fails it too
            raise SpecError(f"--{flag.replace('_', '-')} must be in (0, 1], got {getattr(args, flag)}")
    check_promise_flags(args)
    if args.replicas < 1:
        raise SpecError(f"--replicas must be >= 1, got {args.replicas}")
    if args.tick_log:
        if args.replicas > 1:
            raise SpecError("--tick-log records one engine core's ticks; replicas have one each (drop one)")
        try:
            args.tick_log = os.path.abspath(args.tick_log)  # an actor's process has another working folder
            open(args.tick_log, "a").close()  # here, not in the core process after the calibration
        except OSError as exc:
            raise SpecError(f"--tick-log {args.tick_log}: {exc.strerror or exc}") from None
    if args.replicas > 1 and args.no_ray:
        raise SpecError("--replicas places engines with Ray; drop --no-ray")
    if args.pipeline and (args.executor != "ray" or args.throughput):
        raise SpecError("--pipeline keeps steps of several row groups in the stage actors at once: it needs "
                        "--executor ray, and paced ticks (drop --throughput)")
    if args.dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise SpecError(f"serve runs fp32, bf16 or fp16 weights (or auto), not {args.dtype!r}")
    from server.core.affinity import parse_cpus

    args.core_cpus = parse_cpus(args.core_cpus)  # before the compile: a calibration can take minutes
    if args.core_cpus and args.replicas > 1:
        raise SpecError("--core-cpus pins this host's one engine core; replicas are placed by Ray (drop one)")


MAX_GUARD_MS = 1000.0  # a wait before a step, per held token: more is a typo, not a setting
MAX_SEND_WAIT_MS = 100.0  # a bound on a wait that takes ~0.1-0.3 ms: more is a typo


def guard_band_s(args) -> float:
    """`--guard-band-ms` in seconds; unset, the engine's default, or with --pipeline the 1.5 ms
    a pipelined tick adds (there it is in every tick, not taken from a lead)."""
    if args.guard_band_ms is not None:
        return args.guard_band_ms / 1e3
    from server.core.engine import EngineConfig
    from server.core.pipelined import PIPELINED_GUARD_S

    return PIPELINED_GUARD_S if args.pipeline else EngineConfig.guard_band_s


def build_config(args, meanwhile=None) -> tuple[ServeConfig, scheduler.Program]:
    """`meanwhile(pool)`: called while a calibration is measured, if one is (compile_program)."""
    _validate(args)
    program, model, _ = compile_program(args, meanwhile=meanwhile)
    stages = len(program.data["stages"])
    if args.pipeline and not 2 <= stages <= args.max_slots:
        raise SpecError(f"--pipeline needs a program of 2 to --max-slots ({args.max_slots}) stages, one row group "
                        f"each; {model.name} on {args.pool} compiles to {stages}")
    config = ServeConfig(program.to_json(), executor=args.executor, seed=args.seed, checkpoint=args.checkpoint,
                         compiled=args.compiled_steps == "on",
                         core_cpus=args.core_cpus, core_nice=args.core_nice, tick_log=args.tick_log,
                         deterministic=not args.throughput, time_scale=args.time_scale,
                         guard_band_s=guard_band_s(args), send_wait_s=args.send_wait_ms / 1e3, guard_band_frac=None if args.guard_band_pct is None else args.guard_band_pct / 100,
                         pace_margin=None if args.pace_margin_pct is None else args.pace_margin_pct / 100,
                         adaptive_pacing=not args.fixed_pacing, alone_own_step=args.alone_tpot == "own",
                         join_share=args.join_share, start_lead_quantile=args.start_lead_quantile,
                         admission_window_s=args.admission_window_ms / 1e3,
                         window_grace_s=args.window_grace_ms / 1e3, pace_quantile=args.pace_quantile,
                         prefill_quantile=args.prefill_quantile, prefill_tail_once=args.prefill_tails == "one",
                         host=args.host, port=args.port, metrics_host=args.metrics_host,
                         metrics_port=args.metrics_port, max_queue=args.max_queue, max_tokens=args.max_tokens,
                         tls_cert=args.tls_cert, tls_key=args.tls_key, auth_token_file=args.auth_token_file,
                         reflection=not args.no_reflection, front_end_nice=args.front_end_nice,
                         pipeline=args.pipeline,
                         http_port=args.http_port)
    return config, program


def _ready_line(info: dict) -> str:
    return (f"lockstep serve: ready grpc={info['grpc']} http={info['http'] or 'off'} metrics={info['metrics']} model={info['model']} "
            f"dtype={info['dtype']} compiled={'on' if info.get('compiled') else 'off'} plan={info['plan_hash'][:16]} executor={info['executor']} mode={info['mode']} "
            f"time_scale={info['time_scale']:.3f} guard_band_pct={100 * (info.get('guard_band_frac') or 0):.1f} tls={'on' if info['tls'] else 'off'} "
            f"auth={'on' if info['auth'] else 'off'} pid={info['pid']}"
            + (f" core_pid={info['core_pid']}" if info.get("core_pid") else "")
            + (f" replicas={','.join(info['replicas'])}" if info.get("replicas") else ""))


def serve(args) -> int:
    # Ray starts while a first start's calibration runs in its own process (it builds the
    # compiled package on about one core): `make demo`'s fresh start ~8 s sooner.
    ray_up = []  # [(the ray module, whether this process started it)] once Ray is up

    def start_ray(pool) -> None:
        ray_up.append(_init_ray(tuple((g.device.name, g.device.kind, g.count) for g in pool.groups), args))

    try:
        config, program = build_config(args, meanwhile=None if args.no_ray else start_ray)
    except BaseException:
        if ray_up and ray_up[0][1]:
            ray_up[0][0].shutdown()
        raise
    stop = threading.Event()
    if args.no_ray:
        _on_signals(stop)
        return asyncio.run(_serve_here(config, args, stop))
    if args.replicas > 1:
        code = _serve_replicas(config, program, args, stop)
    else:
        code = _serve_in_ray(config, program, args, stop, started_ray=bool(ray_up and ray_up[0][1]))
    _exit_now(code)


def _exit_now(code: int) -> None:
    """Exits at once, Ray already shut down: the interpreter's own teardown with torch and
    Ray loaded took 0.7-0.8 s more (measured), past the grace period a SIGTERM was given
    (drivers exited 3.2-3.6 s after it with a 3 s grace). Nothing is left to clean: the
    engine actor is gone, Ray is down, and the streams are flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _on_signals(stop: threading.Event) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())


def _until(stop: threading.Event, duration_s: float, failed=lambda: False) -> bool:
    """Waits for a signal, the duration, or `failed()`; returns whether the engine failed."""
    end = time.monotonic() + duration_s if duration_s else float("inf")
    while not stop.is_set() and time.monotonic() < end:
        if failed():
            return True
        stop.wait(min(WATCH_INTERVAL_S, max(0.0, end - time.monotonic())))
    return failed()


PACE_RECORD_S = 1.0  # how often the pace serve runs at is recorded for `lockstep simulate`, when it moved


async def record_pace(metrics, info: dict, interval_s: float = PACE_RECORD_S) -> None:
    """Records the engine's pace (`metrics.pace_state`: scheduler/simulate.Pace, kept current
    by the engine; else `metrics.pace`, phase -> factor) for `lockstep simulate` whenever it
    moved, until cancelled: simulate then predicts with the pace the server runs at now, not
    the one it started with (this host's served steps ran at up to 1.8x the start-up
    measurement, which has no client beside it: simulated first tokens at c=8 0.71x the
    measured; BENCHMARKS.md, "Simulated against measured"), and with the prefill tails and
    cold allowance the engine's promises add (without them, first tokens simulated 0.8x
    the measured at c=1, c=8 and a bursty load); and how late the doors' last tokens left
    (`metrics.delivery_late`), which simulate's own tokens then leave as."""
    # On the front end's event loop, beside the held tokens' timers: the lateness samples
    # (2 x 1024) are copied and written only when tokens went out since the last record.
    last, seen = dict(info.get("pace") or {}), metrics.late_tokens
    while True:
        await asyncio.sleep(interval_s)
        now = dict(metrics.pace_state or metrics.pace) or last
        if now and (now != last or metrics.late_tokens != seen):
            late = {which: list(xs) for which, xs in metrics.delivery_late.items()}
            record_time_scale(info["plan_hash"], info["time_scale"], info.get("guard_band_frac"), now, late)
            last, seen = now, metrics.late_tokens


async def _serve_here(config: ServeConfig, args, stop: threading.Event, router=None, bundle=None,
                      grace_s: float | None = None) -> int:
    server = LockstepServer(config, router=router, router_bundle=bundle)
    server.on_shutdown_request = stop.set
    info = await server.start()
    # For `lockstep simulate` of this program: the pace serve measured and started with,
    # then the pace it runs at (a re-pace recorded within PACE_RECORD_S).
    record_time_scale(info["plan_hash"], info["time_scale"], info.get("guard_band_frac"), info.get("pace"))
    print(_ready_line(info), flush=True)
    recorder = asyncio.ensure_future(record_pace(server.metrics, info))
    try:
        died = await asyncio.to_thread(_until, stop, args.duration_s, server.failed.is_set)
    finally:
        recorder.cancel()
    await server.stop(0.5 if died else args.grace_s if grace_s is None else grace_s)
    if died:
        print(f"lockstep serve: engine died ({server.failure}); exiting", file=sys.stderr, flush=True)
        return EXIT_ENGINE_DIED
    print("lockstep serve: stopped", flush=True)
    return 0


def _serve_replicas(config: ServeConfig, program: scheduler.Program, args, stop: threading.Event) -> int:
    """N replicas in Ray actors (server/frontend/router.py); this process is their front end."""
    from server.frontend.router import RoutedAdmission, replica_config

    view = program.view()
    ray, _ = _init_ray(view.pool_devices, args)
    _on_signals(stop)
    gpus = len({s.devices[0] for s in view.stages if s.kind == "gpu"})
    bundle = {"CPU": 1, **({"GPU": gpus} if gpus and config.executor == "local" else {})}
    token = read_secret(config.auth_token_file, "--auth-token-file") if config.auth_token_file else b""
    router = RoutedAdmission(replica_config(config, args.replicas, bool(args.ray_address), os.cpu_count() or 1),
                             args.replicas, args.route, token)
    try:
        # Ray's teardown after the drain is kept out of the grace period, as for one engine.
        return asyncio.run(_serve_here(config, args, stop, router, bundle, max(0.5, args.grace_s - RAY_TEARDOWN_S)))
    finally:
        if ray.is_initialized():
            ray.shutdown()


def _init_ray(pool_devices, args):
    """Joins --ray-address, or starts a local Ray on 127.0.0.1 with this host's cores and
    a custom resource per simulated chip kind (`pool_devices`: (name, kind, count) per
    device group); (the ray module, whether it started it: False if Ray was up)."""
    if not args.ray_address:
        # A local Ray binds every service (GCS, raylet, workers, agents) to 127.0.0.1 only
        # when this is 0; read when ray is imported. Ray's default is all interfaces,
        # unauthenticated. To serve from a cluster, start it yourself and pass --ray-address.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    started = not ray.is_initialized()
    if started:
        if args.ray_address:
            ray.init(address=args.ray_address, log_to_driver=False)
        else:
            chips = {}
            for name, kind, count in pool_devices:
                if kind == "simulated":
                    chips[name] = chips.get(name, 0) + count
            ray.init(num_cpus=os.cpu_count(), resources=chips or None, include_dashboard=False, log_to_driver=False)
    return ray, started


def _serve_in_ray(config: ServeConfig, program: scheduler.Program, args, stop: threading.Event,
                  started_ray: bool = False) -> int:
    """One engine, Ray up for what uses it (`--executor ray` stage actors, a cluster named by
    --ray-address). This process is the front end and owns shutdown: the pid the ready line
    prints. The engine core is its child process, and joins this Ray (server/core/client.py)."""
    ray, started = _init_ray(program.view().pool_devices, args)
    started_ray = started or started_ray  # or `serve` started it during the calibration
    _on_signals(stop)  # after ray.init, which installs handlers of its own that end the driver
    try:
        # Ray's teardown after the drain is kept out of the grace period.
        return asyncio.run(_serve_here(config, args, stop, grace_s=max(0.5, args.grace_s - RAY_TEARDOWN_S)))
    finally:
        if started_ray:
            ray.shutdown()
