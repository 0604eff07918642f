"""`lockstep demo`: its help is its own (it starts no server) and names the default it runs.
A whole demo against a live server runs in tests/client/test_secure.py and in `make demo`."""

from __future__ import annotations

import subprocess
import sys

from client.demo import CHAT_MODEL, with_default_model


def test_help_is_the_demos_own_names_its_default_model_and_starts_nothing():
    run = subprocess.run([sys.executable, "-m", "server.cli", "demo", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: lockstep demo")
    assert f"without --model: --model {CHAT_MODEL}" in " ".join(run.stdout.split()) and "--tls-ca" in run.stdout
    assert "$ lockstep serve" not in run.stdout  # no server was started for it


def test_serve_flags_without_a_model_still_serve_the_real_one():
    assert with_default_model([]) == ["--model", CHAT_MODEL]
    assert with_default_model(["--dtype", "fp32"]) == ["--model", CHAT_MODEL, "--dtype", "fp32"]
    assert with_default_model(["--model", "tiny", "--dtype", "fp32"]) == ["--model", "tiny", "--dtype", "fp32"]
    assert with_default_model(["--model=tiny"]) == ["--model=tiny"]
