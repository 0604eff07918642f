"""End to end over loopback: a real grpc.aio server (LockstepServer, in this process on its
own event loop) and real gRPC clients."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

import scheduler
from protos.lockstep.v1 import lockstep_pb2 as pb
from protos.lockstep.v1 import lockstep_pb2_grpc as pb_grpc
from server.app import LockstepServer
from server.config import ServeConfig
from server.runtime.executor import LocalExecutor
from server.runtime.stage import plan_from_program
from server.runtime.sampling import SamplingParams
from tests.server.helpers import generate, random_prompt

OPTIONS = scheduler.CompileOptions(dtype="fp32", max_slots=4, max_context=256, prefill_chunk=32, prompt_len=16)
PROGRAM = scheduler.compile(scheduler.get_model("tiny"), scheduler.parse_pool("cpu:1"), OPTIONS)


class Running:
    """A LockstepServer on an event loop in a background thread."""

    def __init__(self, **config):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = LockstepServer(ServeConfig(PROGRAM.to_json(), **config))
        self.info = self.call(self.server.start())
        self.channel = grpc.insecure_channel(self.info["grpc"])
        self.stub = pb_grpc.LockstepStub(self.channel)

    def call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.channel.close()
        self.call(self.server.stop(grace_s=2.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def live():
    server = Running(max_queue=4, max_tokens=200, deterministic=False)
    yield server
    server.close()


def request(prompt, max_tokens=12, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_tokens=max_tokens,
                              sampling=pb.SamplingParams(**sampling))


def stream(stub, req, timeout=60) -> tuple[list[int], pb.Finished]:
    tokens, finished = [], None
    for msg in stub.Generate(req, timeout=timeout):
        if msg.WhichOneof("kind") == "token":
            tokens.append(msg.token.id)
        else:
            finished = msg.finished
    return tokens, finished


def executor_tokens(prompt, n, params) -> list[int]:
    executor = LocalExecutor(plan_from_program(PROGRAM.view()))
    return generate(executor, 0, prompt, n, params, chunk=OPTIONS.prefill_chunk).out


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=42)])
def test_streamed_tokens_equal_the_executors(live, params):
    prompt = random_prompt(45, seed=5)  # two prefill chunks
    tokens, finished = stream(live.stub, request(prompt, 12, temperature=params.temperature, top_p=params.top_p,
                                                 seed=params.seed))
    assert tokens == executor_tokens(prompt, 12, params)
    assert finished.finish_reason == "length" and finished.completion_tokens == 12
    assert finished.prompt_tokens == 45 and finished.measured_ttft_s > 0 and finished.predicted_ttft_s > 0


def test_concurrent_streams_get_their_own_tokens(live):
    prompts = [random_prompt(10 + 7 * i, seed=i) for i in range(4)]
    params = SamplingParams(temperature=1.0, seed=7)
    with __import__("concurrent.futures").futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: stream(live.stub, request(p, 10, temperature=1.0, seed=7))[0], prompts))
    assert results == [executor_tokens(p, 10, params) for p in prompts]


def test_admission_metadata_carries_the_prediction(live):
    sent = time.time()
    call = live.stub.Generate(request([1, 2, 3], 3), timeout=30)
    metadata = dict(call.initial_metadata())
    assert float(metadata["lockstep-predicted-ttft-s"]) > 0
    assert float(metadata["lockstep-predicted-e2e-s"]) >= float(metadata["lockstep-predicted-ttft-s"])
    # The arrival the promise counts from: after this client's send, before its answer.
    assert sent - 1e-3 <= float(metadata["lockstep-arrival-unix-s"]) <= time.time()
    assert len(list(call)) == 4  # 3 tokens + finished


def test_cancel_frees_the_slot(live):
    call = live.stub.Generate(request([4, 5, 6], 180), timeout=60)
    first = next(call)
    assert first.token.index == 0
    call.cancel()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        status = live.stub.GetServerStatus(pb.GetServerStatusRequest())
        if status.slots_in_use == 0 and status.running == 0:
            break
        time.sleep(0.01)
    assert status.slots_in_use == 0


def test_stop_token_ends_the_stream(live):
    prompt = random_prompt(20, seed=9)
    expected = executor_tokens(prompt, 8, SamplingParams())
    req = request(prompt, 8)
    req.stop_token_ids.append(expected[3])
    tokens, finished = stream(live.stub, req)
    assert tokens == expected[: expected.index(expected[3]) + 1]
    assert finished.finish_reason == "stop"


@pytest.mark.parametrize("req, code, field", [
    (pb.GenerateRequest(max_tokens=5), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (request(list(range(300)), 5), grpc.StatusCode.OUT_OF_RANGE, "prompt"),
    (request([1, 2], 0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (request([1, 2], 201), grpc.StatusCode.OUT_OF_RANGE, "max_tokens"),
    (request(list(range(100)), 190), grpc.StatusCode.OUT_OF_RANGE, "max_tokens"),
    (request([1, 2], 5, temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    (request([1, 2], 5, top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    (request([1, 99999], 5), grpc.StatusCode.INVALID_ARGUMENT, "prompt.token_ids"),
    (pb.GenerateRequest(text="hi", max_tokens=5, model="llama-9000"), grpc.StatusCode.INVALID_ARGUMENT, "model"),
])
def test_bad_requests_get_a_status_naming_the_field(live, req, code, field):
    with pytest.raises(grpc.RpcError) as err:
        stream(live.stub, req)
    assert err.value.code() == code
    assert err.value.details().startswith(field)
    assert live.stub.GetServerStatus(pb.GetServerStatusRequest()).accepting  # still up


def test_a_deadline_the_prediction_cannot_meet_is_refused_at_once(live):
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stream(live.stub, request([1, 2, 3], 200), timeout=0.05)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "predicted finish" in err.value.details()
    assert time.monotonic() - start < 0.05 + 0.5


def test_queue_bound_refuses_with_resource_exhausted(live):
    calls = [live.stub.Generate(request([7, 8], 150), timeout=60) for _ in range(12)]
    codes = []
    for call in calls:
        try:
            next(call)
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)
            assert "queue full" in exc.details() and "first token in" in exc.details()
    for call in calls:
        call.cancel()
    assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes


def test_text_prompt_streams_text(live):
    tokens, texts = [], []
    for msg in live.stub.Generate(pb.GenerateRequest(text="héllo", max_tokens=6), timeout=30):
        if msg.WhichOneof("kind") == "token":
            tokens.append(msg.token.id)
            texts.append(msg.token.text)
    assert len(tokens) == 6 and isinstance("".join(texts), str)


def test_model_info_and_status(live):
    info = live.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.model == "tiny" and info.plan_hash == PROGRAM.plan_hash and list(info.buckets) == [1, 2, 4]
    assert info.max_slots == 4 and info.max_context == 256 and info.predictions[0].tpot_s > 0
    status = live.stub.GetServerStatus(pb.GetServerStatusRequest())
    assert status.max_slots == 4 and status.accepting


def test_health_and_reflection_answer(live):
    health = health_pb2_grpc.HealthStub(live.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="lockstep.v1.Lockstep")).status == \
        health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(live.channel)
    (answer,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in answer.list_services_response.service}
    assert {"lockstep.v1.Lockstep", "grpc.health.v1.Health"} <= names


def test_health_check_with_malformed_bytes_is_invalid_argument(live):
    check = live.channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b,
                                     response_deserializer=health_pb2.HealthCheckResponse.FromString)
    valid = health_pb2.HealthCheckRequest(service="lockstep.v1.Lockstep").SerializeToString()
    for raw in (b"\xff\xff\xff\xff", valid[:-1], b"\x0a\x02\xff\xfe"):  # garbage, truncated, bad UTF-8
        with pytest.raises(grpc.RpcError) as err:
            check(raw, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "HealthCheckRequest" in err.value.details()
    assert check(valid, timeout=10).status == health_pb2.HealthCheckResponse.SERVING


def test_metrics_endpoint_counts_what_happened(live):
    stream(live.stub, request([3, 1, 4, 1, 5], 5))
    text = urllib.request.urlopen(live.info["metrics"], timeout=5).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    # Request series carry the served model's name and the front door (gRPC here).
    grpc_, model = ("protocol", "grpc"), ("model", live.stub.GetModelInfo(pb.GetModelInfoRequest()).model)
    assert samples[("lockstep_generation_tokens_total", (model, grpc_))] >= 5
    assert samples[("lockstep_requests_finished_total", (("code", "OK"), model, grpc_, ("reason", "length")))] >= 1
    assert samples[("lockstep_time_to_first_token_seconds_count", (model, grpc_))] >= 1
    assert samples[("lockstep_ticks_total", (("phase", "decode"),))] >= 4
    assert any(name == "lockstep_server_info" for name, _ in samples)


def test_deterministic_mode_paces_ticks_and_counts_overruns():
    server = Running(max_queue=4, max_tokens=50, deterministic=True, time_scale=3.0)
    try:
        stream(server.stub, request([1, 2, 3], 10))
        status = server.stub.GetServerStatus(pb.GetServerStatusRequest())
        assert status.ticks >= 10
        # A scale that makes ticks far shorter than the host's steps: every decode tick
        # overruns. The prefill tick need not: when its first token closes the request's
        # admission window, the promise counts from then, as made (close_window(ended=True));
        # closed by the window's bound mid-tick (a slow host), it overruns too.
        fast = Running(max_queue=4, max_tokens=50, deterministic=True, time_scale=1e-6)
        try:
            stream(fast.stub, request([1, 2, 3], 5))
            status = fast.stub.GetServerStatus(pb.GetServerStatusRequest())
            assert status.ticks == 5 and status.overruns >= 4
        finally:
            fast.close()
    finally:
        server.close()


def test_simultaneous_arrivals_to_an_idle_server_are_promised_together():
    """Four streams sent at once to an idle deterministic server (the engine core in its own
    process) fall in one admission window: all four are promised the same TPOT, the one in
    company, and get the tokens each gets alone; a request alone afterwards is promised its
    own, shorter, decode step."""
    server = Running(max_queue=8, max_tokens=50, deterministic=True, admission_window_s=1.0)
    prompts = [random_prompt(200, seed=20 + i) for i in range(4)]  # 7 prefill chunks: the window stays open

    async def together():
        async with grpc.aio.insecure_channel(server.info["grpc"]) as channel:
            stub = pb_grpc.LockstepStub(channel)

            async def one(prompt):
                tokens, finished = [], None
                async for msg in stub.Generate(request(prompt, 8), timeout=60):
                    if msg.WhichOneof("kind") == "token":
                        tokens.append(msg.token.id)
                    else:
                        finished = msg.finished
                return tokens, finished

            return await asyncio.gather(*(one(p) for p in prompts))

    try:
        results = asyncio.run(together())
        tpots = [finished.predicted_tpot_s for _, finished in results]
        assert tpots == pytest.approx([tpots[0]] * 4)
        for prompt, (tokens, _) in zip(prompts, results):
            assert tokens == executor_tokens(prompt, 8, SamplingParams())
        time.sleep(max(f.predicted_e2e_s for _, f in results))  # every stream handed out: the next is alone
        _, lone = stream(server.stub, request(prompts[0], 8))
        assert lone.predicted_tpot_s < 0.99 * tpots[0]
    finally:
        server.close()


def test_a_window_that_closes_at_its_bound_promises_and_refuses_as_admission_does():
    """A 1 ms admission window closes by its bound, while the first member's long prompt
    is still going in: the promise comes then, and the tokens are the executor's; a member
    whose promised finish is past its deadline is refused DEADLINE_EXCEEDED when its window
    closes, and its slot comes back."""
    server = Running(max_queue=8, max_tokens=200, deterministic=True, admission_window_s=0.001)
    try:
        prompt = random_prompt(200, seed=31)
        tokens, finished = stream(server.stub, request(prompt, 8))
        assert tokens == executor_tokens(prompt, 8, SamplingParams())
        assert finished.predicted_ttft_s > 0 and finished.predicted_tpot_s > 0
        time.sleep(finished.predicted_e2e_s)  # handed out in full
        with pytest.raises(grpc.RpcError) as err:
            stream(server.stub, request([1, 2, 3], 200), timeout=0.05)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "predicted finish" in err.value.details()
        deadline = time.monotonic() + 10
        while server.stub.GetServerStatus(pb.GetServerStatusRequest()).slots_in_use and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.stub.GetServerStatus(pb.GetServerStatusRequest()).slots_in_use == 0
        assert stream(server.stub, request(prompt, 4))[0] == tokens[:4]
    finally:
        server.close()


def test_simulated_pool_runs_slowed_by_a_measured_time_scale():
    """lpu:8: the host runs the math; ticks follow the LPU's step times times the scale."""
    lpu = scheduler.compile(scheduler.get_model("tiny"), scheduler.parse_pool("lpu:8"), OPTIONS)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = LockstepServer(ServeConfig(lpu.to_json(), max_tokens=50))
    try:
        info = asyncio.run_coroutine_threadsafe(server.start(), loop).result(60)
        assert info["time_scale"] > 1  # the host is slower than simulated LPUs
        with grpc.insecure_channel(info["grpc"]) as channel:
            stub = pb_grpc.LockstepStub(channel)
            assert stub.GetModelInfo(pb.GetModelInfoRequest()).time_scale == pytest.approx(info["time_scale"])
            prompt = random_prompt(20, seed=2)
            tokens, _ = stream(stub, request(prompt, 6))
        assert tokens == executor_tokens(prompt, 6, SamplingParams())  # same weights, same math
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(1.0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread priorities need Linux")
def test_the_front_end_is_lowered_and_threads_it_starts_inherit_it_but_the_engine_keeps_its_priority():
    from server.app import _lower_front_end

    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen = {}

    def front_end():
        engine = concurrent.futures.ThreadPoolExecutor(1)  # started before: the engine's thread
        seen["engine_before"] = engine.submit(priority).result()
        seen["own_before"] = priority()
        seen["added"] = _lower_front_end(5)
        seen["own_after"] = priority()
        seen["engine_after"] = engine.submit(priority).result()
        started = concurrent.futures.ThreadPoolExecutor(1)  # started after: a gRPC or metrics thread
        seen["started_after"] = started.submit(priority).result()
        engine.shutdown()
        started.shutdown()

    worker = threading.Thread(target=front_end)  # not pytest's own thread: niceness cannot be undone
    worker.start()
    worker.join(30)
    assert not worker.is_alive()
    # (A process already at nice 19, as some CI runners are, has nothing left to add.)
    assert seen["added"] == min(5, 19 - seen["own_before"])
    assert seen["own_after"] == seen["started_after"] == seen["own_before"] + seen["added"]
    assert seen["engine_after"] == seen["engine_before"]
    assert _lower_front_end(0) == 0


def test_predict_arrival_promises_what_admission_would_and_queues_nothing(live):
    before = live.stub.GetServerStatus(pb.GetServerStatusRequest())
    ask = live.stub.PredictArrival(pb.PredictArrivalRequest(prompt_tokens=5, max_tokens=6))
    assert ask.admissible and not ask.refusal and ask.outstanding == 0
    assert 0 < ask.ttft_s <= ask.e2e_s
    after = live.stub.GetServerStatus(pb.GetServerStatusRequest())
    assert (after.queue_length, after.running, after.ticks) == (before.queue_length, before.running, before.ticks)
    # Sent now, on the idle server, the same shape is promised the same times.
    call = live.stub.Generate(request([3, 1, 4, 1, 5], 6), timeout=60)
    promised = dict(call.initial_metadata())
    list(call)
    # A promise counts from the request's arrival at the front end; the prediction ran in
    # the engine core a message later (server/core/process.py), so they differ by that hop.
    for name, asked in (("ttft", ask.ttft_s), ("e2e", ask.e2e_s)):
        hop = float(promised[f"lockstep-predicted-{name}-s"]) - asked
        assert -1e-6 <= hop < 0.005, (name, hop)


@pytest.mark.parametrize("prompt_tokens, max_tokens, field", [
    (0, 4, "prompt_tokens"), (2**63, 4, "prompt_tokens"), (4, 0, "max_tokens"), (4, 2**64 - 1, "max_tokens"),
    (200, 200, "over the context"),
])
def test_predict_arrival_names_a_bad_shape(live, prompt_tokens, max_tokens, field):
    with pytest.raises(grpc.RpcError) as err:
        live.stub.PredictArrival(pb.PredictArrivalRequest(prompt_tokens=prompt_tokens, max_tokens=max_tokens))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
