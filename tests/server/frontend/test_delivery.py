"""Delivery on promise (server/frontend/delivery.py): early tokens wait for their time."""

import asyncio
import time

from server.frontend.delivery import Stream
from server.core.engine import Finished, Request
from server.runtime.sampling import SamplingParams


def _request(ttft_s: float, tpot_s: float, arrival_s: float) -> Request:
    r = Request("r", [1, 2], 4, SamplingParams(), frozenset(), None, arrival_s=arrival_s)
    r.predicted_ttft_s, r.predicted_tpot_s = ttft_s, tpot_s
    return r


def _deliver(deterministic: bool, arrival_offset_s: float) -> list[tuple[object, float]]:
    async def scenario():
        r = _request(0.05, 0.03, time.perf_counter() + arrival_offset_s)
        stream = Stream(r, asyncio.Queue(), deterministic)
        queue = stream.queue
        for k in range(4):  # the engine made all four at once, before any was due
            stream.release(100 + k, k, time.perf_counter())
        stream.release(Finished("length"), 4, time.perf_counter())
        got = []
        for _ in range(5):
            item = await asyncio.wait_for(queue.get(), 2)
            got.append((item[0], time.perf_counter() - r.arrival_s))
        return got

    return asyncio.run(scenario())


def test_an_early_token_waits_for_its_promised_time_and_order_holds():
    got = _deliver(True, 0.0)
    assert [item for item, _ in got[:4]] == [100, 101, 102, 103] and isinstance(got[4][0], Finished)
    for k, (_, at) in enumerate(got[:4]):
        assert at >= 0.05 + k * 0.03 - 0.001, f"token {k} went at {at:.4f} s, promised {0.05 + k * 0.03:.4f} s"
    assert got[4][1] >= got[3][1]


def test_a_late_token_goes_at_once_and_throughput_mode_never_holds():
    for deterministic, offset in ((True, -10.0), (False, 0.0)):  # promised 10 s ago; or no holding at all
        got = _deliver(deterministic, offset)
        assert [item for item, _ in got[:4]] == [100, 101, 102, 103]
        assert got[3][1] - got[0][1] < 0.02


def test_held_items_never_overtake_each_other_however_close_their_times():
    async def scenario():
        r = _request(0.02, 1e-7, time.perf_counter())  # 50 tokens due within 5 us of each other
        stream = Stream(r, asyncio.Queue())
        for k in range(50):
            stream.release(k, k, time.perf_counter())
        stream.release(Finished("length"), 50, time.perf_counter())
        return [(await asyncio.wait_for(stream.queue.get(), 2))[0] for _ in range(51)]

    got = asyncio.run(scenario())
    assert got[:50] == list(range(50)) and isinstance(got[50], Finished)


def test_an_unplanned_end_hands_out_the_held_tokens_at_once():
    async def scenario():
        r = _request(5.0, 1.0, time.perf_counter())  # the first token due in 5 s
        stream = Stream(r, asyncio.Queue())
        for k in range(3):
            stream.release(k, k, time.perf_counter())
        stream.release(Finished("shutdown", "server is shutting down"), 3, time.perf_counter())
        return [(await asyncio.wait_for(stream.queue.get(), 0.5))[0] for _ in range(4)]

    got = asyncio.run(scenario())
    assert got[:3] == [0, 1, 2] and got[3].reason == "shutdown"
