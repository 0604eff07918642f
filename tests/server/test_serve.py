"""`lockstep serve` as users run it: a real process, Ray, loopback ports, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from client.client import Cancelled, LockstepClient, Unavailable, build_request

SERVE = [sys.executable, "-m", "server.cli", "serve", "--model", "tiny", "--pool", "cpu", "--calibration", "none",
         "--max-context", "256", "--prefill-chunk", "32", "--port", "0", "--metrics-port", "0", "--http-port", "0"]


def start(*extra: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`lockstep serve` with `extra` flags, once ready: (process, gRPC target). The
    process's `ready_pid` is the one that owns shutdown (the front end's), `core_pid` the
    engine core's, and
    `stderr_text()` reads what it wrote to stderr (a file: nothing blocks on a pipe)."""
    err = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([*SERVE, *extra], stdout=subprocess.PIPE, stderr=err, text=True,
                            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"})
    proc.stderr_text = lambda: (err.seek(0), err.read())[1]
    timer = threading.Timer(120, proc.kill)  # bounded: never hang the suite
    timer.start()
    for line in proc.stdout:
        if line.startswith("lockstep serve: ready"):
            timer.cancel()
            proc.ready_pid = int(line.split(" pid=")[1].split()[0])  # the process that owns shutdown
            proc.core_pid = int(line.split("core_pid=")[1].split()[0]) if "core_pid=" in line else 0
            proc.http = line.split("http=")[1].split()[0]
            proc.ready_line = line
            return proc, line.split("grpc=")[1].split()[0]
    timer.cancel()
    raise AssertionError(f"server exited with {proc.wait()} before it was ready")


def wait_for(condition, timeout_s: float = 30.0) -> None:
    """Polls `condition` until it holds; fails after `timeout_s` instead of hanging."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"still waiting after {timeout_s} s"
        time.sleep(0.01)


@pytest.mark.slow
def test_serve_in_ray_streams_then_drains_on_sigterm():
    # A fixed time scale: ticks of ~12 ms, so the long stream is in flight at SIGTERM and
    # done well inside the grace period (a measured scale follows the host's load).
    proc, target = start("--time-scale", "20")
    try:
        with LockstepClient(target) as client:
            assert client.model_info().model == "tiny"
            first = client.generate([1, 2, 3], 8, seed=1)
            assert len(first.tokens) == 8 and first.finished.finish_reason == "length"
            # A long stream in flight when SIGTERM arrives finishes within the grace period.
            result = {}
            def long_stream():
                try:
                    result["gen"] = client.generate([4, 5], 60)
                except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                    result["error"] = exc

            worker = threading.Thread(target=long_stream)
            worker.start()
            wait_for(lambda: client.status().running > 0)
            proc.send_signal(signal.SIGTERM)
            worker.join(60)
            assert "error" not in result, result.get("error")
            assert len(result["gen"].tokens) == 60
            # Refused, not served: admission stopped, or the server is already going away.
            with pytest.raises((Unavailable, Cancelled)):
                client.generate([1], 2, timeout=5)
        assert proc.wait(timeout=60) == 0
        assert "lockstep serve: stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("args, message", [
    (["--executor", "fast"], "--executor must be local or ray"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--dtype", "int8"], "serve runs fp32, bf16 or fp16"),
    (["--calibration", "/nonexistent.json"], "does not exist"),
    (["--tls-cert", "/etc/hostname"], "--tls-cert and --tls-key go together"),
    (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], "--tls-cert '/nonexistent.pem' is not"),
    (["--auth-token-file", "/nonexistent"], "--auth-token-file '/nonexistent' is not a readable file"),
    (["--auth-token-file", "/etc/os-release"], "must hold one token"),  # spaces, several lines
    (["--front-end-nice", "-1"], "--front-end-nice must be in 0..19"),
    (["--front-end-nice", "20"], "--front-end-nice must be in 0..19"),
    *[([f"--{flag}={q}"], f"--{flag} must be in (0, 1]") for flag in ("pace-quantile", "prefill-quantile")
      for q in ("0", "-0.5", "1.5", "nan", "inf", "-inf")],
    (["--replicas", "0"], "--replicas must be >= 1"),
    (["--replicas", "2"], "--replicas places engines with Ray; drop --no-ray"),
    (["--tick-log", "t.jsonl", "--replicas", "2"], "--tick-log records one engine core's ticks"),
    (["--tick-log", "/nonexistent/ticks.jsonl"], "--tick-log /nonexistent/ticks.jsonl: No such file or directory"),
    (["--tick-log", "/"], "--tick-log /: Is a directory"),
    *[(["--guard-band-ms", v], "--guard-band-ms must be in 0..1000") for v in ("-1", "nan", "inf", "1e9")],
    *[([f"--send-wait-ms={v}"], "--send-wait-ms must be in 0..100") for v in ("-1", "nan", "inf", "-inf", "1e9", "100.5")],
    *[([f"--{flag}={v}"], f"--{flag} must be in 0..1000") for flag in ("admission-window-ms", "window-grace-ms")
      for v in ("-1", "nan", "inf", "-inf", "1e9", "1000.5")],
    *[([f"--join-share={v}"], "--join-share must be in 0..1") for v in ("-0.1", "1.5", "nan", "inf", "-inf")],
    *[([f"--start-lead-quantile={v}"], "--start-lead-quantile must be in 0..1") for v in ("-0.1", "1.5", "nan", "inf")],
    *[([f"--pace-margin-pct={v}"], "--pace-margin-pct must be in 0..100") for v in ("-1", "100.5", "nan", "inf", "-inf")],
    (["--route", "random"], "--route: invalid choice"),
    (["--pipeline"], "--pipeline keeps steps of several row groups in the stage actors at once: it needs --executor ray"),
    (["--core-nice", "-1"], "--core-nice must be in 0..19"),
    (["--core-nice", "20"], "--core-nice must be in 0..19"),
    (["--core-nice", "1e9"], "invalid int value"),
    (["--core-cpus", "x"], "--core-cpus: 'x' is not a CPU id or range like 0-3"),
    (["--core-cpus", "3-1"], "--core-cpus: empty range '3-1'"),
    (["--core-cpus", "99999"], "--core-cpus: CPUs [99999] are not among this process's"),
    (["--core-cpus", f"0-{max(os.sched_getaffinity(0))}"], "leaves no CPU of"),
])
def test_bad_serve_flags_exit_2_with_one_line(args, message):
    out = subprocess.run([*SERVE, *args, "--no-ray"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and message in out.stderr and "Traceback" not in out.stderr


def test_the_guard_after_a_delivery_is_5_ms_unless_set_and_1_5_in_a_pipelined_tick():
    """`--guard-band-ms` unset: 5 ms taken from the streams' lead (the plain engine), 1.5 ms
    in every pipelined turn; set, what was given."""
    from types import SimpleNamespace

    from server.core.engine import EngineConfig
    from server.serve import guard_band_s

    assert guard_band_s(SimpleNamespace(guard_band_ms=None, pipeline=False)) == EngineConfig.guard_band_s == 0.005
    assert guard_band_s(SimpleNamespace(guard_band_ms=None, pipeline=True)) == 0.0015
    assert guard_band_s(SimpleNamespace(guard_band_ms=0.0, pipeline=False)) == 0.0
    assert guard_band_s(SimpleNamespace(guard_band_ms=8.0, pipeline=True)) == 0.008


def descendants(pid: int) -> set[int]:
    """`pid` and every process below it (Ray's GCS, raylet, workers, agents), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo.extend(children.get(p, []))
    return out


def listening(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets `pids` listen on (`ss -ltnp`)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[3] for line in out.splitlines()
            if any(f"pid={p}," in line for p in pids)]


@pytest.mark.slow
def test_ray_mode_listens_on_loopback_only():
    if subprocess.run(["which", "ss"], capture_output=True).returncode:
        pytest.skip("needs `ss` (Debian: iproute2)")
    proc, target = start()
    try:
        with LockstepClient(target) as client:
            assert len(client.generate([1, 2, 3], 4).tokens) == 4  # Ray's workers are up
        addresses = listening(descendants(proc.pid))
        assert len(addresses) >= 4  # gRPC, metrics, GCS, raylet at least
        loopback = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")
        assert [a for a in addresses if not a.startswith(loopback)] == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_killing_the_engine_core_mid_stream_gives_unavailable_and_the_server_exits_1():
    proc, target = start("--time-scale", "20")
    try:
        with LockstepClient(target) as client:
            result, started = {}, threading.Event()

            def long_stream():
                try:
                    for _ in client.stub.Generate(build_request([4, 5], 200), timeout=60):
                        started.set()
                except grpc.RpcError as exc:
                    result["error"], result["at"] = exc.code(), time.monotonic()

            worker = threading.Thread(target=long_stream)
            worker.start()
            assert started.wait(30)
            os.kill(proc.core_pid, signal.SIGKILL)  # the engine core's process (the ready line's core_pid)
            killed = time.monotonic()
            worker.join(10)
            assert result.get("error") == grpc.StatusCode.UNAVAILABLE and result["at"] - killed < 1.0
        assert proc.wait(timeout=10) == 1
        assert time.monotonic() - killed < 10
        assert "engine died" in proc.stderr_text()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
@pytest.mark.parametrize("ray", [False, True])
@pytest.mark.parametrize("to", ["front end", "core"])
def test_sigterm_exits_0_within_the_grace_period_with_streams_still_running(ray, to):
    """To the pid the ready line prints (the front end, which owns shutdown), or to the
    engine core's (`core_pid=`): either way the server drains and exits 0 in the grace
    period, and the stream still running is told it is shutting down."""
    grace_s = 3.0
    proc, target = start("--time-scale", "40", "--grace-s", str(grace_s), *([] if ray else ["--no-ray"]))
    try:
        assert proc.core_pid and proc.core_pid != proc.ready_pid
        with LockstepClient(target) as client:
            errors = []

            def long_stream():
                try:
                    client.generate([4, 5], 240)  # ~5 s of ticks alone: still running when the grace is up
                except Exception as exc:  # noqa: BLE001 - checked below
                    errors.append(exc)

            worker = threading.Thread(target=long_stream)
            worker.start()
            wait_for(lambda: client.status().running > 0)
            time.sleep(0.5)
            os.kill(proc.ready_pid if to == "front end" else proc.core_pid, signal.SIGTERM)
            sent = time.monotonic()
            assert proc.wait(timeout=30) == 0
            took = time.monotonic() - sent
            worker.join(10)
        assert took <= grace_s, f"exited {took:.2f} s after SIGTERM to the {to}; grace {grace_s} s"
        assert errors and isinstance(errors[0], Unavailable) and "shutting down" in str(errors[0])
        if to == "core":
            assert "got SIGTERM; shutting down" in proc.stderr_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def _named(pids: set[int], prefix: str) -> list[int]:
    """Those of `pids` whose command line starts with `prefix`."""
    out = []
    for pid in sorted(pids):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().replace(b"\0", b" ").decode(errors="replace").startswith(prefix):
                    out.append(pid)
        except OSError:
            continue
    return out


@pytest.mark.slow
def test_sigterm_to_a_stage_actor_ends_the_server_as_an_engine_death():
    """Ray's SIGTERM handler never runs in an actor; the stage actor exits anyway, and the
    idle server notices at once (not at its next step): exit 1, the reason on stderr."""
    proc, target = start("--time-scale", "20", "--executor", "ray")
    try:
        stages = _named(descendants(proc.pid), "ray::StageActor")
        assert stages, "no stage actor found under the server"
        os.kill(stages[0], signal.SIGTERM)
        assert proc.wait(timeout=20) == 1
        assert "stage actor 0 died" in proc.stderr_text()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
@pytest.mark.parametrize("ray", [False, True])
def test_sigterm_under_http_load_exits_0_within_the_grace_period(ray):
    """HTTP streams and a whole-answer request still running at SIGTERM, an idle
    keep-alive connection and a request whose headers never finish: the server still
    exits 0 within the grace period, and each running client is told why."""
    import http.client
    import json
    import socket

    grace_s = 3.0
    proc, target = start("--time-scale", "40", "--grace-s", str(grace_s), *([] if ray else ["--no-ray"]))
    host, port = proc.http.rsplit(":", 1)
    answers: dict[str, object] = {}

    def ask(name: str, stream: bool):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("POST", "/v1/completions", json.dumps({"prompt": "still running", "max_tokens": 240,
                                                                "stream": stream}),
                         {"content-type": "application/json"})
            resp = conn.getresponse()
            answers[name] = (resp.status, resp.read().decode())
        except Exception as exc:  # noqa: BLE001 - checked below
            answers[name] = exc
        finally:
            conn.close()

    try:
        idle = http.client.HTTPConnection(host, int(port), timeout=30)
        idle.request("GET", "/health")
        assert idle.getresponse().read()  # kept alive, then left idle
        half = socket.create_connection((host, int(port)))
        half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        workers = [threading.Thread(target=ask, args=(f"{kind}{i}", kind == "stream"))
                   for i in range(2) for kind in ("stream", "whole")]
        for w in workers:
            w.start()
        with LockstepClient(target) as client:
            wait_for(lambda: client.status().running + client.status().queue_length >= len(workers))
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        assert proc.wait(timeout=30) == 0
        took = time.monotonic() - sent
        for w in workers:
            w.join(10)
        half.close()
        idle.close()
        assert took <= grace_s, f"exited {took:.2f} s after SIGTERM; grace {grace_s} s"
        for name, answer in sorted(answers.items()):
            assert isinstance(answer, tuple), (name, answer)
            status, body = answer
            if name.startswith("stream"):  # the error arrives as the stream's last event
                assert status == 200 and "shutting down" in body and "[DONE]" in body, (name, body[-300:])
            else:
                assert status == 503 and "shutting down" in body, (name, body)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_serve_two_replicas_routes_both_and_exits_0_on_sigterm():
    import grpc

    from protos.lockstep.v1 import lockstep_pb2 as pb
    from protos.lockstep.v1 import lockstep_pb2_grpc as pb_grpc

    grace_s = 4.0
    proc, target = start("--replicas", "2", "--time-scale", "20", "--grace-s", str(grace_s))
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.LockstepStub(ch)

            def ask(seed: int) -> tuple[list[int], str]:
                call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[seed, 2, 3]), max_tokens=30),
                                     timeout=60)
                tokens = [m.token.id for m in call if m.WhichOneof("kind") == "token"]
                return tokens, dict(call.initial_metadata())["lockstep-replica"]

            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(ask, range(4)))
            assert all(len(tokens) == 30 for tokens, _ in answers)
            assert {replica for _, replica in answers} == {"0", "1"}
            status = stub.GetServerStatus(pb.GetServerStatusRequest())
            assert status.max_slots == 2 * 8 and status.engine_up  # the replicas', summed
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - sent <= grace_s
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("pool, message", [
    ("cpu", "--pipeline needs a program of 2 to --max-slots (8) stages, one row group each; tiny on cpu compiles to 1"),
])
def test_pipeline_needs_a_multi_stage_program(pool, message):
    from scheduler.errors import SpecError
    from server.cli import build_parser
    from server.serve import build_config

    args = build_parser().parse_args(["serve", "--model", "tiny", "--pool", pool, "--calibration", "none",
                                      "--executor", "ray", "--pipeline"])
    with pytest.raises(SpecError) as exc:
        build_config(args)
    assert str(exc.value) == message


def test_the_pace_serve_runs_at_is_recorded_for_simulate(tmp_path, monkeypatch):
    """`lockstep simulate` predicts with the pace the server runs at now: a re-pace reaches
    the recorded pace within the recording interval; an unchanged pace is not rewritten;
    once the engine tells its whole pace (prefill shapes, tails, cold allowance), that is
    what is recorded, with how late the front end's last tokens left."""
    import asyncio

    from scheduler.simulate import Pace
    from server import programs
    from server.frontend.metrics import Metrics
    from server.serve import record_pace

    monkeypatch.setattr(programs, "CACHE_DIR", tmp_path)
    start = {"prefill": 1.5, "decode": 1.32, "mixed": 1.32}
    info = {"plan_hash": "ab" * 32, "time_scale": 1.2, "guard_band_frac": 0.1, "pace": start}
    programs.record_time_scale(info["plan_hash"], 1.2, 0.1, start)  # as serve does at start
    metrics = Metrics("tiny")
    for phase, factor in start.items():
        metrics.set_pace(phase, factor)

    async def run():
        task = asyncio.ensure_future(record_pace(metrics, info, interval_s=0.02))
        path = tmp_path / f"time-scale-{info['plan_hash'][:16]}.json"
        written = path.stat().st_mtime_ns
        await asyncio.sleep(0.1)
        assert path.stat().st_mtime_ns == written and programs.recorded_pace(info["plan_hash"]) == Pace(start)
        metrics.set_pace("decode", 2.0, repaced=True)  # the engine re-paced: the host got slower
        await asyncio.sleep(0.1)
        assert programs.recorded_pace(info["plan_hash"]) == Pace({**start, "decode": 2.0})
        whole = Pace({**start, "decode": 2.0}, {64: 1.1}, 1.7, 0.012, 0.004)  # the start lead recorded too
        metrics.set_pace_state(whole.to_json())
        # How late tokens left past their promise (early counts as on time): first, later.
        for gap, late in ((None, 0.004), (0.02, -0.0003), (0.02, 0.0015), (None, 0.0)):
            metrics.token_emitted("grpc", gap, late)
        metrics.token_emitted("grpc", 0.02, None)  # nothing promised: not a sample
        await asyncio.sleep(0.1)
        task.cancel()
        assert programs.recorded_pace(info["plan_hash"]) == whole
        assert programs.recorded_delivery(info["plan_hash"]) == ([0.004, 0.0], [0.0, 0.0015])
        assert programs.recorded_time_scale(info["plan_hash"]) == 1.2  # the start-up measurement stays

    asyncio.run(run())


def _cpus_allowed(pid: int) -> set[int]:
    """The CPUs any thread of `pid` may run on (/proc's Cpus_allowed_list, e.g. 0 or 1-3)."""
    cpus = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            text = next(line.split()[1] for line in f if line.startswith("Cpus_allowed_list"))
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs: one for the core, one for the front end")
def test_core_cpus_pins_the_core_process_and_keeps_the_front_end_off_them():
    proc, target = start("--no-ray", "--core-cpus", "0", "--duration-s", "60")
    try:
        assert _cpus_allowed(proc.core_pid) == {0}  # every thread of the core, its torch threads too
        assert 0 not in _cpus_allowed(proc.ready_pid) and _cpus_allowed(proc.ready_pid)
        with LockstepClient(target) as client:
            assert len(client.generate("pinned", max_tokens=3, seed=1).tokens) == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def _nice(pid: int) -> set[int]:
    """The niceness of every thread of `pid` (field 19 of /proc/<pid>/task/<tid>/stat)."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        except FileNotFoundError:
            continue  # a thread that just ended
        out.add(int(stat.rsplit(")", 1)[1].split()[16]))  # after "pid (comm)", field 19 is the 17th
    return out


def test_core_nice_lowers_every_thread_of_the_core_process_and_not_the_front_end():
    proc, target = start("--no-ray", "--core-nice", "7", "--duration-s", "60")
    try:
        front = _nice(proc.ready_pid)
        with LockstepClient(target) as client:  # the torch threads exist once a step has run
            assert len(client.generate("lowered", max_tokens=3, seed=1).tokens) == 3
        assert _nice(proc.core_pid) == {min(19, n + 7) for n in front}
        assert _nice(proc.ready_pid) == front
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_serve_runs_compiled_steps_by_default_with_the_same_tokens_alone_and_in_company():
    """`lockstep serve` as a user runs it, with the default `--compiled-steps auto` (the
    suite's LOCKSTEP_COMPILED_STEPS=off taken away): the package is built (or loaded: the
    same weights and shapes as tests/server/runtime/test_compiled.py's tiny plan), the ready
    line says so, and a request's tokens do not depend on the requests beside it."""
    env = {k: v for k, v in os.environ.items() if k != "LOCKSTEP_COMPILED_STEPS"}
    proc, target = start("--no-ray", "--dtype", "fp32", "--duration-s", "90", env=env)
    try:
        assert " compiled=on " in proc.ready_line
        with LockstepClient(target) as client:
            alone = [t.id for t in client.generate("compiled", max_tokens=6, seed=3, temperature=0.9).tokens]
            with ThreadPoolExecutor(4) as pool:
                calls = [pool.submit(client.generate, text, max_tokens=6, seed=3, temperature=0.9)
                         for text in ("compiled", "other one", "a third", "and a fourth")]
                company = [[t.id for t in c.result().tokens] for c in calls]
        assert len(alone) == 6 and company[0] == alone
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "eager instead" not in proc.stderr_text()


def test_a_stage_that_cannot_compile_runs_eager_and_the_ready_line_says_so(tmp_path):
    """`--compiled-steps on` with a mixture-of-experts checkpoint (its routing picks each
    expert's rows at run time, which an exported graph cannot hold): the server still
    serves, eager, its ready line says `compiled=off`, and stderr says why."""
    from tests.server.helpers import save_hf_model

    save_hf_model("mixtral", tmp_path)
    proc, target = start("--no-ray", "--dtype", "fp32", "--model", str(tmp_path), "--compiled-steps", "on",
                         "--duration-s", "60")
    try:
        assert " compiled=off " in proc.ready_line
        with LockstepClient(target) as client:
            assert len(client.generate([1, 2, 3], 4).tokens) == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "compiled steps off, eager instead: MoE routing" in proc.stderr_text()
