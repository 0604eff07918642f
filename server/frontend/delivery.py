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
import collections
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
    # Held items in order, (due perf_counter s, item, tick): one timer drains them, so an
    # item never overtakes the one before it (two timers 1 us apart can fire in either order).
    held: collections.deque = dataclasses.field(default_factory=collections.deque)

    def release(self, item, tick: int, t: float) -> None:
        """Hands a token (or the end) to the queue, no sooner than promised. A held item is
        timed when it goes. Items keep their order."""
        now, r = time.perf_counter(), self.request
        when = now
        if not isinstance(item, Finished):
            self.tokens += 1
            if self.deterministic and r.predicted_ttft_s:
                when = r.due_s(self.tokens - 1)
        if isinstance(item, Finished) and item.reason not in ("length", "stop"):
            self.cut(item, tick)  # an end the promise did not plan: shutdown, engine down, error, cancel
            return
        if not self.held and when - now < HOLD_MIN_S:
            self.queue.put_nowait((item, tick, t))
            return
        self.held.append((when, item, tick))
        if len(self.held) == 1:
            asyncio.get_running_loop().call_later(max(0.0, when - now), self._drain)

    @property
    def delivering(self) -> bool:
        """Whether items are held for later."""
        return bool(self.held)

    def cut(self, end: Finished, tick: int = -1) -> None:
        """Ends the stream now with `end`: its held tokens go at once (early: the promise is
        cut short), a held end of its own is dropped, so no client waits past a drain's
        grace for tokens the engine already made."""
        now = time.perf_counter()
        while self.held:
            _, item, held_tick = self.held.popleft()
            if not isinstance(item, Finished):
                self.queue.put_nowait((item, held_tick, now))
        self.queue.put_nowait((end, tick, now))

    def _drain(self) -> None:
        """Hands out every held item that is due, in order; waits again for the next one."""
        now = time.perf_counter()
        while self.held and self.held[0][0] - now < HOLD_MIN_S:
            _, item, tick = self.held.popleft()
            self.queue.put_nowait((item, tick, now))
        if self.held:
            asyncio.get_running_loop().call_later(self.held[0][0] - now, self._drain)
