"""Compiled programs shared by the program, compiler, trace and report tests (compiled once)."""

import dataclasses

import pytest

from scheduler import CompileOptions, compile, get_device, get_model, parse_pool
from scheduler.devices import DeviceGroup, Pool

# LPUs shrunk to 1.5 MB so the 2 MB `tiny` model needs several pipeline stages.
SMALL_LPU_POOL = Pool((DeviceGroup(dataclasses.replace(get_device("lpu"), memory_bytes=1.5e6), 8),), "chain", 0.0)
SMALL_OPTIONS = CompileOptions(max_slots=6, max_context=64, prompt_len=40, prefill_chunk=16)


@pytest.fixture(scope="session")
def tiny_program():
    """One stage on one CPU."""
    return compile(get_model("tiny"), parse_pool("cpu:1"), CompileOptions(max_context=512, prompt_len=100))


@pytest.fixture(scope="session")
def staged_inputs():
    """(model, pool, options) for `staged_program`."""
    return get_model("tiny"), SMALL_LPU_POOL, SMALL_OPTIONS


@pytest.fixture(scope="session")
def staged_program(staged_inputs):
    """`tiny` over several memory-starved LPUs: several stages, transfers between them."""
    return compile(*staged_inputs)


@pytest.fixture(scope="session")
def big_program():
    """The demo: Llama-2-70B int8 over 576 LPUs."""
    return compile(get_model("llama-2-70b"), parse_pool("lpu:576"), CompileOptions(dtype="int8"))


@pytest.fixture(params=["tiny_program", "staged_program", "big_program"])
def program(request):
    return request.getfixturevalue(request.param)
