"""`lockstep demo`: start `lockstep serve` (a real process, real ports) with the packaged
real model (SmolLM2-135M-Instruct), ask it a few questions through its chat template,
print each answer and its token latencies against the server's predictions, then SIGTERM
the server and wait for its clean exit. With other server flags (e.g. `--model small`,
random weights) it sends plain text prompts instead.

A server started with `--tls-cert`/`--tls-key` or `--auth-token-file` is reached with them:
the client sends that token and trusts `--tls-ca FILE` (else the `--tls-cert` file: a
self-signed certificate is its own CA), with `--tls-server-name NAME` when the certificate
does not name 127.0.0.1. Those two flags are the demo's; the rest go to `lockstep serve`."""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

from client.client import LockstepClient
from client.connect import Security, add_security_args

CHAT_MODEL = "smollm2-135m"
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 12?",
    "Write one sentence about the sea.",
]
PROMPTS = [  # for random-weight models, which have no chat template
    "The lockstep engine decides at compile time",
    "Static shapes and a fixed cadence mean",
    "Every token leaves on a tick boundary, so",
    "Predict first, then measure:",
]


def _chat_prompts(server_args: list[str], proc: subprocess.Popen) -> concurrent.futures.Future | None:
    """The questions through the packaged model's chat template (token ids), loaded on a
    thread while the server starts, or None when the demo serves another model. The server
    converts the GGUF file if this machine has not; the thread waits for the converted
    folder, then loads the template (transformers' import, ~5 s here) while the server
    compiles and calibrates, not before it starts."""
    if CHAT_MODEL not in server_args:
        return None
    from server.runtime import gguf

    folder = gguf.converted_path(gguf.packaged_file(CHAT_MODEL), name=CHAT_MODEL)

    def load() -> list[list[int]]:
        while not gguf.is_converted(folder):
            if proc.poll() is not None:  # the server ended first: _wait_ready says why
                return []
            time.sleep(0.2)
        from server.frontend.tokenizer import ChatTemplate

        template = ChatTemplate(folder)
        return [template.question(q) for q in QUESTIONS]

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="demo-template")
    future = pool.submit(load)
    pool.shutdown(wait=False)
    return future


def _security(argv: list[str]) -> tuple[list[str], Security]:
    """(serve's flags, how the client reaches that server): the demo's own --tls-ca and
    --tls-server-name are taken out; serve's --tls-cert and --auth-token-file stay and are
    read here too. ValueError naming the flag for a missing or malformed file."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    add_security_args(own, token_file=False)
    mine, server_args = own.parse_known_args(argv)
    served = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    served.add_argument("--tls-cert", default="")
    served.add_argument("--auth-token-file", default="")
    serve, _ = served.parse_known_args(server_args)
    flag, ca = ("--tls-ca", mine.tls_ca) if mine.tls_ca else ("--tls-cert", serve.tls_cert)
    return server_args, Security.from_files(ca, mine.tls_server_name, serve.auth_token_file, ca_flag=flag)


def _launch(args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", "0", "--metrics-port", "0", "--http-port", "0", *args]
    print("$ lockstep " + " ".join(cmd[3:]), flush=True)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_ready(proc: subprocess.Popen) -> dict:
    for line in proc.stdout:
        print(line.rstrip(), flush=True)
        if line.startswith("lockstep serve: ready"):
            return dict(part.split("=", 1) for part in line.split()[3:])
    raise SystemExit(f"lockstep demo: the server exited with code {proc.wait()} before it was ready")


def _ms(s: float) -> str:
    return f"{s * 1e3:8.2f}"


def _itl(gen) -> tuple[float, float]:
    """(p50, p99) of a request's inter-token gaps, seconds."""
    gaps = sorted(gen.itl_s)
    if not gaps:
        return 0.0, 0.0
    return statistics.median(gaps), gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))]


def _report(name: str, gen) -> str:
    p50, p99 = _itl(gen)
    f = gen.finished
    return (f"{name:<10} {f.prompt_tokens:>6} {f.completion_tokens:>6} {_ms(gen.predicted_ttft_s)} {_ms(gen.ttft_s)} "
            f"{_ms(f.predicted_tpot_s)} {_ms(gen.tpot_s)} {_ms(p50)} {_ms(p99)}  {f.finish_reason}")


def _help() -> str:
    parser = argparse.ArgumentParser(
        prog="lockstep demo", usage="lockstep demo [--tls-ca FILE] [--tls-server-name NAME] [serve flags ...]",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Every other flag goes to lockstep serve (see lockstep serve --help); without --model: "
               f"--model {CHAT_MODEL}.")
    add_security_args(parser, token_file=False)
    return parser.format_help()


def with_default_model(server_args: list[str]) -> list[str]:
    """Serve flags without a model (`lockstep demo --compiled-steps off`) still mean the real one."""
    if any(a == "--model" or a.startswith("--model=") for a in server_args):
        return server_args
    return ["--model", CHAT_MODEL, *server_args]


def main(argv: list[str] | None = None) -> int:
    if any(a in ("-h", "--help") for a in argv or []):  # the demo's help, not serve's: no server starts
        print(_help(), end="")
        return 0
    try:
        server_args, security = _security(argv or [])
    except (ValueError, argparse.ArgumentError) as exc:
        print(f"lockstep demo: error: {exc}", file=sys.stderr)
        return 2
    server_args = with_default_model(server_args)
    proc = _launch(server_args)
    try:
        template = _chat_prompts(server_args, proc)
        ready = _wait_ready(proc)
        chats = template.result() if template is not None else None
        prompts, max_tokens = (chats, 48) if chats else (PROMPTS, 32)
        with LockstepClient(ready["grpc"], security) as client:
            client.wait_ready()
            info = client.model_info()
            print(f"\nserving {info.model} on {info.pool}, plan {info.plan_hash[:16]}, buckets {list(info.buckets)}, "
                  f"program TPOT promised {info.predictions[0].tpot_s * 1e3:.2f} ms at "
                  f"{info.predictions[0].prompt_len}-token prompts in company (the longest decode tick and half "
                  f"the mixed tick's excess, prompts going in beside a stream from its banked slack; a request alone "
                  f"is promised its own decode step, requests arriving together one promise for all; paced: x "
                  f"the pace factor below; ticks follow the work and tokens wait for their promised time)\n")
            header = (f"{'request':<10} {'prompt':>6} {'tokens':>6} {'TTFT pred':>8} {'TTFT meas':>8} "
                      f"{'TPOT pred':>8} {'TPOT meas':>8} {'ITL p50':>8} {'ITL p99':>8}  finish  (ms)")
            print(header)
            solo = client.generate(prompts[0], max_tokens, seed=1)
            print(_report("alone", solo))
            again = client.generate(prompts[0], max_tokens, seed=1)
            print(_report("again", again))
            with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
                gens = list(pool.map(lambda p: client.generate(p, max_tokens, temperature=0.8, top_p=0.95, seed=7),
                                     prompts))
            for i, gen in enumerate(gens):
                print(_report(f"batch {i}", gen))
            same = [t.id for t in solo.tokens] == [t.id for t in again.tokens]
            print(f"\nsame prompt and seed, same tokens: {same} (and the same text)")
            if chats:
                print("answers (alone: greedy; batch: sampled at temperature 0.8, seed 7, all four at once):")
                for name, q, gen in [("alone", QUESTIONS[0], solo)] + [(f"batch {i}", q, g) for i, (q, g)
                                                                         in enumerate(zip(QUESTIONS, gens))]:
                    print(f"  {name:<8} {q!r} -> {gen.text.strip()!r}")
            else:
                print(f"first request's tokens: {[t.id for t in solo.tokens][:12]} ... text {solo.text!r} "
                      f"(random weights; the byte-level fallback tokenizer prints ids < 256 only)")
            spreads = [p99 / p50 for p50, p99 in map(_itl, gens) if p50 > 0]
            if spreads:
                print(f"batch ITL p99/p50: {min(spreads):.2f} to {max(spreads):.2f} (the cadence a stream keeps "
                      f"beside the others)")
            status = client.status()
            share = status.overruns / status.ticks if status.ticks else 0.0
            print(f"server: {status.ticks} ticks, {status.overruns} overruns ({share:.1%}), "
                  f"pace factor {status.pace_factor:.3f}, {status.repaces} re-paces")
        metrics = urllib.request.urlopen(ready["metrics"], timeout=5).read().decode()
        lines = [line for line in metrics.splitlines() if line.startswith(("lockstep_tick_overruns_total",
                                                                           "lockstep_generation_tokens_total"))]
        print("metrics: " + "; ".join(lines))
    finally:
        running = proc.poll() is None  # not when it ended before its ready line (_wait_ready says so)
        if running:
            proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        for line in proc.stdout:
            print(line.rstrip(), flush=True)
        code = proc.wait(timeout=60)
        if running:
            print(f"server exited with code {code} in {time.monotonic() - start:.1f} s after SIGTERM")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
