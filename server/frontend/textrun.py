"""One admitted request as text: the engine's tokens become text deltas, stop strings cut
the text before them, and the run ends with exactly one outcome, recorded once.

The doors that answer in text, not token ids, share it: OpenAI-compatible HTTP
(server/frontend/openai_api.py) and the KServe v2 / Triton gRPC door
(server/frontend/kserve.py). The native gRPC door streams token ids with their deltas
and keeps its own loop (server/frontend/api.py).

Stop strings end the text before the stop string, as OpenAI's and vLLM's do; a delta
holds back the last (longest stop - 1) characters until they cannot start one, so a
stop string is never sent in part.
"""

from __future__ import annotations

import asyncio

import grpc

from server.core.engine import Finished
from server.frontend.api import Sent, outcome, record
from server.frontend.tokenizer import IncrementalDecoder

_ENDINGS = ("length", "stop")  # engine reasons that end a run well; the others are errors


def _disconnected() -> tuple[str, grpc.StatusCode]:
    return "disconnected", grpc.StatusCode.CANCELLED


class TextRun:
    """Reads one request's queue (tokens, then its engine.Finished). `protocol`: the door's
    metrics label. `cut`: called when the run is cancelled from outside (its client left or
    its deadline passed) and returns (outcome reason, code); default disconnected."""

    def __init__(self, admission, tokenizer, metrics, protocol: str, r, queue: asyncio.Queue,
                 stops: tuple[str, ...], cut=_disconnected):
        self.admission, self.metrics, self.protocol, self.cut = admission, metrics, protocol, cut
        self.r, self.queue, self.stops = r, queue, stops
        self.sent, self.decoder = Sent(), IncrementalDecoder(tokenizer, r.prompt)
        self.text, self.emitted = "", 0  # all text so far; characters of it sent
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.finish_reason = self.error = None  # "length" | "stop"; or what ended it badly
        self.outcome = None  # set once, when the run ends

    def abandon(self) -> None:
        """Ends a run whose events were never read (its client left first): the request is
        cancelled, its slot freed next tick, and it counts as disconnected."""
        if self.outcome is None:
            self.outcome = outcome(self.r, self.sent, "disconnected", grpc.StatusCode.CANCELLED, "", None)
            self.admission.cancel(self.r)
            record(self.metrics, self.protocol, self.r, self.outcome)

    def _cut_at_stop(self) -> bool:
        """Ends the text before the first stop string in it (searching only where a new one
        can start); True if there was one."""
        start = max(0, self.emitted - self.hold)
        cut = min((i for i in (self.text.find(s, start) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
        return cut >= 0

    async def events(self):
        """Yields one text delta per token sent (empty while text is held back), then the
        held-back rest if any; sets finish_reason (or error) and the outcome, recorded
        once, at the end."""
        ended_by_engine, o = False, None
        try:
            while o is None:
                item, _tick, t = await self.queue.get()
                if isinstance(item, Finished):
                    ended_by_engine = True
                    if item.reason in _ENDINGS:
                        self.text += self.decoder.flush()
                        reason = "stop" if self._cut_at_stop() else item.reason
                        self.finish_reason = reason
                        o = outcome(self.r, self.sent, reason, grpc.StatusCode.OK, "", t)
                    else:  # its step failed, the engine died, or the server is stopping
                        self.error = item.message or item.reason
                        code = grpc.StatusCode.INTERNAL if item.reason == "error" else grpc.StatusCode.UNAVAILABLE
                        o = outcome(self.r, self.sent, "error" if item.reason != "shutdown" else "cancelled", code,
                                    self.error, t)
                    break
                gap = self.sent.add(t)
                if self.metrics is not None:
                    self.metrics.token_emitted(self.protocol, gap, self.sent.late_s(self.r))
                self.text += self.decoder.step(item)
                if self.stops and self._cut_at_stop():
                    self.finish_reason = "stop"
                    o = outcome(self.r, self.sent, "stop", grpc.StatusCode.OK, "", t)
                    break
                # One delta per token, empty while the text is held back (a stop string may
                # start there, or the token ends mid-character), as vLLM streams: a client
                # counts tokens and times each one by its response.
                safe = max(self.emitted, len(self.text) - self.hold)
                yield self.text[self.emitted:safe]
                self.emitted = safe
            if self.error is None and len(self.text) > self.emitted:
                yield self.text[self.emitted:]
                self.emitted = len(self.text)
        except (asyncio.CancelledError, GeneratorExit):
            if o is None:
                reason, code = self.cut()
                o = outcome(self.r, self.sent, reason, code, "", None)
            raise
        finally:
            o = o or outcome(self.r, self.sent, "error", grpc.StatusCode.INTERNAL, "front end error", None)
            self.outcome = o
            if not ended_by_engine:  # a stop string or a client gone: free the slot next tick
                self.admission.cancel(self.r)
            record(self.metrics, self.protocol, self.r, o)

    def usage(self) -> dict:
        n, p = self.sent.n, len(self.r.prompt)
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
