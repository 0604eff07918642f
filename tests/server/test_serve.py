"""`lockstep serve` as users run it: a real process, Ray, loopback ports, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from client.client import Cancelled, LockstepClient, Unavailable

SERVE = [sys.executable, "-m", "server.cli", "serve", "--model", "tiny", "--pool", "cpu", "--calibration", "none",
         "--max-context", "256", "--prefill-chunk", "32", "--port", "0", "--metrics-port", "0"]


def start(*extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([*SERVE, *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    timer = threading.Timer(120, proc.kill)  # bounded: never hang the suite
    timer.start()
    for line in proc.stdout:
        if line.startswith("lockstep serve: ready"):
            timer.cancel()
            return proc, line.split("grpc=")[1].split()[0]
    timer.cancel()
    raise AssertionError(f"server exited with {proc.wait()} before it was ready")


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
                    result["gen"] = client.generate([4, 5], 120)
                except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                    result["error"] = exc

            worker = threading.Thread(target=long_stream)
            worker.start()
            while client.status().running == 0:
                pass
            proc.send_signal(signal.SIGTERM)
            worker.join(60)
            assert "error" not in result, result.get("error")
            assert len(result["gen"].tokens) == 120
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
])
def test_bad_serve_flags_exit_2_with_one_line(args, message):
    out = subprocess.run([*SERVE, *args, "--no-ray"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and message in out.stderr and "Traceback" not in out.stderr
