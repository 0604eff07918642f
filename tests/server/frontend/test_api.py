"""The service under hostile and unlucky clients, over loopback: no request takes the
engine down or leaves an orphan generation, a failing row ends only its own request, a
dead engine says so, and every admitted request is counted once by how it really ended."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from protos.lockstep.v1 import lockstep_pb2 as pb
from protos.lockstep.v1 import lockstep_pb2_grpc as pb_grpc
from server.runtime.step import ExecutorFailed
from server.frontend.tokenizer import ByteTokenizer
from tests.server.test_app import Running, executor_tokens, request, stream
from tests.server.helpers import random_prompt
from server.runtime.sampling import SamplingParams

POISON = 499  # a prompt token the faulty executor below fails on (prompts here draw from 0..255)


class Faulty:
    """Wraps the server's executor (fault injection): a step whose rows carry POISON raises
    ValueError, as a sampler or kernel bug on one row would; once `dead`, every step
    raises ExecutorFailed, as a dead device or stage actor does; `delay_s` makes each step
    slower than the program predicts, as a throttled device would."""

    def __init__(self, inner):
        self.inner, self.dead, self.delay_s = inner, False, 0.0

    def step(self, batch):
        time.sleep(self.delay_s)
        if self.dead:
            raise ExecutorFailed("device lost (injected)")
        if any(POISON in row and len(row) > 1 for row in batch.token_ids):  # a prompt's (a sampled one is no fault)
            raise ValueError("row failed (injected)")
        return self.inner.step(batch)

    def close(self):
        self.inner.close()


@pytest.fixture
def server():
    # The engine on a thread of the test's process: the faulty executor wraps the real one.
    s = Running(max_queue=8, max_tokens=200, deterministic=False, engine_process=False)
    s.server.engine.executor = s.faulty = Faulty(s.server.engine.executor)
    yield s
    s.close()


def finished_counts(s: Running) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(s.info["metrics"], timeout=5).read().decode()
    return {(x.labels["reason"], x.labels["code"]): x.value for f in text_string_to_metric_families(text)
            for x in f.samples if x.name == "lockstep_requests_finished_total" and x.labels["protocol"] == "grpc"}


def wait_counted(s: Running, key: tuple[str, str], n: float, timeout_s: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (counts := finished_counts(s)).get(key, 0) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return counts


def idle(s: Running, timeout_s: float = 5.0) -> pb.ServerStatus:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = s.stub.GetServerStatus(pb.GetServerStatusRequest())
        if status.slots_in_use == 0 and status.queue_length == 0:
            break
        time.sleep(0.02)
    return status


def test_a_denormal_temperature_is_refused_and_the_engine_stays_up(server):
    with pytest.raises(grpc.RpcError) as err:
        stream(server.stub, request([1, 2, 3], 4, temperature=1e-45))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("sampling.temperature")
    prompt = random_prompt(8, seed=1)
    assert stream(server.stub, request(prompt, 4))[0] == executor_tokens(prompt, 4, SamplingParams())


@pytest.mark.parametrize("rid", ["bad\r\nid", "nul\x00", "ünïcode"])
def test_a_bad_request_id_is_refused_before_it_takes_a_slot(server, rid):
    req = request([1, 2, 3], 150)
    req.request_id = rid
    with pytest.raises(grpc.RpcError) as err:
        stream(server.stub, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("request_id")
    status = server.stub.GetServerStatus(pb.GetServerStatusRequest())
    assert status.slots_in_use == 0 and status.queue_length == 0 and status.running == 0


def test_a_failing_row_ends_its_request_with_internal_and_the_others_keep_their_tokens(server):
    good = [random_prompt(10 + i, seed=i) for i in range(3)]
    results = {}

    def run(name, req):
        try:
            results[name] = stream(server.stub, req)[0]
        except grpc.RpcError as exc:
            results[name] = exc

    bad = request([1, POISON, 3], 20)
    bad.request_id = "the-bad-one"
    threads = [threading.Thread(target=run, args=(i, request(p, 20))) for i, p in enumerate(good)]
    threads.append(threading.Thread(target=run, args=("bad", bad)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["bad"].code() == grpc.StatusCode.INTERNAL and "the-bad-one" in results["bad"].details()
    for i, p in enumerate(good):
        assert results[i] == executor_tokens(p, 20, SamplingParams())
    assert wait_counted(server, ("error", "INTERNAL"), 1)[("error", "INTERNAL")] == 1
    assert server.stub.GetServerStatus(pb.GetServerStatusRequest()).engine_up


def test_a_dead_engine_says_so_and_refuses_with_unavailable(server):
    call = server.stub.Generate(request([4, 5, 6], 180), timeout=30)
    next(call)  # streaming
    server.faulty.dead = True
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - start < 1.0
    assert "engine stopped" in err.value.details()
    assert server.call(server.server.failed.wait(), timeout=5) is True
    with pytest.raises(grpc.RpcError) as err:
        stream(server.stub, request([1, 2], 2))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    health = health_pb2_grpc.HealthStub(server.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.NOT_SERVING
    status = server.stub.GetServerStatus(pb.GetServerStatusRequest())
    assert not status.engine_up and not status.accepting
    text = urllib.request.urlopen(server.info["metrics"], timeout=5).read().decode()
    assert "lockstep_engine_up 0.0" in text and "lockstep_accepting_requests 0.0" in text


def test_cancel_disconnect_deadline_and_stop_are_each_counted_once_by_reason(server):
    # cancelled: the client cancels, its connection stays
    call = server.stub.Generate(request([1, 2, 3], 150), timeout=30)
    next(call)
    call.cancel()
    # disconnected: the client's channel (its own connection) closes mid-stream
    other = grpc.insecure_channel(server.info["grpc"], options=[("grpc.use_local_subchannel_pool", 1)])
    call = pb_grpc.LockstepStub(other).Generate(request([4, 5, 6], 150), timeout=30)
    next(call)
    other.close()
    # deadline: the device runs slower than predicted, so the deadline passes mid-stream
    server.faulty.delay_s = 0.1
    with pytest.raises(grpc.RpcError) as err:
        stream(server.stub, request([7, 8], 20), timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    counts = wait_counted(server, ("deadline", "DEADLINE_EXCEEDED"), 1)
    assert counts.get(("cancelled", "CANCELLED")) == 1
    assert counts.get(("disconnected", "CANCELLED")) == 1
    assert counts.get(("deadline", "DEADLINE_EXCEEDED")) == 1
    assert idle(server).slots_in_use == 0


def test_a_stop_string_ends_as_stop_and_dropped_tokens_are_not_counted(server):
    prompt = random_prompt(12, seed=1)
    ids = executor_tokens(prompt, 40, SamplingParams())
    texts = [ByteTokenizer(512).decode([i]) for i in ids]
    k = next(k for k, t in enumerate(texts) if t.isascii() and t.isprintable() and t)  # a whole character
    req = request(prompt, 40)
    req.stop.append(texts[k])
    tokens, finished = stream(server.stub, req)
    assert finished.finish_reason == "stop" and finished.completion_tokens == len(tokens) == k + 1
    counts = wait_counted(server, ("stop", "OK"), 1)
    assert counts.get(("stop", "OK")) == 1 and ("cancelled", "CANCELLED") not in counts
    assert idle(server).slots_in_use == 0


@pytest.mark.parametrize("seed", range(4))
def test_streamed_text_then_the_flushed_tail_is_the_whole_completion(server, seed):
    msgs = list(server.stub.Generate(request(random_prompt(6, seed=seed, vocab=256), 24, temperature=1.0,
                                             seed=seed), timeout=30))
    ids = [m.token.id for m in msgs[:-1]]
    text = "".join(m.token.text for m in msgs[:-1]) + msgs[-1].finished.text
    assert text == ByteTokenizer(512).decode(ids)


def test_malformed_bytes_get_invalid_argument_not_unknown(server):
    generate = server.channel.unary_stream("/lockstep.v1.Lockstep/Generate", request_serializer=lambda b: b,
                                           response_deserializer=pb.GenerateResponse.FromString)
    valid = request([1, 2, 3], 2).SerializeToString()
    for raw in (b"\xff\xff\xff\xff", valid[:-1], b"\x0a\x02\xff\xfe" + valid[4:]):  # garbage, truncated, bad UTF-8
        with pytest.raises(grpc.RpcError) as err:
            list(generate(raw, timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "GenerateRequest" in err.value.details()
    assert len(list(generate(valid, timeout=10))) == 3


def test_limits_are_reported(server):
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest())
    status = server.stub.GetServerStatus(pb.GetServerStatusRequest())
    assert (info.max_queue, status.max_queue, info.max_slots, status.max_slots) == (8, 8, 4, 4)
    assert info.max_message_bytes == 1 << 20 and info.max_prompt_tokens == 255 and info.max_tokens_limit == 200
