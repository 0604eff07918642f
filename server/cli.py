"""The `lockstep` command: wiring only. Each subcommand parses flags and calls a library.

Bad input (unknown preset, malformed pool, out-of-range sizes, a model that does not fit)
prints one line on stderr and exits with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scheduler.fleet import POLICIES
from scheduler.simulate import WINDOW_GRACE_S
from scheduler.simulate import START_LEAD_QUANTILE
from scheduler.ticks import JOIN_SHARE
from server.core.affinity import CORE_NICE
from server.programs import AUTO_COMPILED_HELP, COMPILED_CHOICES, add_program_args, compile_program

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage too by default)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _add_compile(sub) -> None:
    p = sub.add_parser("compile", help="compile a model onto a device pool into a timed program")
    add_program_args(p)  # serve's flags and defaults (server/programs.py)
    p.add_argument("--prompt-len", type=int, default=128, help="prompt length for the predictions (default 128)")
    p.add_argument("--objective", default="latency", help="latency or throughput (default latency)")
    p.add_argument("-o", "--output", help="write the program JSON here")
    p.add_argument("--trace", help="write a Chrome trace-event JSON here (open in ui.perfetto.dev)")
    p.add_argument("--json", action="store_true", help="print one JSON summary object instead of text")
    p.set_defaults(run=_run_compile)


def _run_compile(args) -> int:
    from scheduler.report import summary_json, summary_text
    from scheduler.trace import write_trace

    program, _, _ = compile_program(args, prompt_len=args.prompt_len, objective=args.objective)
    for path in (args.output, args.trace):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if args.output:
        Path(args.output).write_text(program.to_json())
    if args.trace:
        write_trace(program, args.trace)
    if args.json:
        print(json.dumps(summary_json(program), sort_keys=True))
    else:
        print(summary_text(program))
        for label, path in (("program", args.output), ("trace", args.trace)):
            if path:
                print(f"{label:<9} {path}")
    return 0


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="measure this host and the model's per-layer step times")
    p.add_argument("--model", required=True, help="preset name or path to a HF config.json")
    p.add_argument("--device", default="cpu", help="the device to measure (only cpu so far)")
    p.add_argument("--dtype", default="auto", help="fp32, bf16, fp16 or auto (default): as serve's")
    p.add_argument("--max-slots", type=int, default=8, help="as for compile (default 8)")
    p.add_argument("--max-context", type=int, default=2048, help="as for compile (default 2048)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="as for compile (default 256)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per point (median; default 10)")
    p.add_argument("--compiled-steps", choices=COMPILED_CHOICES, default="auto",
                   help="as serve's: measure compiled steps (on), eager ones (off), or auto (default): " + AUTO_COMPILED_HELP)
    p.add_argument("--checkpoint", default="", help="measure with these weights (HF folder; default: random)")
    p.add_argument("-o", "--output", required=True, help="write the calibration JSON here")
    p.set_defaults(run=_run_calibrate)


def _run_calibrate(args) -> int:
    import scheduler
    from scheduler.errors import SpecError

    if args.device != "cpu":
        raise SpecError(f"calibrate measures the host cpu only for now, not {args.device!r}")
    from server.programs import resolve_compiled, resolve_dtype

    args.dtype = resolve_dtype(args.dtype, scheduler.parse_pool("cpu"))  # the host it measures
    if args.dtype not in ("fp32", "bf16", "fp16"):
        raise SpecError(f"calibrate runs fp32, bf16 or fp16 models (or auto), not {args.dtype!r}")
    if args.repeats < 1:
        raise SpecError(f"repeats must be a positive integer, got {args.repeats}")
    model = scheduler.get_model(args.model)
    args.compiled_steps = resolve_compiled(args.compiled_steps, model, scheduler.parse_pool("cpu"))
    # Validates sizes the way compile will, before minutes of measuring.
    scheduler.CompileOptions(dtype=args.dtype, max_slots=args.max_slots, max_context=args.max_context,
                             prefill_chunk=args.prefill_chunk, prompt_len=1)
    if args.max_context > model.max_position:
        raise SpecError(f"max-context {args.max_context} exceeds {model.name}'s max_position {model.max_position}")
    from server.runtime.calibrate import calibrate

    data = calibrate(model, args.dtype, args.max_slots, args.max_context, args.prefill_chunk, args.repeats,
                     progress=lambda line: print(line, file=sys.stderr), checkpoint=args.checkpoint,
                     compiled=args.compiled_steps == "on")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"calibration {args.output}: {len(data['entries'])} entries, memory read "
          f"{data['measured']['mem_bw_bytes_per_s'] / 1e9:.1f} GB/s, {args.dtype} matmul "
          f"{data['measured'][args.dtype] / 1e9:.0f} GFLOP/s")
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="compile, then serve the program over gRPC with Prometheus metrics",
                       description="Fixed limits: requests of at most 1 MiB; prompts of at most max-context - 1 "
                                   "tokens (longer text is refused before it is tokenized); request_id of at most "
                                   "128 printable ASCII characters; at most 8 stop strings of 1..64 characters. "
                                   "Exits 0 after SIGTERM/SIGINT within --grace-s, 1 if the engine dies.")
    add_program_args(p)
    p.add_argument("--seed", type=int, default=0, help="random-init seed (default 0)")
    add_serving_args(p)
    add_runtime_args(p)
    p.add_argument("--duration-s", type=float, default=0.0, help="stop by itself after this long (0: run until signalled)")
    p.set_defaults(run=_run_serve)


MAX_WINDOW_MS = 1000.0  # --admission-window-ms: a window delays promises; a second is already a long wait


def check_promise_flags(args) -> None:
    """Raises SpecError naming `--admission-window-ms` or `--window-grace-ms` outside
    0..MAX_WINDOW_MS, or `--join-share` or `--start-lead-quantile` outside 0..1 (NaN fails them too): serve and
    simulate take the same flags."""
    from scheduler.errors import SpecError

    for flag in ("join_share", "start_lead_quantile"):
        if not 0 <= getattr(args, flag) <= 1:
            raise SpecError(f"--{flag.replace('_', '-')} must be in 0..1, got {getattr(args, flag)}")

    for flag in ("admission_window_ms", "window_grace_ms"):
        if not 0 <= getattr(args, flag) <= MAX_WINDOW_MS:
            raise SpecError(f"--{flag.replace('_', '-')} must be in 0..{MAX_WINDOW_MS:g}, got {getattr(args, flag)}")


def add_serving_args(p) -> None:
    """Serve's flags that shape the ticks and the queue: `lockstep simulate` models them."""
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a KV slot beyond the free ones; one more gets RESOURCE_EXHAUSTED "
                        "(default 64)")
    p.add_argument("--throughput", action="store_true", help="do not pace ticks (throughput mode)")
    p.add_argument("--time-scale", type=float, default=0.0, help="program seconds -> wall seconds (default: measured at start)")
    p.add_argument("--guard-band-ms", type=float, default=None,
                   help="a step that would overlap a held token's promised time starts this long after it (the "
                        "front end and the client take the token meanwhile), taken from the streams' lead, not "
                        "from any tick (default 5; with --pipeline 1.5, added to each tick)")
    p.add_argument("--send-wait-ms", type=float, default=5.0,
                   help="before the step after a first token, the engine core waits at most this long for "
                        "it to be sent to the front end (a compiled step holds the core's GIL, so it would "
                        "otherwise go after that step); 0: no wait (default 5)")
    p.add_argument("--guard-band-pct", type=float, default=None,
                   help="and this percentage of the tick's predicted step time, until the measured steps "
                        "re-pace the ticks (default: the step jitter measured at start, 10-30%%)")
    p.add_argument("--pace-margin-pct", type=float, default=None,
                   help="the margin over the served steps' quantile (--pace-quantile) once a phase paces from "
                        "its own ticks, percent (default: 10, or --guard-band-pct when given)")
    p.add_argument("--start-lead-quantile", type=float, default=START_LEAD_QUANTILE,
                   help="every promise adds this quantile (0..1) of how late the last 64 streams' first 8 "
                        "tokens would have been made without it: a stream's first tokens have no lead of "
                        "their own; 0: none (default %(default)s)")
    p.add_argument("--join-share", type=float, default=JOIN_SHARE,
                   help="the share (0..1) of a mixed tick's excess over the decode tick that a stream in "
                        "company is promised on every token: 1 promises the longest tick; below it a prompt "
                        "goes in beside running streams as their banked slack allows (default %(default)s)")
    p.add_argument("--alone-tpot", choices=("own", "company"), default="own",
                   help="the TPOT promised to a request that arrives alone (nothing running or waiting, no "
                        "earlier stream still being handed out): its own decode step (own: a lone stream runs at "
                        "full speed, and requests arriving during it wait for it), or the longest tick, as in "
                        "company (company: a burst after a quiet spell all starts at once) (default own)")
    p.add_argument("--admission-window-ms", type=float, default=50.0,
                   help="a request that finds nothing running or waiting opens a window this long: those arriving within "
                        "it are promised together, as one arrival group whose prompts go in by whole prefill "
                        "steps (0: none; default 50). Its prompt goes in meanwhile: the window delays the "
                        "promise, not the first token")
    p.add_argument("--window-grace-ms", type=float, default=WINDOW_GRACE_S * 1e3,
                   help="before a window closes on a member's first token, let the arrivals that came during that "
                        "step join it for this long (a compiled step holds the core's input thread until it ends) "
                        f"(default {WINDOW_GRACE_S * 1e3:g}: none)")
    p.add_argument("--fixed-pacing", action="store_true",
                   help="keep the start-up pace (time scale x guard band) instead of following the measured "
                        "steps (a quantile of the last 128 + the guard band, re-estimated every 64 ticks; "
                        "a slowdown within 16)")
    p.add_argument("--pace-quantile", type=float, default=0.95,
                   help="the quantile of the served decode and mixed steps (the last 128) their pace covers, "
                        "before the guard band. Streams run ahead of their promises and their lead absorbs a "
                        "slow step, so 0.5 (the median) gives faster cadences, but promises break when the host "
                        "slows within a stream's life (default 0.95)")
    p.add_argument("--prefill-quantile", type=float, default=0.95,
                   help="the quantile of the served prefill steps (the last 16) a first token's promise covers: "
                        "it has no lead before it, so a lower one promises sooner first tokens and some of them "
                        "late (default 0.95)")
    p.add_argument("--prefill-tails", choices=("one", "each"), default="one",
                   help="one: prefill ticks run at the median of their steps (each slice shape at its own after 4 "
                        "of them), and a first token is promised one "
                        "prefill tick at --prefill-quantile (a burst's prompts go in by several ticks back to "
                        "back, and one's lead absorbs another's excess); each: every prefill tick paced at "
                        "--prefill-quantile (default one)")
    p.add_argument("--replicas", type=int, default=1,
                   help="engines, each a whole server in a Ray actor on its own devices (a placement group "
                        "spreads them over the nodes), behind this process's gRPC and HTTP (default 1: one "
                        "engine, no router)")
    p.add_argument("--route", default="prediction", choices=POLICIES,
                   help="with --replicas > 1: send each request to the replica with the lowest predicted TTFT "
                        "(default), or round-robin, or to the one with the fewest requests outstanding")


def add_runtime_args(p) -> None:
    """Serve's flags that do not change a request's ticks (processes, ports, security):
    `lockstep simulate` accepts them, so it takes a serve command line as it is."""
    p.add_argument("--executor", default="local", help="local (stages in the engine process) or ray (one actor per stage)")
    p.add_argument("--pipeline", action="store_true",
                   help="pipelined stages: split the KV slots into one row group per stage and keep the groups' "
                        "steps in the stage actors together (needs --executor ray and 2+ stages)")
    p.add_argument("--core-cpus", default="",
                   help="CPUs the engine core process runs on, one torch thread each, e.g. 0 or 0-3; the front end "
                        "runs on the others (default: all CPUs for both)")
    p.add_argument("--core-nice", type=int, default=CORE_NICE,
                   help="niceness of the engine core process (0..19), so that a token's send and its client "
                        f"take a core from a step at once (default {CORE_NICE}; 0: the front end's priority; "
                        "docs/architecture.md, \"A step beside a delivery\")")
    p.add_argument("--tick-log", default="",
                   help="append a JSON line per tick (step shape, measured, program and paced ms, overrun) and per "
                        "ended request (its promise, the pace it was made at, when each token was made) to this "
                        "file (default: off; docs/architecture.md, \"The tick log\")")
    p.add_argument("--front-end-nice", type=int, default=0,
                   help="in deterministic mode, lower the event loop (gRPC handlers, admission, token sends) by "
                        "this niceness, below the engine core (default 0: off; 19 delayed token deliveries "
                        "beside the core process, BENCHMARKS.md)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible HTTP port (/v1/models, /v1/completions, /v1/chat/completions); "
                        "0: any free port; -1: no HTTP (default 8000)")
    p.add_argument("--host", default="127.0.0.1", help="gRPC address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    p.add_argument("--metrics-host", default="", help="address of the Prometheus endpoint (default: --host); "
                                                      "it answers GET /metrics only")
    p.add_argument("--metrics-port", type=int, default=9464, help="Prometheus port (0: any free port)")
    p.add_argument("--tls-cert", default="", help="PEM certificate chain: serve gRPC over TLS (with --tls-key)")
    p.add_argument("--tls-key", default="", help="PEM private key for --tls-cert")
    p.add_argument("--auth-token-file", default="", help="file holding a token: every RPC but health must send "
                                                         "'authorization: Bearer <token>' (else UNAUTHENTICATED)")
    p.add_argument("--no-reflection", action="store_true", help="do not serve gRPC server reflection")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask (default "
                                                               "1024; prompt + max_tokens must fit --max-context)")
    p.add_argument("--ray-address", default="", help="join this Ray cluster instead of starting a local one "
                                                     "(a local one listens on 127.0.0.1 only, no dashboard)")
    p.add_argument("--no-ray", action="store_true", help="run the engine in this process, without Ray")
    p.add_argument("--grace-s", type=float, default=10.0, help="on SIGTERM, in-flight streams get this long to "
                   "finish (the rest get UNAVAILABLE) and the process exits 0 within it (default 10)")


def _run_serve(args) -> int:
    from server.serve import serve

    return serve(args)


def _add_passthrough(sub) -> None:
    """Listed in --help; `main` hands their arguments over before argparse sees them."""
    sub.add_parser("demo", help="start lockstep serve, stream real requests, print latencies vs predictions "
                                "(arguments go to lockstep serve, but --tls-ca and --tls-server-name, which its "
                                "client uses with serve's --auth-token-file; default: --model smollm2-135m --pool cpu)")
    sub.add_parser("load", help="generate load against a server, over TLS with a bearer token if it wants them "
                                "(--tls-ca, --auth-token-file); write latency stats and plots (lockstep load --help)")
    sub.add_parser("simulate", help="the same load tests without a server: the tick scheduler over the "
                                    "compiled step times (lockstep simulate --help)")
    sub.add_parser("plan", help="the cheapest pool and replica count that meets a latency SLO at a rate, from "
                                "the compiler and the serving simulation (lockstep plan --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lockstep", description="Low-latency LLM serving with compile-time scheduling.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_compile(sub)
    _add_calibrate(sub)
    _add_serve(sub)
    _add_passthrough(sub)
    return parser


# Subcommands that take another program's flags as they are (argparse's REMAINDER
# cannot start with an option): `lockstep load ...` and `lockstep demo [serve flags]`.
PASSTHROUGH = {"load": "client.loadgen", "demo": "client.demo", "simulate": "client.simulate", "plan": "client.plan"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        import importlib

        return importlib.import_module(PASSTHROUGH[argv[0]]).main(argv[1:])
    args = build_parser().parse_args(argv)
    from scheduler.errors import FitError, SpecError

    try:
        return args.run(args)
    except (SpecError, FitError) as exc:
        print(f"lockstep {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # unwritable -o / --trace path and the like
        # An OSError built with one message (a port that cannot be bound) has no strerror.
        what = f"{exc.strerror}: {exc.filename}" if exc.strerror else str(exc)
        print(f"lockstep {args.command}: error: {what}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
