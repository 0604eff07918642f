"""Fixtures: the `tiny` preset's program, and small Hugging Face checkpoints built by
`transformers` itself (random init, saved with save_pretrained) as a reference nobody here wrote."""

from __future__ import annotations

import pytest

import scheduler
from server.runtime.stage import plan_from_program
from tests.server.helpers import OPTIONS, save_hf_model


@pytest.fixture(scope="session")
def tiny_plan():
    program = scheduler.compile(scheduler.get_model("tiny"), scheduler.parse_pool("cpu:1"), OPTIONS)
    return plan_from_program(program.view())


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """name -> (transformers model, checkpoint folder), built once per session."""
    cache = {}

    def get(name: str):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            cache[name] = (save_hf_model(name, folder), folder)
        return cache[name]

    return get
