"""The asyncio client against a live in-process server: same tokens as the sync client."""

from __future__ import annotations

import asyncio

import pytest

from client.aio import AsyncLockstepClient
from client.client import InvalidArgument, LockstepClient, TokenEvent
from protos.lockstep.v1 import lockstep_pb2 as pb
from tests.server.test_app import Running


@pytest.fixture(scope="module")
def live():
    server = Running(max_queue=4, max_tokens=64, deterministic=False)
    yield server
    server.close()


PROMPT = [5, 17, 99, 3, 42, 7, 11]


def test_async_generate_and_stream_equal_the_sync_client(live):
    target = live.info["grpc"]
    with LockstepClient(target) as sync:
        expected = sync.generate(PROMPT, 10, temperature=0.9, seed=11)

    async def both():
        async with AsyncLockstepClient(target) as client:
            gen = await client.generate(PROMPT, 10, temperature=0.9, seed=11)
            events = [e async for e in client.stream(PROMPT, 10, temperature=0.9, seed=11)]
            return gen, events

    gen, events = asyncio.run(both())
    ids = [t.id for t in expected.tokens]
    assert [t.id for t in gen.tokens] == ids and gen.text == expected.text
    assert gen.predicted_ttft_s > 0 and gen.finished.completion_tokens == 10 and gen.ttft_s > 0
    assert [e.id for e in events if isinstance(e, TokenEvent)] == ids
    assert isinstance(events[-1], pb.Finished) and events[-1].finish_reason == "length"


def test_async_errors_are_typed(live):
    async def bad():
        async with AsyncLockstepClient(live.info["grpc"]) as client:
            await client.generate(PROMPT, 4, temperature=500.0)

    with pytest.raises(InvalidArgument):
        asyncio.run(bad())
