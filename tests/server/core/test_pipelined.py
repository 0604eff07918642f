"""The pipelined engine (server/core/pipelined.py): row groups in flight across the stages
give every request the unpipelined engine's tokens, spread requests over the groups, and
refuse what they cannot pace."""

from __future__ import annotations

import threading
import time

import pytest

import scheduler
from server.core.engine import Engine, EngineConfig, EngineDown, Finished, Request
from server.runtime.executor import LocalExecutor
from server.runtime.stage import plan_from_program
from server.runtime.step import ExecutorFailed
from server.core.pipelined import PipelinedEngine
from server.runtime.sampling import GREEDY, SamplingParams
from tests.server.helpers import random_prompt

POISON = 499  # a prompt token the faulty executor fails on


class Faulty(LocalExecutor):
    """A step whose rows carry POISON raises ValueError (a kernel bug on one row); once
    `dead`, every submit raises ExecutorFailed (a stage actor gone)."""

    dead = False

    def step(self, batch):
        if self.dead:
            raise ExecutorFailed("device lost (injected)")
        if any(POISON in row for row in batch.token_ids):
            raise ValueError("row failed (injected)")
        return super().step(batch)


TWO_LPUS = 'topology = "chain"\n[[devices]]\npreset = "lpu"\ncount = 2\nmemory_bytes = 6e6\n'
OPTIONS = scheduler.CompileOptions(dtype="fp32", max_slots=4, max_context=256, prefill_chunk=32, prompt_len=16)
# A generous pace: these tests check tokens and placement, not timing (the steps of LocalExecutor
# run one after another, so they could not keep a tight pipelined pace).
CONFIG = EngineConfig(time_scale=1500.0, adaptive_pacing=False)
SAMPLING = [GREEDY, SamplingParams(temperature=0.9, seed=5), SamplingParams(temperature=1.1, top_k=20, seed=9),
            GREEDY, SamplingParams(temperature=0.7, top_p=0.8, seed=1), SamplingParams(temperature=1.0, seed=2)]


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    pool = tmp_path_factory.mktemp("pool") / "two_lpus.toml"
    pool.write_text(TWO_LPUS)
    view = scheduler.compile(scheduler.get_model("tiny"), scheduler.parse_pool(str(pool)), OPTIONS).view()
    assert len(view.stages) == 2
    return view


def run(engine: Engine, n: int = 6, max_tokens: int = 8, prompts=None, on_token=None) -> list[tuple[list[int], str, int]]:
    """Submits n requests at once (mixed prompts and sampling); returns each one's
    (tokens, finish reason, group). `on_token(i, request)` is called on each token."""
    done = threading.Event()
    out = [[] for _ in range(n)]
    ends = [None] * n

    def emitter(i):
        def emit(item, tick, at):
            if isinstance(item, Finished):
                ends[i] = item.reason
                if all(e is not None for e in ends):
                    done.set()
            else:
                out[i].append(item)
                if on_token is not None:
                    on_token(i, requests[i])
        return emit

    prompts = prompts or [random_prompt(5 + 9 * i, seed=i) for i in range(n)]
    requests = [Request(f"r{i}", prompts[i], max_tokens, SAMPLING[i % len(SAMPLING)], frozenset(), emitter(i))
                for i in range(n)]
    engine.start()
    try:
        for r in requests:
            ttft, e2e, r.group = engine.predict_placed(len(r.prompt), r.max_tokens)
            r.predicted_ttft_s, r.predicted_e2e_s = ttft, e2e
            engine.submit(r)
        assert done.wait(60), f"requests did not finish: {ends}"
    finally:
        engine.stop()
    return [(out[i], ends[i], requests[i].group) for i in range(n)]


def test_row_groups_give_the_unpipelined_tokens(program):
    plan = plan_from_program(program)
    expected = run(Engine(LocalExecutor(plan), program, CONFIG))
    engine = PipelinedEngine(LocalExecutor(plan), program, CONFIG, groups=2)
    got = run(engine)
    assert [(t, reason) for t, reason, _ in got] == [(t, reason) for t, reason, _ in expected]
    assert all(reason == "length" and len(t) == 8 for t, reason, _ in got)
    assert {g for _, _, g in got} == {0, 1}  # admission spread them over both groups
    assert engine.idle() and engine.status()["slots_in_use"] == 0


def test_a_burst_goes_to_the_group_whose_first_token_comes_first(program):
    engine = PipelinedEngine(LocalExecutor(plan_from_program(program)), program, CONFIG, groups=2)
    # Group 0 busy with a long prompt: the next request's first token comes sooner in group 1.
    busy = Request("busy", random_prompt(200, seed=1), 4, GREEDY, frozenset(), lambda *a: None, group=0)
    engine.submit(busy)
    ttft, _, group = engine.predict_placed(8, 4)
    ttft0 = engine.pipe.clone(time.perf_counter())._run(0, 8, 4, engine.tick_s, engine.issue_s, True)[0]
    assert group == 1 and ttft < ttft0


def test_refuses_what_it_cannot_pace(program):
    plan = plan_from_program(program)
    with pytest.raises(ValueError, match="deterministic mode only"):
        PipelinedEngine(LocalExecutor(plan), program, EngineConfig(deterministic=False))
    with pytest.raises(ValueError, match="1..max_slots=4"):
        PipelinedEngine(LocalExecutor(plan), program, CONFIG, groups=5)
    one = scheduler.compile(scheduler.get_model("tiny"), scheduler.parse_pool("cpu:1"), OPTIONS).view()
    with pytest.raises(ValueError, match="2 or more stages; this one has 1"):
        PipelinedEngine(LocalExecutor(plan_from_program(one)), one, CONFIG)


def test_a_failing_row_ends_alone_and_the_others_keep_their_tokens(program):
    plan = plan_from_program(program)
    prompts = [random_prompt(5 + 9 * i, seed=i) for i in range(4)]
    expected = run(Engine(LocalExecutor(plan), program, CONFIG), 4, prompts=prompts)
    prompts[2] = [1, POISON, 3]
    got = run(PipelinedEngine(Faulty(plan), program, CONFIG), 4, prompts=prompts)
    assert got[2][1] == "error" and got[2][0] == []
    assert [g[:2] for i, g in enumerate(got) if i != 2] == [e[:2] for i, e in enumerate(expected) if i != 2]


def test_a_cancelled_request_frees_its_slot_and_the_others_keep_their_tokens(program):
    plan = plan_from_program(program)
    expected = run(Engine(LocalExecutor(plan), program, CONFIG), 4, max_tokens=12)

    def cancel_after_2(i, r):
        if i == 1 and len(r.out) == 2:
            r.cancelled = True

    engine = PipelinedEngine(LocalExecutor(plan), program, CONFIG)
    got = run(engine, 4, max_tokens=12, on_token=cancel_after_2)
    assert got[1][1] == "cancelled" and 2 <= len(got[1][0]) < 12 and got[1][0] == expected[1][0][:len(got[1][0])]
    assert [g[:2] for i, g in enumerate(got) if i != 1] == [e[:2] for i, e in enumerate(expected) if i != 1]
    assert engine.status()["slots_in_use"] == 0 and engine.idle()


def test_a_dead_executor_ends_every_request_unavailable_and_refuses_more(program):
    executor = Faulty(plan_from_program(program))
    engine = PipelinedEngine(executor, program, CONFIG)

    def die(i, r):
        executor.dead = True

    got = run(engine, 3, max_tokens=12, on_token=die)
    assert [reason for _, reason, _ in got] == ["unavailable"] * 3
    assert not engine.up and engine.status()["engine_up"] is False
    with pytest.raises(EngineDown, match="engine stopped"):
        engine.submit(Request("late", [1, 2], 2, GREEDY, frozenset(), lambda *a: None, group=0))
