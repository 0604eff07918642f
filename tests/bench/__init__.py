"""Tests of the benchmarks' own logic (tables, log reading), no servers started."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_bench(name: str):
    """bench/<name>.py as a module (bench/ is scripts, not a package), registered under its
    name so that its dataclasses can find it, with bench/ on sys.path as when it runs (a
    script imports its neighbours: `import peer_vllm`)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.append(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
