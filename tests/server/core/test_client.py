"""The front end's side of the engine core boundary (server/core/client.py), message by
message as `_read` hands them over (no core process: the messages are the core's own
types, and delivery is server/frontend/delivery.py's)."""

from __future__ import annotations

import asyncio
import time

from server.config import ServeConfig
from server.core.client import CoreClient
from server.core.engine import Request
from server.core.messages import Admitted, Events
from server.frontend.delivery import Stream
from server.runtime.sampling import GREEDY


def test_a_first_token_read_before_admit_resumes_is_held_to_its_promise():
    """The core's answer and the request's first token can be read in one turn of the
    loop, before the `admit` awaiting the answer runs again: the promise must already be on
    the request, or the token goes out unheld (a 720-call burst did that: a first token
    sent at 181 ms against a promise of 364)."""

    async def scenario() -> tuple[bool, float, float]:
        client = CoreClient(ServeConfig("{}"))
        queue: asyncio.Queue = asyncio.Queue()
        arrival = time.perf_counter()
        r = Request("r0", [1, 2, 3], 4, GREEDY, frozenset(), queue.put_nowait, arrival_s=arrival)
        client._requests[7] = Stream(r, queue, deterministic=True)
        answer = client._ask(7)
        assert client._dispatch(Admitted(7, ttft_s=0.3, e2e_s=0.6))
        assert client._dispatch(Events(tokens=[(7, 42, 1, time.perf_counter())], admitted=[], finished=[],
                                       metrics=[], status=None))
        held = queue.empty()  # read in the same turn as the answer: still held
        assert (await answer).ttft_s == 0.3
        item, _tick, sent = await asyncio.wait_for(queue.get(), 5)
        assert item == 42
        client._dir.cleanup()
        return held, sent - arrival, r.predicted_ttft_s

    held, sent_after, promised = asyncio.run(scenario())
    assert held and promised == 0.3
    assert 0.3 <= sent_after < 0.4  # at its promised time, not before
