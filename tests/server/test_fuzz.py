"""Fuzzing a live server on loopback: no GenerateRequest, and no bytes on the wire, can hang
a call, get a status outside ALLOWED (never UNKNOWN or INTERNAL), get an unbounded error
message, or take the engine down.

Field fuzz draws every GenerateRequest field over its whole space (uint64 counts, float32
NaN / infinities / denormals / -0.0, any text with NUL, CR/LF and 100 KB strings); raw fuzz
sends arbitrary bytes and mutations of a valid message (truncations, bit flips, bad UTF-8 in
a string field). Each call must end in a complete stream (tokens, then one `finished`) or a
refusal from ALLOWED with a short message; afterwards the engine is up, idle and SERVING,
and a greedy request gets the same tokens as before. Examples are derandomized (same every run).
"""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from protos.lockstep.v1 import lockstep_pb2 as pb
from server.runtime.sampling import MIN_TEMPERATURE
from tests.server.test_app import Running

VOCAB, LIMIT, HANG_S, MAX_DETAILS = 512, 64, 30.0, 600  # tiny's vocabulary; the server's max_tokens
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
GREEDY = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[3, 1, 4, 1, 5]), max_tokens=6)

U64 = st.one_of(st.integers(0, 2**64 - 1),
                st.sampled_from([0, 1, VOCAB - 1, VOCAB, 2**32 + 5, 2**63 - 1, 2**63, 2**64 - 1]))
F32 = st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1.2e-38, MIN_TEMPERATURE, 0.0099999,
                                                      1.0, 100.0, 3.4e38, float("inf"), float("-inf"), float("nan")]))
LONG = st.tuples(st.text(min_size=1, max_size=3), st.sampled_from([50, 129, 256, 1000, 100_000, 400_000]))
ANY_TEXT = st.one_of(st.text(st.characters(blacklist_categories=("Cs",))),  # all but surrogates; NUL too
                     LONG.map(lambda t: t[0] * t[1]), st.sampled_from(["a\r\nb", "\x00", "é\n"]))
TOKEN = st.one_of(st.integers(0, VOCAB - 1), U64)
FIELDS = {  # name -> (values that pass validation, the field's whole space)
    "prompt": (st.one_of(st.text(min_size=1, max_size=40),
                         st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40)),
               st.one_of(st.none(), ANY_TEXT, st.lists(TOKEN, max_size=20),
                         st.tuples(TOKEN, st.sampled_from([255, 256, 300])).map(lambda t: [t[0]] * t[1]))),
    "max_tokens": (st.integers(1, 4), st.one_of(st.sampled_from([0, LIMIT, LIMIT + 1, 2**40 + 1]), U64)),
    "temperature": (st.one_of(st.just(0.0), st.floats(MIN_TEMPERATURE, 100, width=32)), F32),
    "top_p": (st.floats(0, 1, width=32), F32),
    "top_k": (st.integers(0, VOCAB), U64),
    "seed": (st.integers(0, 2**63 - 1), U64),
    "stop": (st.lists(st.text(min_size=1, max_size=64), max_size=8), st.lists(ANY_TEXT, max_size=10)),
    "stop_token_ids": (st.lists(st.integers(0, VOCAB - 1), max_size=8),
                       st.one_of(st.lists(TOKEN, max_size=8), st.lists(TOKEN, min_size=60, max_size=70))),
    "request_id": (st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=128), ANY_TEXT),
    "model": (st.sampled_from(["", "tiny"]), ANY_TEXT),
}


@st.composite
def requests(draw) -> pb.GenerateRequest:
    """Every field valid but a few (a third of the time none), drawn from their whole space."""
    some = st.sets(st.sampled_from(list(FIELDS)), min_size=1, max_size=4)
    wild = draw(st.one_of(st.just(set()), some, some))
    v = {name: draw(pair[name in wild]) for name, pair in FIELDS.items()}
    prompt, sampling = v.pop("prompt"), {k: v.pop(k) for k in ("temperature", "top_p", "top_k", "seed")}
    req = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling), **v)
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt is not None:
        req.token_ids.ids.extend(prompt)
    return req


def bad_utf8(field: int, junk: bytes, bad: bytes) -> bytes:
    """A string field (text 1, stop 5, request_id 7, model 8) holding invalid UTF-8."""
    return bytes([field << 3 | 2, len(junk + bad)]) + junk + bad  # length < 128: a one-byte varint


def flip(data: bytes, bit: int) -> bytes:
    return data[: bit // 8] + bytes([data[bit // 8] ^ 1 << bit % 8]) + data[bit // 8 + 1:]


VALID = pb.GenerateRequest(text="hello", max_tokens=3, sampling=pb.SamplingParams(temperature=0.7, seed=9),
                           stop=["zz"], request_id="fuzz-1").SerializeToString()
WIRE = st.one_of(
    st.binary(max_size=300), st.integers(0, len(VALID) - 1).map(lambda n: VALID[:n]),
    st.integers(0, 8 * len(VALID) - 1).map(lambda bit: flip(VALID, bit)),
    st.builds(bad_utf8, st.sampled_from([1, 5, 7, 8]), st.binary(max_size=60),
              st.sampled_from([b"\xff\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"])),
    st.builds(lambda head, tail: head + VALID + tail, st.binary(max_size=40), st.binary(max_size=40)))


def req(sampling=None, **fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(**{"text": "hi", "max_tokens": 2, **fields}, sampling=pb.SamplingParams(**sampling or {}))


EDGE_REQUESTS = [  # run every time, whatever the strategies draw
    req(text="x" * 100_000), req(text="\x00é" * 400_000),  # too long; past the 1 MiB message limit
    req(model="m" * 1000), req(model="m" * 100_000), req(request_id="a\r\nb"), req(request_id="\r\n\x00é" * 25_000),
    req(stop=["s" * 100_000]), req(stop_token_ids=[2**64 - 1] * 65), req(max_tokens=2**64 - 1),
    req(max_tokens=2**40 + 1), req(text=None, token_ids=pb.TokenIds(ids=[0, VOCAB, 2**32 + 5, 2**64 - 1])),
    req(dict(temperature=float("nan"))), req(dict(temperature=1e-45, top_p=-0.0)),
    req(dict(temperature=MIN_TEMPERATURE, top_p=1e-45, top_k=VOCAB, seed=2**63 - 1)),  # valid, at every edge
    req(text=None, token_ids=pb.TokenIds(ids=[1] * 255), max_tokens=1),  # fills the context exactly
]
EDGE_BYTES = [b"", b"\x00", b"\xff\xff\xff", VALID, bad_utf8(1, b"", b"\xff\xfe"), bytes(2_000_000)]


@pytest.fixture(scope="module")
def live():
    server = Running(max_queue=64, max_tokens=LIMIT, deterministic=False)
    server.raw = server.channel.unary_stream("/lockstep.v1.Lockstep/Generate", request_serializer=lambda b: b,
                                             response_deserializer=pb.GenerateResponse.FromString)
    try:
        server.baseline = greedy_ids(server)
        yield server
    finally:
        server.close()


def call(method, request) -> tuple[list[pb.GenerateResponse], grpc.StatusCode, str]:
    start, messages = time.monotonic(), []
    try:
        messages.extend(method(request, timeout=HANG_S))
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    assert time.monotonic() - start < HANG_S - 1, f"hung: {code.name} after {HANG_S} s"
    return messages, code, details


def check_outcome(messages, code, details) -> None:
    if code == grpc.StatusCode.OK:
        assert messages, "OK with no finished message"
        *tokens, last = messages
        assert last.WhichOneof("kind") == "finished" and last.finished.finish_reason in ("length", "stop")
        assert all(m.WhichOneof("kind") == "token" for m in tokens)
        assert last.finished.completion_tokens == len(tokens) <= LIMIT
    else:
        assert code in ALLOWED, f"{code.name}: {details}"
        assert 0 < len(details) <= MAX_DETAILS, f"{code.name}: {len(details)} characters of details"
        # The client's transport turns an oversized status into RESOURCE_EXHAUSTED ("Stream removed");
        # the server's own are a full queue and a message over its limit.
        assert code != grpc.StatusCode.RESOURCE_EXHAUSTED or "queue full" in details or "larger than max" in details


def greedy_ids(live) -> list[int]:
    messages, code, _ = call(live.stub.Generate, GREEDY)
    assert code == grpc.StatusCode.OK and messages[-1].finished.finish_reason == "length"
    return [m.token.id for m in messages[:-1]]


def assert_still_serving(live) -> None:
    deadline = time.monotonic() + 5
    while (status := live.stub.GetServerStatus(pb.GetServerStatusRequest(), timeout=5)).slots_in_use + \
            status.queue_length and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status.engine_up and status.accepting and (status.slots_in_use, status.queue_length) == (0, 0)
    health = health_pb2_grpc.HealthStub(live.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert greedy_ids(live) == live.baseline


def fuzz(check, name: str, strategy, edges) -> None:
    """Runs `check` on every edge, then on FUZZ's examples of `strategy`."""
    for edge in edges:
        check = example(**{name: edge})(check)
    FUZZ(given(**{name: strategy})(check))()


def test_any_request_fields_end_in_a_stream_or_an_allowed_refusal(live):
    def one(request):
        messages, code, details = call(live.stub.Generate, request)
        check_outcome(messages, code, details)
        assert code != grpc.StatusCode.OK or len(messages) - 1 <= request.max_tokens <= LIMIT

    fuzz(one, "request", requests(), EDGE_REQUESTS)
    assert_still_serving(live)


def test_any_bytes_on_the_wire_end_in_a_stream_or_an_allowed_refusal(live):
    fuzz(lambda data: check_outcome(*call(live.raw, data)), "data", WIRE, EDGE_BYTES)
    assert_still_serving(live)


@pytest.mark.parametrize("data", [b"\xff\xff\xff", bad_utf8(1, b"", b"\xff\xfe")])
def test_a_malformed_message_is_invalid_argument_naming_the_type(live, data):
    _, code, details = call(live.raw, data)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "GenerateRequest" in details, (code, details)
