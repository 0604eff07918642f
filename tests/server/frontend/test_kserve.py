"""The KServe v2 / Triton door (server/frontend/kserve.py), driven by the real
`tritonclient[grpc]` over loopback (and by the protocol's stubs for requests the client
will not send), against live servers: the same text and tokens as the native door, one
streamed response per token ending with the final flag, the promise in the parameters,
TLS and the bearer token through the client's own options, and a named error for every
malformed tensor while the server goes on serving."""

from __future__ import annotations

import json
import math
import queue
import struct
import time
import urllib.request

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

import scheduler
from protos.inference import grpc_service_pb2 as kpb
from protos.inference import grpc_service_pb2_grpc as kpb_grpc
from protos.lockstep.v1 import lockstep_pb2 as pb
from protos.lockstep.v1 import lockstep_pb2_grpc as pb_grpc
from server.frontend.kserve import INPUTS, MAX_SAMPLING_JSON_BYTES
from tests.server.frontend.test_auth import self_signed
from tests.server.helpers import OPTIONS, Live

tc = pytest.importorskip("tritonclient.grpc")
TINY = scheduler.compile(scheduler.get_model("tiny"), scheduler.parse_pool("cpu:1"), OPTIONS)
PROMPT = "hello lockstep"


@pytest.fixture(scope="module")
def tiny():
    s = Live(TINY, max_queue=16, max_tokens=64, deterministic=False)
    s.triton = tc.InferenceServerClient(s.info["grpc"])
    yield s
    s.triton.close()
    s.close()


def tensor(name: str, value, datatype: str | None = None):
    """A one-element tritonclient input: BYTES for str/bytes, BOOL for bool."""
    datatype = datatype or ("BOOL" if isinstance(value, bool) else "BYTES")
    t = tc.InferInput(name, [1], datatype)
    t.set_data_from_numpy(np.array([value], dtype=bool if datatype == "BOOL" else object))
    return t


def inputs(prompt: str = PROMPT, stream: bool | None = None, exclude: bool | None = True, **sampling):
    out = [tensor("text_input", prompt)]
    if sampling:
        out.append(tensor("sampling_parameters", json.dumps(sampling)))
    if stream is not None:
        out.append(tensor("stream", stream))
    if exclude is not None:
        out.append(tensor("exclude_input_in_output", exclude))
    return out


def native(s: Live, prompt: str, n: int, temperature: float = 0.0, seed: int = 0) -> tuple[list[str], str]:
    """The native door's answer: (each token's text delta, the whole text)."""
    with grpc.insecure_channel(s.info["grpc"]) as ch:
        msgs = list(pb_grpc.LockstepStub(ch).Generate(pb.GenerateRequest(
            text=prompt, max_tokens=n, sampling=pb.SamplingParams(temperature=temperature, seed=seed)), timeout=60))
    deltas = [m.token.text for m in msgs if m.HasField("token")]
    return deltas, "".join(deltas) + msgs[-1].finished.text


def streamed(client, model: str, ins, request_id: str = "", empty_final: bool = False, **kw) -> list:
    """The results of one streamed request, up to and including its final response."""
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)), **kw.pop("stream_kw", {}))
    try:
        client.async_stream_infer(model, ins, request_id=request_id, enable_empty_final_response=empty_final, **kw)
        out = []
        while True:
            result, error = got.get(timeout=60)
            if error is not None:
                raise error
            out.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return out
    finally:
        client.stop_stream()


def scrape(s: Live) -> str:
    with urllib.request.urlopen(s.info["metrics"], timeout=10) as resp:
        return resp.read().decode()


def counted(exposition: str, name: str, **labels) -> float:
    want = {"model": "tiny", "protocol": "kserve", **labels}
    return sum(x.value for f in text_string_to_metric_families(exposition) for x in f.samples
               if x.name == name and x.labels.items() >= want.items())


# -- probes and metadata ---------------------------------------------------------------------------
def test_live_ready_and_metadata(tiny):
    c = tiny.triton
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("tiny")
    assert not c.is_model_ready("tiny", model_version="2")
    server = c.get_server_metadata()
    assert server.name == "lockstep" and server.version
    meta = c.get_model_metadata("tiny")
    assert meta.name == "tiny" and list(meta.versions) == ["1"]
    assert {(t.name, t.datatype) for t in meta.inputs} == set(INPUTS.items())
    assert ("text_output", "BYTES") in {(t.name, t.datatype) for t in meta.outputs}
    config = c.get_model_config("tiny").config
    assert config.model_transaction_policy.decoupled and config.max_batch_size == 0
    assert [i.name for i in config.input if not i.optional] == ["text_input"]


@pytest.mark.parametrize("call", ["get_model_metadata", "get_model_config"])
def test_an_unknown_model_or_version_is_not_found(tiny, call):
    for args in (("nope",), ("tiny", "7")):
        with pytest.raises(tc.InferenceServerException) as err:
            getattr(tiny.triton, call)(*args)
        assert err.value.status() == "StatusCode.NOT_FOUND" and repr(args[-1]) in err.value.message()
    assert not tiny.triton.is_model_ready("nope")  # a probe, as Triton's: not ready, no error


# -- answers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (0.9, 1234)])
def test_model_infer_is_the_native_doors_text(tiny, temperature, seed):
    _, text = native(tiny, PROMPT, 12, temperature, seed)
    result = tiny.triton.infer("tiny", inputs(max_tokens=12, temperature=temperature, seed=seed))
    assert result.as_numpy("text_output")[0].decode() == text
    params = result.get_response().parameters
    assert params["finish_reason"].string_param == "length" and params["completion_tokens"].int64_param == 12
    assert params["lockstep_predicted_ttft_s"].double_param > 0 and params["lockstep_ttft_s"].double_param > 0


def test_the_prompt_comes_first_unless_excluded_as_vllms_backend_does(tiny):
    _, text = native(tiny, PROMPT, 6)
    result = tiny.triton.infer("tiny", inputs(exclude=None, max_tokens=6, temperature=0))
    assert result.as_numpy("text_output")[0].decode() == PROMPT + text


def test_numbers_as_strings_and_request_parameters_work_as_in_vllms_backend(tiny):
    _, text = native(tiny, PROMPT, 5, 0.7, 99)
    as_strings = tiny.triton.infer("tiny", inputs(max_tokens="5", temperature="0.7", seed="99"))
    as_params = tiny.triton.infer("tiny", inputs(), parameters={"max_tokens": 5, "temperature": 0.7, "seed": 99})
    assert as_strings.as_numpy("text_output")[0].decode() == as_params.as_numpy("text_output")[0].decode() == text


def test_min_tokens_equal_to_max_tokens_runs_to_max_tokens_and_others_are_refused(tiny):
    """genai-perf's fixed lengths: {"max_tokens": "64", "min_tokens": "64"}."""
    result = tiny.triton.infer("tiny", inputs(max_tokens="6", min_tokens="6", temperature=0))
    assert result.get_response().parameters["completion_tokens"].int64_param == 6
    with pytest.raises(tc.InferenceServerException) as err:
        tiny.triton.infer("tiny", inputs(max_tokens=6, min_tokens=3))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "min_tokens" in err.value.message()


def test_asked_outputs_come_back(tiny):
    ins = inputs(max_tokens=4, temperature=0) + [tensor("return_finish_reason", True),
                                                 tensor("return_num_output_tokens", True)]
    result = tiny.triton.infer("tiny", ins)
    assert result.as_numpy("finish_reason")[0] == b"length"
    assert int(result.as_numpy("num_output_tokens")[0]) == 4
    only = tiny.triton.infer("tiny", inputs(max_tokens=4, temperature=0),
                             outputs=[tc.InferRequestedOutput("num_input_tokens")])
    assert only.as_numpy("text_output") is None and int(only.as_numpy("num_input_tokens")[0]) == len(PROMPT.encode())


@pytest.mark.parametrize("empty_final", [True, False])
def test_a_stream_is_one_response_per_token_then_the_final_flag_with_the_promise(tiny, empty_final):
    deltas, text = native(tiny, PROMPT, 10, 0.8, 7)
    results = streamed(tiny.triton, "tiny", inputs(stream=True, max_tokens=10, temperature=0.8, seed=7),
                       request_id="s-1", empty_final=empty_final)
    *tokens, final = results
    assert [r.as_numpy("text_output")[0].decode() for r in tokens] == deltas  # one response per token, in order
    rest = final.as_numpy("text_output")
    # Asked for an empty final response, it has no outputs, unless text was held back to the end
    # (an unfinished character, flushed as U+FFFD: the native door's `Finished.text`).
    held = text != "".join(deltas)
    assert (rest is None) == (empty_final and not held)
    assert "".join(deltas) + ("" if rest is None else rest[0].decode()) == text
    assert all(r.get_response().id == "s-1" for r in results)
    first, last = tokens[0].get_response().parameters, final.get_response().parameters
    assert not first["triton_final_response"].bool_param and last["triton_final_response"].bool_param
    for p in (first, last):  # the promise, on the first response and the last
        assert p["lockstep_predicted_ttft_s"].double_param > 0 and p["lockstep_predicted_e2e_s"].double_param > 0
        assert p["lockstep_predicted_tpot_s"].double_param > 0
    assert last["completion_tokens"].int64_param == len(deltas) and last["finish_reason"].string_param == "length"
    assert last["lockstep_ttft_s"].double_param > 0 and last["lockstep_e2e_s"].double_param > 0
    assert "lockstep_ttft_s" not in tokens[1].get_response().parameters


def test_stream_false_on_a_stream_is_one_whole_response(tiny):
    _, text = native(tiny, PROMPT, 6)
    [only] = streamed(tiny.triton, "tiny", inputs(stream=False, max_tokens=6, temperature=0))
    assert only.as_numpy("text_output")[0].decode() == text


def test_a_bad_request_on_a_stream_is_an_error_response_and_the_stream_goes_on(tiny):
    got: queue.Queue = queue.Queue()
    c = tiny.triton
    c.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        c.async_stream_infer("tiny", inputs(stream=True, temperature=float("nan")), request_id="bad")
        result, error = got.get(timeout=30)
        assert result is None and "sampling_parameters" in error.message()
        c.async_stream_infer("tiny", inputs(stream=True, max_tokens=3, temperature=0), request_id="good",
                             enable_empty_final_response=True)
        answered = [got.get(timeout=30) for _ in range(4)]  # 3 tokens and the final
        assert all(e is None and r.get_response().id == "good" for r, e in answered)
    finally:
        c.stop_stream()


def test_streams_side_by_side_keep_their_own_tokens(tiny):
    """Requests on one stream interleave, told apart by id; each is its native answer."""
    want = {f"r{i}": native(tiny, f"prompt {i}", 8, 0.9, i)[0] for i in range(4)}
    got: queue.Queue = queue.Queue()
    c = tiny.triton
    c.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        for i in range(4):
            c.async_stream_infer("tiny", inputs(f"prompt {i}", stream=True, max_tokens=8, temperature=0.9, seed=i),
                                 request_id=f"r{i}", enable_empty_final_response=True)
        texts: dict[str, list[str]] = {k: [] for k in want}
        finals = 0
        while finals < 4:
            result, error = got.get(timeout=60)
            assert error is None
            r = result.get_response()
            if r.parameters["triton_final_response"].bool_param:
                finals += 1
            else:
                texts[r.id].append(result.as_numpy("text_output")[0].decode())
    finally:
        c.stop_stream()
    assert texts == want


def test_the_door_counts_under_protocol_kserve(tiny):
    before = scrape(tiny)
    tiny.triton.infer("tiny", inputs(max_tokens=3, temperature=0))
    with pytest.raises(tc.InferenceServerException):
        tiny.triton.infer("tiny", [tensor("text_input", True)])
    after = scrape(tiny)
    moved = lambda name, **labels: counted(after, name, **labels) - counted(before, name, **labels)  # noqa: E731
    assert moved("lockstep_requests_admitted_total") == 1
    assert moved("lockstep_requests_finished_total", reason="length", code="OK") == 1
    assert moved("lockstep_requests_finished_total", reason="rejected", code="INVALID_ARGUMENT") == 1
    assert moved("lockstep_time_to_first_token_seconds_count") == 1


def test_a_client_that_cancels_its_stream_frees_the_slot(tiny):
    got: queue.Queue = queue.Queue()
    c = tiny.triton
    before = scrape(tiny)
    c.start_stream(callback=lambda result, error: got.put((result, error)))
    c.async_stream_infer("tiny", inputs(stream=True, max_tokens=60, temperature=0))
    assert got.get(timeout=30)[1] is None  # a first token: it is running
    c.stop_stream(cancel_requests=True)
    deadline = time.monotonic() + 10
    while tiny.server.admission.status()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tiny.server.admission.status()["running"] == 0
    after = scrape(tiny)
    assert counted(after, "lockstep_requests_finished_total", reason="cancelled") - \
        counted(before, "lockstep_requests_finished_total", reason="cancelled") == 1


def test_tls_and_the_bearer_token_through_the_clients_own_options(tmp_path):
    cert, key, _ = self_signed(tmp_path)
    (tmp_path / "token").write_text("kserve-token-0123\n")
    s = Live(TINY, deterministic=False, tls_cert=cert, tls_key=key, auth_token_file=str(tmp_path / "token"))
    try:
        c = tc.InferenceServerClient(s.info["grpc"], ssl=True, root_certificates=cert)
        good = {"authorization": "Bearer kserve-token-0123"}
        assert c.is_server_live() and c.is_model_ready("tiny")  # probes need no token
        for headers in (None, {"authorization": "Bearer wrong"}):
            with pytest.raises(tc.InferenceServerException) as err:
                c.infer("tiny", inputs(max_tokens=2), headers=headers)
            assert err.value.status() == "StatusCode.UNAUTHENTICATED"
            with pytest.raises(tc.InferenceServerException) as err:
                c.get_model_metadata("tiny", headers=headers)
            assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        result = c.infer("tiny", inputs(max_tokens=3, temperature=0), headers=good)
        assert result.get_response().parameters["completion_tokens"].int64_param == 3
        results = streamed(c, "tiny", inputs(stream=True, max_tokens=3, temperature=0), empty_final=True,
                           stream_kw={"headers": good})
        assert len(results) == 4
        plain = tc.InferenceServerClient(s.info["grpc"])
        with pytest.raises(tc.InferenceServerException):
            plain.is_server_live(client_timeout=5)
        c.close()
        plain.close()
    finally:
        s.close()


# -- malformed requests ------------------------------------------------------------------------------
def _raw_bytes(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b


def _valid() -> kpb.ModelInferRequest:
    req = kpb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(_raw_bytes(PROMPT.encode()))
    req.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(_raw_bytes(b'{"max_tokens": 2, "temperature": 0}'))
    return req


def _datatype(draw):
    i = draw(st.integers(0, 1))
    wrong = draw(st.sampled_from(["BOOL", "INT32", "FP32", "UINT8", "BF16", "", "bytes", "STRING", "INT64"]))
    req = _valid()
    if wrong == req.inputs[i].datatype:
        wrong = "FP64"
    req.inputs[i].datatype = wrong
    return req, (grpc.StatusCode.INVALID_ARGUMENT,), req.inputs[i].name


def _shape(draw):
    i = draw(st.integers(0, 1))
    shape = draw(st.lists(st.integers(-2**63, 2**63 - 1), max_size=12).filter(
        lambda s: len(s) > 8 or any(d < 0 for d in s) or math.prod(s) != 1))
    req = _valid()
    del req.inputs[i].shape[:]
    req.inputs[i].shape.extend(shape)
    return req, (grpc.StatusCode.INVALID_ARGUMENT,), req.inputs[i].name


def _raw_content(draw):
    i = draw(st.integers(0, 1))
    junk = draw(st.binary(max_size=64).filter(lambda b: len(b) < 4 or struct.unpack_from("<I", b)[0] != len(b) - 4))
    req = _valid()
    req.raw_input_contents[i] = junk
    return req, (grpc.StatusCode.INVALID_ARGUMENT,), req.inputs[i].name


def _missing(draw):
    req = kpb.ModelInferRequest(model_name="tiny")
    if draw(st.booleans()):
        req.inputs.add(name="stream", datatype="BOOL", shape=[1]).contents.bool_contents.append(False)
    return req, (grpc.StatusCode.INVALID_ARGUMENT,), "text_input"


def _unknown_input(draw):
    name = draw(st.text(min_size=1, max_size=30).filter(lambda n: n not in INPUTS))
    req = _valid()
    req.inputs.add(name=name, datatype="BYTES", shape=[1])
    req.raw_input_contents.append(_raw_bytes(b"x"))
    return req, (grpc.StatusCode.INVALID_ARGUMENT,), "input "


def _oversized(draw):
    which = draw(st.sampled_from(["text_input", "sampling_parameters"]))
    req = _valid()
    size = draw(st.integers(MAX_SAMPLING_JSON_BYTES + 1, 900_000))
    i = 0 if which == "text_input" else 1
    req.raw_input_contents[i] = _raw_bytes(b"a" * size if i == 0 else b'{"stop": "' + b"x" * size + b'"}')
    # text: more bytes than the prompt limit can hold (OUT_OF_RANGE, as the native door)
    return req, (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE), which


def _not_utf8(draw):
    i = draw(st.integers(0, 1))
    junk = draw(st.binary(min_size=1, max_size=40).filter(lambda b: not _is_utf8(b)))
    req = _valid()
    req.raw_input_contents[i] = _raw_bytes(junk)
    return req, (grpc.StatusCode.INVALID_ARGUMENT,), req.inputs[i].name


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _a_temperature(t) -> bool:
    """Whether t (a number, or a string vLLM's backend would read as one) is a valid temperature."""
    try:
        t = float(t)
    except ValueError:
        return False
    return t == 0.0 or 0.01 <= t <= 100.0


def _sampling(draw):
    bad = draw(st.one_of(
        st.fixed_dictionaries({"temperature": st.one_of(st.floats(allow_nan=True, allow_infinity=True).filter(
            lambda t: not _a_temperature(t)), st.text(max_size=5).filter(lambda t: not _a_temperature(t)),
            st.booleans(), st.none())}),
        st.fixed_dictionaries({"max_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=2**31),
                                                       st.floats(), st.lists(st.integers(), max_size=2))}),
        st.fixed_dictionaries({"seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63))}),
        st.fixed_dictionaries({"top_k": st.integers(max_value=-2)}),
        st.fixed_dictionaries({"n": st.integers().filter(lambda n: n != 1)}),
        st.dictionaries(st.text(max_size=10).filter(lambda k: k not in (
            "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos", "n",
            "min_tokens")),
            st.integers(), min_size=1, max_size=2),
    ))
    raw = json.dumps(bad).encode() if draw(st.booleans()) else draw(st.sampled_from(
        [b"[1, 2]", b"{", b'"x"', b"{\"temperature\": NaN}", b"null", b"{\"temperature\": Infinity}"]))
    req = _valid()
    req.raw_input_contents[1] = _raw_bytes(raw)
    return req, (grpc.StatusCode.INVALID_ARGUMENT,), "sampling_parameters"


def _wrong_contents(draw):
    req = kpb.ModelInferRequest(model_name="tiny")
    t = req.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    field = draw(st.sampled_from(["int_contents", "bool_contents", "fp32_contents", "bytes_contents", "none"]))
    if field == "bytes_contents":
        t.contents.bytes_contents.extend([b"a"] * draw(st.sampled_from([0, 2, 3])))
    elif field == "int_contents":
        t.contents.int_contents.append(1)
    elif field == "bool_contents":
        t.contents.bool_contents.append(True)
    elif field == "fp32_contents":
        t.contents.fp32_contents.append(1.0)
    return req, (grpc.StatusCode.INVALID_ARGUMENT,), "text_input"


def _raw_count(draw):
    req = _valid()
    extra = draw(st.integers(1, 3))
    for _ in range(extra):
        req.raw_input_contents.append(b"")
    return req, (grpc.StatusCode.INVALID_ARGUMENT,), "raw_input_contents"


def _model(draw):
    req = _valid()
    if draw(st.booleans()):
        req.model_name = draw(st.text(max_size=20).filter(lambda n: n != "tiny"))
    else:
        req.model_version = draw(st.text(min_size=1, max_size=5).filter(lambda v: v != "1"))
    return req, (grpc.StatusCode.NOT_FOUND,), "model"


MUTATIONS = [_datatype, _shape, _raw_content, _missing, _unknown_input, _oversized, _not_utf8, _sampling,
             _wrong_contents, _raw_count, _model]


@st.composite
def malformed(draw):
    return draw(st.sampled_from(MUTATIONS))(draw)


@pytest.fixture(scope="module")
def door(tiny):
    with grpc.insecure_channel(tiny.info["grpc"]) as ch:
        yield kpb_grpc.GRPCInferenceServiceStub(ch)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=malformed())
def test_every_malformed_request_gets_a_named_error_and_the_server_goes_on(tiny, door, case):
    req, codes, named = case
    before = tiny.server.admission.status()
    with pytest.raises(grpc.RpcError) as err:
        door.ModelInfer(req, timeout=30)
    assert err.value.code() in codes and named in err.value.details(), (err.value.code(), err.value.details())
    # On a stream: one error response naming it (Triton's shape), and the stream ends cleanly.
    [answer] = list(door.ModelStreamInfer(iter([req]), timeout=30))
    assert named in answer.error_message and not answer.infer_response.outputs, answer
    after = tiny.server.admission.status()
    assert after["running"] == before["running"] == 0 and after["queue_length"] == 0


@pytest.mark.parametrize("key, value", [("temperature", 2.9304163522946516e-240), ("top_p", 1e-300),
                                        ("temperature", 1e39)])
def test_a_double_that_a_float32_field_would_change_is_refused_by_name(tiny, door, key, value):
    """The door reads sampling_parameters as doubles; the engine's request holds float32: a
    temperature of 2.93e-240 would arrive as 0 and sample greedily (hypothesis found it)."""
    req = _valid()
    req.raw_input_contents[1] = _raw_bytes(json.dumps({"max_tokens": 2, key: value}).encode())
    with pytest.raises(grpc.RpcError) as err:
        door.ModelInfer(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"sampling_parameters.{key}" in err.value.details()


def test_after_malformed_requests_the_door_still_answers(tiny):
    for payload, code in ((b"\xff\x00garbage", grpc.StatusCode.INVALID_ARGUMENT), (b"", grpc.StatusCode.NOT_FOUND)):
        with pytest.raises(grpc.RpcError) as err:
            _raw_call(tiny, payload)
        assert err.value.code() == code, err.value.details()
    result = tiny.triton.infer("tiny", inputs(max_tokens=3, temperature=0))
    assert result.get_response().parameters["completion_tokens"].int64_param == 3


def _raw_call(s: Live, payload: bytes):
    """ModelInfer with bytes that are not a message (or an empty, text-less one)."""
    with grpc.insecure_channel(s.info["grpc"]) as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
        return call(payload, timeout=10)
