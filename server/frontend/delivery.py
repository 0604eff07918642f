"""Delivery on promise: a request's tokens reach its client no sooner than promised.

In deterministic mode the engine's ticks follow the work (scheduler/ticks.py), so it
usually makes a token before the time admission promised it; the front end holds such a
token and hands it out at its time: token k at arrival + TTFT + k x TPOT of the request's
promise. A late token goes at once. This is what turns "no later than" on the engine's
side into the steady cadence the client was told (docs/architecture.md, "Promises per
request"). Runs on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from server.core.engine import Finished, Request

HOLD_MIN_S = 0.0005  # a token due sooner than this goes at once (a timer costs more than it saves)


@dataclasses.dataclass(eq=False)
class Stream:
    """A request as the front end delivers it."""

    request: Request
    queue: asyncio.Queue  # (token | Finished, tick, perf_counter s), read by the front door
    deterministic: bool = True  # hold early tokens until promised
    tokens: int = 0  # handed out so far, held ones included
    released_at: float = 0.0  # perf_counter s the last item was (or will be) handed out
    held: int = 0  # items waiting for their promised time

    def release(self, item, tick: int, t: float) -> None:
        """Hands a token (or the end) to the queue, no sooner than promised. A held item is
        timed when it goes. Items keep their order: each is released strictly after the
        one before it."""
        now, r = time.perf_counter(), self.request
        when = now
        if not isinstance(item, Finished):
            self.tokens += 1
            if self.deterministic and r.predicted_ttft_s:
                when = max(now, r.arrival_s + r.predicted_ttft_s + (self.tokens - 1) * r.predicted_tpot_s)
        when = self.released_at = max(when, self.released_at + 1e-6)
        if when - now < HOLD_MIN_S and not self.held:
            self.queue.put_nowait((item, tick, t))
            return
        self.held += 1

        def release() -> None:
            self.held -= 1
            self.queue.put_nowait((item, tick, time.perf_counter()))

        asyncio.get_running_loop().call_later(when - now, release)
