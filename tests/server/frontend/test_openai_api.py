"""The OpenAI-compatible HTTP front door, driven by the official `openai` Python client
(and raw HTTP for bodies the client will not send) against live servers on loopback:
`tiny` (random weights, no chat template) for completions and every refusal, the packaged
real model for chat."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import os
import select
import socket
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

import scheduler
from protos.lockstep.v1 import lockstep_pb2 as pb
from protos.lockstep.v1 import lockstep_pb2_grpc as pb_grpc
from server.runtime import gguf
from tests.server.helpers import OPTIONS, Live

openai = pytest.importorskip("openai")
TINY = scheduler.compile(scheduler.get_model("tiny"), scheduler.parse_pool("cpu:1"), OPTIONS)


def served(program, **config) -> Live:
    """A live server and an `openai` client on its HTTP port."""
    s = Live(program, **config)
    s.client = openai.OpenAI(base_url=s.base, api_key="unused", max_retries=0)
    return s


@pytest.fixture(scope="module")
def tiny():
    s = served(TINY, max_queue=16, max_tokens=64, deterministic=False)
    yield s
    s.close()


def counted(exposition: str, name: str, protocol: str, **labels) -> float:
    """The sample `name` of `protocol` with `labels` (0 if absent) in a /metrics text."""
    want = {"model": "tiny", "protocol": protocol, **labels}
    return sum(x.value for f in text_string_to_metric_families(exposition) for x in f.samples
               if x.name == name and x.labels.items() >= want.items())


def grpc_text(s: Live, prompt: str, n: int) -> str:
    with grpc.insecure_channel(s.info["grpc"]) as ch:
        msgs = list(pb_grpc.LockstepStub(ch).Generate(pb.GenerateRequest(text=prompt, max_tokens=n), timeout=60))
    return "".join(m.token.text for m in msgs if m.HasField("token"))


def test_health_answers_200_while_admitting(tiny):
    with urllib.request.urlopen(f"http://{tiny.info['http']}/health", timeout=5) as resp:
        assert resp.status == 200 and json.loads(resp.read()) == {"status": "ok"}


def test_models_lists_the_served_model(tiny):
    assert [m.id for m in tiny.client.models.list().data] == ["tiny"]


def test_a_completion_is_the_grpc_generation_with_usage(tiny):
    out = tiny.client.completions.create(model="tiny", prompt="hello lockstep", max_tokens=8, temperature=0)
    assert out.choices[0].text == grpc_text(tiny, "hello lockstep", 8)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len("hello lockstep".encode()), 8)


def test_both_front_doors_count_in_one_set_of_metrics_told_apart_by_protocol(tiny):
    def scrape() -> str:
        return urllib.request.urlopen(tiny.info["metrics"], timeout=5).read().decode()

    names = ("lockstep_requests_admitted_total", "lockstep_generation_tokens_total",
             "lockstep_time_to_first_token_seconds_count", "lockstep_predicted_time_to_first_token_seconds_count")
    before = scrape()
    tiny.client.completions.create(model="tiny", prompt="count me", max_tokens=6, temperature=0)
    grpc_text(tiny, "count me too", 4)
    assert tiny.post("/completions", json.dumps({"prompt": "x", "model": "gpt-4"}).encode())[0] == 404
    after = scrape()

    def moved(name: str, protocol: str, **labels) -> float:
        return counted(after, name, protocol, **labels) - counted(before, name, protocol, **labels)

    assert [moved(n, "http") for n in names] == [1, 6, 1, 1]
    assert [moved(n, "grpc") for n in names] == [1, 4, 1, 1]
    assert moved("lockstep_requests_finished_total", "http", reason="length", code="OK") == 1
    assert moved("lockstep_requests_finished_total", "http", reason="rejected", code="NOT_FOUND") == 1
    assert moved("lockstep_requests_finished_total", "grpc", reason="length", code="OK") == 1


def test_a_streamed_completion_is_the_same_text_and_ends_with_usage_and_done(tiny):
    whole = tiny.client.completions.create(model="tiny", prompt="stream me", max_tokens=10, temperature=0)
    chunks = list(tiny.client.completions.create(model="tiny", prompt="stream me", max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_the_prediction_is_in_the_headers(tiny):
    sent = time.time()
    raw = tiny.client.completions.with_raw_response.create(model="tiny", prompt="x", max_tokens=4)
    assert float(raw.headers["lockstep-predicted-ttft-s"]) > 0
    assert float(raw.headers["lockstep-predicted-e2e-s"]) >= float(raw.headers["lockstep-predicted-ttft-s"])
    # The arrival the promise counts from: the door's receipt, after the send.
    assert sent - 1e-3 <= float(raw.headers["lockstep-arrival-unix-s"]) <= time.time()


@pytest.mark.parametrize("late", ["body", "headers"])
def test_the_promise_counts_from_the_doors_receipt_not_from_the_parsed_request(tiny, late):
    """A client times its tokens from its send: the promise must count from the request's
    first bytes at the door, the rest of its headers or its body (here 0.3 s late) and
    tokenizing included. It counted from after the body (8 simultaneous arrivals' tokens
    came 16-18 ms after their promise at p99, the last parsed after the others), then from
    its handler's start (the last of 8 started 4-9 ms after its bytes came)."""
    host, port = tiny.info["http"].rsplit(":", 1)
    body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 4}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body)) + body
    cut = request.index(body) if late == "body" else len(b"POST /v1/comp")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(request[:cut])
        time.sleep(0.3)
        conn.sendall(request[cut:])
        conn.settimeout(30)
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(4096)
    headers = dict(line.split(": ", 1) for line in head.split(b"\r\n\r\n")[0].decode().split("\r\n")[1:])
    assert head.startswith(b"HTTP/1.1 200 "), head
    ttft = float(headers["lockstep-predicted-ttft-s"])
    assert 0.3 <= ttft < 0.3 + 5, ttft
    assert float(headers["lockstep-predicted-e2e-s"]) >= ttft


def test_same_seed_same_text_alone_and_under_concurrent_load(tiny):
    ask = lambda: tiny.client.completions.create(model="tiny", prompt="seeded", max_tokens=12, temperature=0.9,
                                                 seed=5).choices[0].text
    alone = ask()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda _: ask(), range(8)))
    assert texts == [alone] * 8
    other = tiny.client.completions.create(model="tiny", prompt="seeded", max_tokens=12, temperature=0.9, seed=6)
    assert other.choices[0].text != alone


def test_a_stop_string_ends_the_text_before_it(tiny):
    # Random weights and a byte tokenizer: sample (seeded) until the text has an ASCII
    # letter past its start, and stop at that letter's first occurrence.
    kwargs = dict(model="tiny", prompt="stops", max_tokens=24, temperature=1.0)
    for seed in range(1, 50):
        text = tiny.client.completions.create(seed=seed, **kwargs).choices[0].text
        stop = next((c for c in text[1:] if c.isascii() and c.isalpha() and c not in text[:1]), None)
        if stop:
            break
    assert stop, "no seed gave a text with a letter to stop at"
    for stream in (False, True):
        if stream:
            chunks = list(tiny.client.completions.create(seed=seed, stop=[stop], stream=True, **kwargs))
            got, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            out = tiny.client.completions.create(seed=seed, stop=stop, **kwargs).choices[0]
            got, reason = out.text, out.finish_reason
        assert (got, reason) == (text[:text.find(stop)], "stop")


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 4.5}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 2}, 400, "top_p"),
    # Doubles that a float32 field would turn into 0 (greedy, unset) or infinity.
    ({"prompt": "x", "temperature": 2.93e-240}, 400, "temperature"),
    ({"prompt": "x", "top_p": 1e-300}, 400, "top_p"),
    ({"prompt": "x", "temperature": 1e39}, 400, "temperature"),
    ({"prompt": "x", "temperature": 10**400}, 400, "temperature"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "stop": [1, 2]}, 400, "stop"),
    ({"prompt": "x", "ignore_eos": "yes"}, 400, "ignore_eos"),
    ({"prompt": "x", "ignore_eos": 1}, 400, "ignore_eos"),
    ({"prompt": 7}, 400, "prompt"),
    ({"prompt": [1, -2]}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
])
def test_each_bad_field_gets_its_status_and_an_openai_error_body(tiny, body, status, param):
    code, _, reply = tiny.post("/completions", json.dumps(body).encode())
    assert code == status, reply
    err = reply["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and param in err["message"]


@pytest.mark.parametrize("raw", [b"", b"{", b"[1]", b'{"prompt": "x", "temperature": NaN}',
                                 b'{"prompt": "x", "temperature": Infinity}', b"\xff\xfe", b'"text"'])
def test_bodies_that_are_not_a_json_object_get_400(tiny, raw):
    code, _, reply = tiny.post("/completions", raw)
    assert code == 400 and "body" in reply["error"]["message"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reply_until_closed(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection, as it does after
    refusing a request whose body it did not read."""
    conn.setblocking(True)
    conn.settimeout(10)
    parts = []
    while part := conn.recv(1 << 16):
        parts.append(part)
    return b"".join(parts)


def test_a_chunked_body_is_refused_with_413_once_it_passes_the_limit_not_read_to_its_end(tiny):
    """A 100 MB body with no Content-Length: 413 after about 1 MiB is read (the rest is
    never taken), and the server's memory does not grow with it. It was read whole, then
    refused with 400."""
    host, port = tiny.info["http"].rsplit(":", 1)
    chunk = b"x" * (64 << 10)
    total, sent = 100 << 20, 0
    rss_before = _rss_bytes()
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        conn.setblocking(False)
        deadline = time.monotonic() + 30
        while sent < total and time.monotonic() < deadline:
            readable, writable, _ = select.select([conn], [conn], [], 1.0)
            if readable:
                break  # the server has answered
            if writable:
                frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
                try:
                    sent += conn.send(frame)
                except (BlockingIOError, ConnectionError):
                    break
        reply = _reply_until_closed(conn)
    status = int(reply.split(b" ", 2)[1])
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert status == 413 and "over the limit" in body["error"]["message"], reply[:300]
    # What the client got into the socket: the 1 MiB read plus what the kernel buffers
    # on both ends of a loopback connection (a few MiB), far from the 100 MB.
    assert sent < 16 << 20, sent
    grown = _rss_bytes() - rss_before
    print(f"client sent {sent >> 10} KiB before the answer; RSS grew {grown >> 10} KiB")  # 1.1-4.4 MiB measured
    assert grown < 8 << 20
    assert tiny.client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_a_declared_content_length_over_the_limit_is_refused_before_the_body(tiny):
    host, port = tiny.info["http"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (100 << 20))
        reply = _reply_until_closed(conn)  # no body sent: the answer comes anyway
    assert reply.startswith(b"HTTP/1.1 413 ") and b"Content-Length 104857600 is over the limit" in reply


def test_chat_on_a_model_without_a_template_is_refused_with_400(tiny):
    with pytest.raises(openai.BadRequestError, match="chat template"):
        tiny.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])


def test_a_deadline_the_prediction_cannot_meet_gets_504(tiny):
    code, _, reply = tiny.post("/completions", json.dumps({"prompt": "x", "max_tokens": 60}).encode(),
                               {"x-lockstep-deadline-s": "0.0001"})
    assert code == 504 and "deadline" in reply["error"]["message"]


def test_a_full_queue_gets_429_and_the_server_goes_on(tiny):
    slow = served(TINY, max_queue=1, max_tokens=64, deterministic=True, time_scale=50.0)
    try:
        calls = 2 * (OPTIONS.max_slots + 1)  # twice the room: the slots and a queue of 1 beyond them
        with concurrent.futures.ThreadPoolExecutor(calls) as pool:
            futures = [pool.submit(slow.post, "/completions", json.dumps({"prompt": "q", "max_tokens": 3}).encode())
                       for _ in range(calls)]
            codes = [f.result()[0] for f in futures]
        assert 429 in codes and 200 in codes, codes
        assert all(c in (200, 429) for c in codes)
    finally:
        slow.close()


def test_auth_is_required_when_a_token_is_set(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token-for-tests\n")
    token.chmod(0o600)
    s = served(TINY, auth_token_file=str(token), deterministic=False)
    try:
        code, _, reply = s.post("/completions", b'{"prompt": "x", "max_tokens": 2}')
        assert code == 401 and reply["error"]["type"] == "authentication_error"
        ok = openai.OpenAI(base_url=s.base, api_key="s3cret-token-for-tests", max_retries=0)
        assert ok.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2
    finally:
        s.close()


@pytest.fixture(scope="module")
def smol():
    folder = gguf.folder_for(gguf.packaged_file("smollm2-135m"), name="smollm2-135m")
    program = scheduler.compile(scheduler.from_hf_config(folder), scheduler.parse_pool("cpu:1"), OPTIONS)
    s = served(program, checkpoint=str(folder), deterministic=False, max_tokens=64)
    yield s
    s.close()


def test_chat_answers_through_the_models_template_streamed_or_not(smol):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = smol.client.chat.completions.create(model="smollm2-135m", messages=messages, temperature=0, max_tokens=32)
    choice = out.choices[0]
    assert "Paris" in choice.message.content and choice.finish_reason == "stop"
    assert choice.message.role == "assistant" and out.usage.completion_tokens < 32
    chunks = list(smol.client.chat.completions.create(model="smollm2-135m", messages=messages, temperature=0,
                                                      max_completion_tokens=32, stream=True,
                                                      stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_chat_with_a_seed_gives_the_same_text_under_load(smol):
    ask = lambda: smol.client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Name a color."}], temperature=0.8, seed=11,
        max_tokens=16).choices[0].message.content
    alone = ask()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: ask(), range(4))) == [alone] * 4


@pytest.fixture(scope="module")
def slow():
    s = served(TINY, max_tokens=64, deterministic=True, time_scale=50.0)  # ticks of ~10s of ms
    yield s
    s.close()


def server_status(s: Live) -> pb.ServerStatus:
    with grpc.insecure_channel(s.info["grpc"]) as ch:
        return pb_grpc.LockstepStub(ch).GetServerStatus(pb.GetServerStatusRequest())


def disconnected(s: Live) -> float:
    metrics = urllib.request.urlopen(s.info["metrics"], timeout=5).read().decode()
    return counted(metrics, "lockstep_requests_finished_total", "http", code="CANCELLED", reason="disconnected")


def assert_freed_early_and_counted(s: Live, ticks_before: int, counted_before: float):
    """The slot is free well before its 60 tokens could have been made, and the request
    counts once as disconnected."""
    deadline = time.monotonic() + 20
    while (status := server_status(s)).slots_in_use and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status.slots_in_use == 0 and status.ticks - ticks_before < 60, "freed before the request could finish"
    deadline = time.monotonic() + 5
    while disconnected(s) == counted_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert disconnected(s) == counted_before + 1


def leave_over_http(s: Live, stream: bool):
    """A real client on a socket that goes away mid-answer."""
    host, port = s.info["http"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "leave", "max_tokens": 60, "stream": stream}),
                 {"content-type": "application/json"})
    if stream:
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
    else:  # the answer comes only at the end: leave once the request holds its slot
        deadline = time.monotonic() + 20
        while not server_status(s).slots_in_use and time.monotonic() < deadline:
            time.sleep(0.01)
    conn.sock.shutdown(socket.SHUT_RDWR)  # gone (close() alone keeps the fd while a response holds it)
    conn.close()


@pytest.mark.parametrize("stream", [True, False], ids=["mid-stream", "waiting-for-the-whole-answer"])
def test_a_client_that_leaves_frees_its_slot_and_is_counted(slow, stream):
    ticks, before = server_status(slow).ticks, disconnected(slow)
    leave_over_http(slow, stream)
    assert_freed_early_and_counted(slow, ticks, before)


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_a_client_gone_before_its_stream_began_frees_its_slot_and_is_counted(slow, spec_version):
    """At the ASGI interface, as a server speaks it: the request is admitted, then the
    client is gone before a byte of the answer leaves. Under ASGI 2.3 (uvicorn's) Starlette
    hears the disconnect and cancels the stream task, whether or not its generator began;
    under 2.4 the first send fails and Starlette leaves the generator suspended, unclosed
    (this case held the slot to the last token before `_EventStream`)."""
    app = slow.server.http.config.app
    body = json.dumps({"prompt": "never read", "max_tokens": 60, "stream": True}).encode()
    messages = iter([{"type": "http.request", "body": body, "more_body": False}])

    async def receive():
        return next(messages, {"type": "http.disconnect"})

    async def send(message):
        if spec_version == "2.4":
            raise OSError("connection reset")

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    ticks, before = server_status(slow).ticks, disconnected(slow)
    try:
        asyncio.run_coroutine_threadsafe(app(scope, receive, send), slow.loop).result(30)
    except Exception as exc:  # 2.4: Starlette raises ClientDisconnect, as uvicorn would see it
        assert type(exc).__name__ == "ClientDisconnect", exc
    assert_freed_early_and_counted(slow, ticks, before)
