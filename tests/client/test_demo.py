"""`lockstep demo`: its help is its own (it starts no server) and names the default it runs.
A whole demo against a live server runs in tests/client/test_secure.py and in `make demo`."""

from __future__ import annotations

import subprocess
import sys

from client.demo import CHAT_MODEL


def test_help_is_the_demos_own_names_its_default_model_and_starts_nothing():
    run = subprocess.run([sys.executable, "-m", "server.cli", "demo", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: lockstep demo")
    assert f"with none: --model {CHAT_MODEL} --pool cpu" in run.stdout and "--tls-ca" in run.stdout
    assert "$ lockstep serve" not in run.stdout  # no server was started for it
