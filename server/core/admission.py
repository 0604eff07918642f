"""Admission by prediction, engine side: the one place a request is refused or queued with
its promise. The front end's in-process path (server/frontend/api.LocalAdmission) and the
engine core process (server/core/process.py) both call it, so both refuse the same
requests with the same words.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from server.core.engine import Engine, EngineDown, Request


class Refusal(Exception):
    """A valid request the engine will not take now, with the gRPC status name that says
    why (RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, UNAVAILABLE)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def closed(up: bool, accepting: bool, short: bool = False) -> str | None:
    """Why nothing is admitted now (the engine is down, or the server drains), or None; the
    refusal's code is UNAVAILABLE. `short`: the words PredictArrival answers with."""
    if not up:
        return "engine stopped" if short else "engine stopped; the server is exiting"
    if not accepting:
        return "server is shutting down" if short else "server is shutting down; not admitting"
    return None


def refusal(engine: Engine) -> tuple[str, str] | None:
    """(code, message) if a request arriving now would be refused before any prediction."""
    why = closed(engine.up, engine.accepting)
    if why is not None:
        return "UNAVAILABLE", why
    full = engine.queue_full()
    return None if full is None else ("RESOURCE_EXHAUSTED", full)


def _open(engine: Engine) -> None:
    """Raises the Refusal of a request arriving now, if any, before any prediction."""
    why = refusal(engine)
    if why is not None:
        raise Refusal(*why)


@contextmanager
def _queueing(full_note: str = ""):
    """The engine's queueing errors as refusals: a full queue (+ `full_note`), a dead engine."""
    try:
        yield
    except OverflowError as exc:
        raise Refusal("RESOURCE_EXHAUSTED", f"{exc}{full_note}") from None
    except EngineDown as exc:
        raise Refusal("UNAVAILABLE", str(exc)) from None


def admit(engine: Engine, r: Request, time_remaining_s: float | None) -> None:
    """Predicts `r`'s first token and finish, refuses it (Refusal, nothing queued) or queues
    it with that promise in `r.predicted_*`, in seconds from `r.arrival_s` (the door's
    receipt: what its parsing, tokenization and transport took since is part of the promise).
    `time_remaining_s`: the client's deadline, from now."""
    _open(engine)
    ttft, e2e, group = engine.predict_placed(len(r.prompt), r.max_tokens)
    late = past_deadline(ttft, e2e, time_remaining_s)
    if late is not None:
        raise late
    waited = max(0.0, time.perf_counter() - r.arrival_s)
    r.promise(waited + ttft, waited + e2e)
    r.group = group
    with _queueing(f"; a request now would get its first token in {ttft:.3f} s"):
        engine.submit(r)


def past_deadline(ttft_s: float, e2e_s: float, time_remaining_s: float | None) -> Refusal | None:
    """The refusal of a request promised to finish in `e2e_s` when its client's deadline is
    `time_remaining_s` away (None: no deadline), or None."""
    if time_remaining_s is None or e2e_s <= time_remaining_s:
        return None
    return Refusal("DEADLINE_EXCEEDED", f"predicted finish in {e2e_s:.3f} s (first token in {ttft_s:.3f} s) is past "
                                        f"the deadline of {time_remaining_s:.3f} s")


def admit_windowed(engine: Engine, r: Request) -> bool:
    """Queues `r` in an admission window (opening one if nothing runs or waits), its promise
    to come when the window closes (`Engine.close_window`); False, nothing queued, when no
    window takes it. Refuses (Refusal) as `admit` does."""
    _open(engine)
    with _queueing():
        return engine.submit_windowed(r)


def predict(engine: Engine, prompt_len: int, max_tokens: int) -> tuple[float, float, str]:
    """(TTFT, e2e, "") that admission would promise such a request now, or (0, 0, why not)."""
    why = refusal(engine)
    if why is not None:
        return 0.0, 0.0, closed(engine.up, engine.accepting, short=True) or why[1]
    ttft, e2e = engine.predict(prompt_len, max_tokens)
    return ttft, e2e, ""
