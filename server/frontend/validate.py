"""Checks a `GenerateRequest` whole, before anything is queued or a slot is taken.

Every field is checked over its whole space, not against examples: the proto's
integers are uint64 on the wire, so an oversized count is read whole and refused, not
truncated; floats are checked for NaN, infinities and denormals by range; strings are
checked for what they will become (a request id is echoed as a gRPC header, so it must
be printable ASCII). A message quotes at most `QUOTE_CHARS` of what the client sent.
See docs/security.md for the limits and why they are what they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc

from protos.lockstep.v1 import lockstep_pb2 as pb
from server.runtime.sampling import MAX_TEMPERATURE, MIN_TEMPERATURE, SamplingParams

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
MAX_STOP_TOKEN_IDS = 64
MAX_REQUEST_ID_CHARS = 128
MAX_SEED = 2**63 - 1  # seeds feed torch.Generator.manual_seed (int64)
QUOTE_CHARS = 40  # of a client's string in an error message


@dataclass(frozen=True)
class Limits:
    max_tokens: int  # per request
    max_prompt_tokens: int
    vocab_size: int
    max_context: int
    eos_ids: frozenset[int] = frozenset()  # the model's end-of-sequence ids: every request stops at them


class BadRequest(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Parsed:
    """A request that passed every check."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    stop_ids: frozenset[int]
    request_id: str  # "" when the client gave none


def quote(s: str, n: int = QUOTE_CHARS) -> str:
    """`s` for an error message: repr of at most n characters, and the full length if cut."""
    return repr(s) if len(s) <= n else f"{s[:n]!r}... ({len(s)} characters)"


def float32_change(v: float) -> str:
    """How a float a door read as a double (JSON: the OpenAI and KServe doors) would change in
    the native request's float32 fields (sampling.temperature, top_p), or "" if it would not
    change class: a nonzero value below float32's range arrives as 0, which means greedy
    (temperature) or unset (top_p), and a finite one above it as infinity. The range checks
    run on the float32, so such a value would pass as another."""
    if not math.isfinite(v):
        return ""  # NaN and infinities stay themselves: the range checks refuse them
    narrowed = pb.SamplingParams(temperature=v).temperature  # what the field itself keeps
    if math.isinf(narrowed):
        return f"{v!r} is past the float32 range (the wire type): it would arrive as infinity"
    if v != 0.0 and narrowed == 0.0:
        return f"{v!r} is below the float32 range (the wire type): it would arrive as 0"
    return ""


def _invalid(message: str) -> BadRequest:
    return BadRequest(grpc.StatusCode.INVALID_ARGUMENT, message)


def _out_of_range(message: str) -> BadRequest:
    return BadRequest(grpc.StatusCode.OUT_OF_RANGE, message)


def _request_id(s: str) -> str:
    if len(s) > MAX_REQUEST_ID_CHARS:
        raise _invalid(f"request_id: at most {MAX_REQUEST_ID_CHARS} characters, got {len(s)}")
    bad = next((c for c in s if not " " <= c <= "~"), None)
    if bad is not None:
        raise _invalid(f"request_id: printable ASCII only (it is echoed as a gRPC header); "
                       f"found {bad!r} in {quote(s)}")
    return s


def sampling_params(msg: pb.SamplingParams, vocab: int) -> SamplingParams:
    t, top_p = msg.temperature, msg.top_p
    # One comparison chain per float rejects NaN (every comparison is False), the
    # infinities and denormals (below the range's lower end) alike.
    if not (t == 0.0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
        raise _invalid(f"sampling.temperature must be 0 (greedy) or in [0.01, {MAX_TEMPERATURE:g}], got {t!r}")
    if top_p == 0.0:
        top_p = 1.0  # unset
    if not (0.0 < top_p <= 1.0):
        raise _invalid(f"sampling.top_p must be in (0, 1] (0 = unset), got {top_p!r}")
    if msg.top_k > vocab:
        raise _invalid(f"sampling.top_k must be <= the vocabulary ({vocab}), got {msg.top_k}")
    if msg.seed > MAX_SEED:
        raise _invalid(f"sampling.seed must be < 2^63, got {msg.seed}")
    return SamplingParams(temperature=float(t), top_k=int(msg.top_k), top_p=float(top_p), seed=int(msg.seed))


def _prompt(req: pb.GenerateRequest, limits: Limits, tokenizer) -> list[int]:
    kind = req.WhichOneof("prompt")
    if kind == "text":
        # Refused before tokenizing when it cannot fit: a token covers at most
        # `max_token_bytes` bytes, so more bytes than that many tokens' worth is too long.
        n_bytes = len(req.text.encode("utf-8"))
        if n_bytes > limits.max_prompt_tokens * tokenizer.max_token_bytes:
            raise _out_of_range(f"prompt: {n_bytes} bytes of text cannot fit in {limits.max_prompt_tokens} tokens")
        ids = tokenizer.encode(req.text)
    elif kind == "token_ids":
        ids = list(req.token_ids.ids)
    else:
        ids = []
    if not ids:
        raise _invalid("prompt: empty (give text or token_ids)")
    if len(ids) > limits.max_prompt_tokens:
        raise _out_of_range(f"prompt: {len(ids)} tokens; at most {limits.max_prompt_tokens} fit the context")
    bad = next((i for i in ids if i >= limits.vocab_size), None)
    if bad is not None:
        raise _invalid(f"prompt.token_ids: id {bad} is outside the vocabulary of {limits.vocab_size}")
    return ids


def _stops(req: pb.GenerateRequest, vocab: int) -> tuple[tuple[str, ...], frozenset[int]]:
    if len(req.stop) > MAX_STOP_STRINGS:
        raise _invalid(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(req.stop)}")
    for s in req.stop:
        if not 1 <= len(s) <= MAX_STOP_CHARS:
            raise _invalid(f"stop: each string must have 1 to {MAX_STOP_CHARS} characters, got {quote(s)}")
    if len(req.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise _invalid(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, got {len(req.stop_token_ids)}")
    bad = next((i for i in req.stop_token_ids if i >= vocab), None)
    if bad is not None:
        raise _invalid(f"stop_token_ids: id {bad} is outside the vocabulary of {vocab}")
    return tuple(req.stop), frozenset(req.stop_token_ids)


def parse_request(req: pb.GenerateRequest, limits: Limits, tokenizer, model: str, ignore_eos: bool = False) -> Parsed:
    """Checks every field, cheapest first; raises BadRequest naming the first bad one.
    `ignore_eos` (HTTP's vLLM extension): the model's end-of-sequence ids do not end the
    request (its own stop ids still do), so it runs to max_tokens: fixed-length benchmarks."""
    if req.model and req.model != model:
        raise _invalid(f"model: {quote(req.model)} is not served here (this server serves {model!r})")
    request_id = _request_id(req.request_id)
    if req.max_tokens < 1:
        raise _invalid("max_tokens: must be >= 1")
    if req.max_tokens > limits.max_tokens:
        raise _out_of_range(f"max_tokens: {req.max_tokens} exceeds the limit of {limits.max_tokens}")
    sampling = sampling_params(req.sampling, limits.vocab_size)
    stop, stop_ids = _stops(req, limits.vocab_size)
    ids = _prompt(req, limits, tokenizer)
    if len(ids) + req.max_tokens > limits.max_context:
        raise _out_of_range(f"max_tokens: prompt {len(ids)} + max_tokens {req.max_tokens} exceeds "
                            f"the context of {limits.max_context}")
    return Parsed(ids, int(req.max_tokens), sampling, stop, stop_ids | (frozenset() if ignore_eos else limits.eos_ids),
                  request_id)
