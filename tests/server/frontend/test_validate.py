"""Request validation over each field's whole space: NaN, infinities, denormals, values
past 32 bits, control characters, oversized strings. Each bad request is refused with a
status and a message that names the field and quotes at most a bounded prefix."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protos.lockstep.v1 import lockstep_pb2 as pb
from server.runtime.sampling import MIN_TEMPERATURE
from server.frontend.tokenizer import ByteTokenizer
from server.frontend.validate import QUOTE_CHARS, BadRequest, Limits, float32_change, parse_request

LIMITS = Limits(max_tokens=200, max_prompt_tokens=255, vocab_size=512, max_context=256)
TOKENIZER = ByteTokenizer(512)
INVALID, OUT_OF_RANGE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE


def req(**fields) -> pb.GenerateRequest:
    sampling = fields.pop("sampling", {})
    base = dict(token_ids=pb.TokenIds(ids=[1, 2, 3]), max_tokens=4)
    return pb.GenerateRequest(**{**base, **fields}, sampling=pb.SamplingParams(**sampling))


def refused(r: pb.GenerateRequest) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse_request(r, LIMITS, TOKENIZER, "tiny")
    return info.value


@pytest.mark.parametrize("t", [1e-45, 1e-38, 1e-3, 0.0099, -0.0 - 1e-45, -1.0, 100.5, 3e38,
                               float("inf"), float("-inf"), float("nan")])
def test_temperature_outside_zero_or_the_usable_range_is_refused(t):
    exc = refused(req(sampling=dict(temperature=t)))
    assert exc.code == INVALID and exc.args[0].startswith("sampling.temperature")


@pytest.mark.parametrize("t", [0.0, -0.0, 0.01, 0.7, 1.0, 100.0])
def test_temperature_zero_and_the_usable_range_pass(t):
    assert parse_request(req(sampling=dict(temperature=t)), LIMITS, TOKENIZER, "tiny").sampling.temperature in (
        0.0, pytest.approx(t, rel=1e-6))
    assert MIN_TEMPERATURE <= 0.01


@given(st.floats(width=32))
def test_every_float32_temperature_is_either_served_or_refused_by_name(t):
    try:
        p = parse_request(req(sampling=dict(temperature=t)), LIMITS, TOKENIZER, "tiny")
    except BadRequest as exc:
        assert exc.args[0].startswith("sampling.temperature")
    else:
        assert p.sampling.temperature == 0.0 or 0.0099 < p.sampling.temperature <= 100.0


@given(st.floats())
def test_a_double_is_flagged_exactly_when_a_float32_field_would_change_its_class(v):
    """The JSON doors read doubles; the native request's temperature and top_p are float32:
    a nonzero double that would arrive as 0, or a finite one as infinity, is flagged."""
    narrowed = pb.SamplingParams(temperature=v).temperature
    changed = (v != 0.0 and narrowed == 0.0) or (abs(v) < float("inf") and abs(narrowed) == float("inf"))
    assert bool(float32_change(v)) == changed


@given(st.floats(width=32))
def test_every_float32_top_p_is_either_served_or_refused_by_name(top_p):
    try:
        p = parse_request(req(sampling=dict(top_p=top_p)), LIMITS, TOKENIZER, "tiny")
    except BadRequest as exc:
        assert exc.args[0].startswith("sampling.top_p")
    else:
        assert 0.0 < p.sampling.top_p <= 1.0


@pytest.mark.parametrize("fields, code, name", [
    (dict(max_tokens=2**40 + 1), OUT_OF_RANGE, "max_tokens"),  # was read as 1 (uint32 truncation)
    (dict(max_tokens=2**64 - 1), OUT_OF_RANGE, "max_tokens"),
    (dict(max_tokens=0), INVALID, "max_tokens"),
    (dict(token_ids=pb.TokenIds(ids=[1, 2**32 + 5])), INVALID, "prompt.token_ids"),  # was id 5
    (dict(stop_token_ids=[2**32 + 1]), INVALID, "stop_token_ids"),
    (dict(sampling=dict(top_k=2**32 + 1)), INVALID, "sampling.top_k"),
    (dict(sampling=dict(seed=2**63)), INVALID, "sampling.seed"),
    (dict(stop=[""]), INVALID, "stop"),
    (dict(stop=["x" * 65]), INVALID, "stop"),
    (dict(stop=["a"] * 9), INVALID, "stop"),
    (dict(stop_token_ids=list(range(65))), INVALID, "stop_token_ids"),
    (dict(token_ids=pb.TokenIds(ids=[])), INVALID, "prompt"),
    (dict(token_ids=pb.TokenIds(ids=[1] * 256)), OUT_OF_RANGE, "prompt"),
])
def test_counts_are_read_whole_and_refused_by_name(fields, code, name):
    exc = refused(req(**fields))
    assert exc.code == code and exc.args[0].startswith(name)


@pytest.mark.parametrize("rid", ["a\r\nb", "nul\x00", "é", "tab\t", "\x7f", "x" * 129, "☃" * 10])
def test_request_ids_that_cannot_be_a_header_are_refused_before_queueing(rid):
    exc = refused(req(request_id=rid))
    assert exc.code == INVALID and exc.args[0].startswith("request_id")
    assert len(exc.args[0]) < 300


def test_printable_ascii_request_ids_pass():
    rid = "".join(chr(c) for c in range(0x20, 0x7F))
    assert parse_request(req(request_id=rid), LIMITS, TOKENIZER, "tiny").request_id == rid


@pytest.mark.parametrize("fields", [dict(model="m" * 900_000), dict(request_id="\n" * 100_000),
                                    dict(stop=["s" * 100_000])])
def test_messages_quote_a_bounded_prefix_of_what_the_client_sent(fields):
    assert len(str(refused(req(**fields)))) < 200 + 2 * QUOTE_CHARS


def test_text_too_long_to_fit_is_refused_without_tokenizing():
    class Counting(ByteTokenizer):
        calls = 0

        def encode(self, text):
            Counting.calls += 1
            return super().encode(text)

    with pytest.raises(BadRequest) as info:
        parse_request(pb.GenerateRequest(text="x" * 500_000, max_tokens=1), LIMITS, Counting(512), "tiny")
    assert info.value.code == OUT_OF_RANGE and Counting.calls == 0


def test_a_valid_request_is_parsed_whole():
    p = parse_request(req(text="hi", max_tokens=7, stop=["x"], stop_token_ids=[9], request_id="r-1",
                          sampling=dict(temperature=0.5, top_k=3, top_p=0.5, seed=2**63 - 1)),
                      LIMITS, TOKENIZER, "tiny")
    assert (p.prompt, p.max_tokens, p.stop, p.stop_ids, p.request_id) == ([104, 105], 7, ("x",), {9}, "r-1")
    assert (p.sampling.top_k, p.sampling.seed) == (3, 2**63 - 1)


def test_ignore_eos_drops_the_models_end_ids_but_keeps_the_requests_own():
    from dataclasses import replace

    limits = replace(LIMITS, eos_ids=frozenset({2}))
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]), max_tokens=4, stop_token_ids=[7])
    assert parse_request(req, limits, None, "tiny").stop_ids == {2, 7}
    assert parse_request(req, limits, None, "tiny", ignore_eos=True).stop_ids == {7}
