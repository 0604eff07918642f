"""`scheduler` is pure: importing it pulls in no serving runtime."""

import subprocess
import sys

CHECK = """
import importlib, pkgutil, sys
import scheduler
names = [m.name for m in pkgutil.walk_packages(scheduler.__path__, "scheduler.")]
for name in names:
    importlib.import_module(name)
heavy = sorted(m for m in sys.modules
               if m.split(".")[0] in ("torch", "ray", "grpc", "prometheus_client", "server"))
print(len(names), heavy)
"""


def test_importing_scheduler_pulls_in_no_runtime():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, timeout=60)
    count, heavy = out.stdout.strip().split(" ", 1)
    assert int(count) >= 10  # every submodule was imported
    assert heavy == "[]"


def test_public_api():
    import scheduler

    for name in scheduler.__all__:
        assert hasattr(scheduler, name), name
