"""Markers: `gpu` tests need a CUDA device and are skipped without one.

Servers and calibrations run eager steps here unless a test asks for compiled ones
(`--compiled-steps on`; tests/server/runtime/test_compiled.py, tests/server/test_serve.py):
the default, `auto`, would build an AOTInductor package for each model and shape a test
starts (20-100 s each). `LOCKSTEP_COMPILED_STEPS=auto make test` runs the suite as users
run the server."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("LOCKSTEP_COMPILED_STEPS", "off")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)
