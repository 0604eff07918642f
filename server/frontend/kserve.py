"""The KServe v2 / Triton inference protocol (`inference.GRPCInferenceService`, the
published protos/inference/grpc_service.proto) on the gRPC server and port of Lockstep's
own API: the door Triton's, KServe's and their benchmark tools' clients already speak.

Requests carry the tensors Triton's vLLM backend takes (its model's inputs, as
`ModelMetadata` and `ModelConfig` list them; all one-element tensors):

  text_input               BYTES  the prompt, UTF-8
  stream                   BOOL   one response per token (ModelStreamInfer only)
  sampling_parameters      BYTES  a JSON object: max_tokens, temperature, top_p, top_k,
                                  seed, stop, stop_token_ids, ignore_eos, n (= 1),
                                  min_tokens (0 or max_tokens: run to max_tokens)
  exclude_input_in_output  BOOL   default: false for a whole answer (the prompt comes
                                  first in text_output), true when streaming
  return_finish_reason, return_num_input_tokens, return_num_output_tokens  BOOL

and answer `text_output` (BYTES; one delta per token when streaming). The sampling
parameters may also come as request parameters (as vLLM's backend takes them when the
tensor is absent), not both ways at once. Values are checked over their whole space, then
by the same `parse_request` as the other doors (server/frontend/validate.py): a bad
tensor, parameter or value is INVALID_ARGUMENT naming it; an unknown model or version is
NOT_FOUND; nothing malformed reaches the engine.

Streams follow Triton's decoupled models: a ModelStreamInfer stream takes any number of
requests, answered by `id`, each with one response per token and a last response flagged
`triton_final_response` (empty, or with the held-back rest of the text); a request's error
is a response with `error_message`, and the stream goes on. The promise rides in the
response parameters: `lockstep_predicted_ttft_s`, `lockstep_predicted_tpot_s` and
`lockstep_predicted_e2e_s` on the first and the last response, the measured
`lockstep_ttft_s`, `lockstep_tpot_s`, `lockstep_e2e_s`, `lockstep_queue_s` and
`finish_reason` on the last. ModelInfer sends the promise as initial metadata too, as the
native door does, since its one response comes at the end.

Same admission by prediction, outcome record (server/frontend/textrun.py), limits, TLS and
token auth as the other doors; metrics count under protocol="kserve". ServerLive,
ServerReady and ModelReady are probes and, like grpc.health, need no token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from importlib import metadata

import grpc

from protos.inference import grpc_service_pb2 as kpb
from protos.inference import model_config_pb2 as mc
from protos.lockstep.v1 import lockstep_pb2 as pb
from server.frontend.api import Malformed, Refused, _client_ending, _lenient, promise_metadata, replica_metadata
from server.frontend.textrun import TextRun
from server.frontend.validate import BadRequest, Limits, float32_change, parse_request, quote

PROTOCOL = "kserve"  # the `protocol` label of this door's request metrics
SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
VERSION = "1"  # the one version of the one model served
MAX_DIMS = 8  # of a tensor's shape
MAX_ID_CHARS = 128  # a request's id is the request id (validate.MAX_REQUEST_ID_CHARS)
MAX_SAMPLING_JSON_BYTES = 64 * 1024
_BYTES_PREFIX = struct.Struct("<I")  # a BYTES element on the wire: uint32 little-endian length, then the bytes
_INT_MAX = 2**63 - 1

# name -> datatype; every input is optional but text_input, and holds one element.
INPUTS = {
    "text_input": "BYTES",
    "stream": "BOOL",
    "sampling_parameters": "BYTES",
    "exclude_input_in_output": "BOOL",
    "return_finish_reason": "BOOL",
    "return_num_input_tokens": "BOOL",
    "return_num_output_tokens": "BOOL",
}
OUTPUTS = {"text_output": "BYTES", "finish_reason": "BYTES", "num_input_tokens": "UINT32",
           "num_output_tokens": "UINT32"}
_RETURNS = {"return_finish_reason": "finish_reason", "return_num_input_tokens": "num_input_tokens",
            "return_num_output_tokens": "num_output_tokens"}
# sampling_parameters' keys (vLLM's names) -> the kind of value.
SAMPLING = {"max_tokens": "int", "temperature": "float", "top_p": "float", "top_k": "int", "seed": "int",
            "stop": "strings", "stop_token_ids": "ints", "ignore_eos": "bool", "n": "int", "min_tokens": "int"}
EMPTY_FINAL = "triton_enable_empty_final_response"  # a request parameter tritonclient sends on streams
FINAL = "triton_final_response"  # the response parameter that flags a request's last response


class Invalid(BadRequest):
    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)


def _config_dtype(datatype: str) -> int:
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


# -- tensors -----------------------------------------------------------------------------------------
def _one_element(name: str, shape) -> None:
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
        raise Invalid(f"input {name!r}: shape {list(shape)[:MAX_DIMS + 1]} is not a tensor shape")
    n = 1
    for d in shape:
        n *= d
    if n != 1:
        raise Invalid(f"input {name!r}: shape must hold one element ([1] or [1, 1]), got {list(shape)}")


def _from_raw(name: str, datatype: str, raw: bytes):
    if datatype == "BOOL":
        if len(raw) != 1 or raw[0] > 1:
            raise Invalid(f"input {name!r}: raw BOOL content must be one byte, 0 or 1; got {len(raw)} bytes")
        return bool(raw[0])
    if len(raw) < 4 or _BYTES_PREFIX.unpack_from(raw)[0] != len(raw) - 4:
        raise Invalid(f"input {name!r}: raw BYTES content must be one element (a 4-byte little-endian length, "
                      f"then that many bytes); got {len(raw)} bytes")
    return raw[4:]


def _from_contents(name: str, datatype: str, contents) -> object:
    field = "bool_contents" if datatype == "BOOL" else "bytes_contents"
    given = {f.name: len(v) for f, v in contents.ListFields()}
    if given != {field: 1}:
        raise Invalid(f"input {name!r}: a {datatype} tensor of one element needs contents.{field} with one value; "
                      f"got {given or 'no contents'}")
    return getattr(contents, field)[0]


def _text(name: str, data: bytes, limit: int | None = None) -> str:
    if limit is not None and len(data) > limit:
        raise Invalid(f"input {name!r}: {len(data)} bytes, over the limit of {limit}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Invalid(f"input {name!r}: not valid UTF-8 (byte {exc.start})") from None


def tensors(req: kpb.ModelInferRequest) -> dict[str, object]:
    """The request's input tensors by name, each checked (a known input, its datatype, one
    element, its content) and decoded: BOOL -> bool, BYTES -> bytes."""
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise Invalid(f"raw_input_contents: {len(raw)} buffers for {len(req.inputs)} inputs (one each, or none)")
    out = {}
    for i, t in enumerate(req.inputs):
        name = t.name
        if name not in INPUTS:
            raise Invalid(f"input {quote(name)}: not an input of this model (its inputs: {', '.join(INPUTS)})")
        if name in out:
            raise Invalid(f"input {name!r}: given twice")
        if t.datatype != INPUTS[name]:
            raise Invalid(f"input {name!r}: datatype must be {INPUTS[name]}, got {quote(t.datatype)}")
        _one_element(name, t.shape)
        if t.parameters:
            raise Invalid(f"input {name!r}: parameter {quote(sorted(t.parameters)[0])} is not supported "
                          f"(no shared memory here: send the data in the request)")
        if raw:
            if t.HasField("contents"):
                raise Invalid(f"input {name!r}: has contents and raw_input_contents (give one)")
            out[name] = _from_raw(name, t.datatype, raw[i])
        else:
            out[name] = _from_contents(name, t.datatype, t.contents)
    if "text_input" not in out:
        raise Invalid("input 'text_input': missing (the prompt, a BYTES tensor of one UTF-8 element)")
    return out


# -- sampling ----------------------------------------------------------------------------------------
def _int(key: str, v) -> int:
    if isinstance(v, str) and v.strip().lstrip("+-").isdigit() and len(v) <= 40:
        v = int(v)  # vLLM's backend takes numbers as strings too
    if isinstance(v, bool) or not isinstance(v, int):
        raise Invalid(f"sampling_parameters.{key}: must be an integer, got {quote(json.dumps(v))}")
    return v


def _float(key: str, v) -> float:
    if isinstance(v, str) and len(v) <= 40:
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise Invalid(f"sampling_parameters.{key}: must be a number, got {quote(json.dumps(v))}")
    try:
        return float(v)
    except OverflowError:  # an integer past the floats
        raise Invalid(f"sampling_parameters.{key}: {str(v)[:40]} is out of range") from None


def _bool(key: str, v) -> bool:
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    if not isinstance(v, bool):
        raise Invalid(f"sampling_parameters.{key}: must be true or false, got {quote(json.dumps(v))}")
    return v


def _strings(key: str, v) -> list[str]:
    v = [v] if isinstance(v, str) else v
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise Invalid(f"sampling_parameters.{key}: must be a string or a list of strings")
    return v


def _ints(key: str, v) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= _INT_MAX
                                          for i in v):
        raise Invalid(f"sampling_parameters.{key}: must be a list of token ids (integers >= 0)")
    return v


_KINDS = {"int": _int, "float": _float, "bool": _bool, "strings": _strings, "ints": _ints}


def _param_value(p: kpb.InferParameter):
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def sampling(found: dict[str, object], params) -> dict[str, object]:
    """The sampling parameters from the `sampling_parameters` tensor's JSON and the request's
    parameters (vLLM's names, values converted and range-checked for the proto's fields)."""
    given: dict[str, object] = {}
    if "sampling_parameters" in found:
        text = _text("sampling_parameters", found["sampling_parameters"], MAX_SAMPLING_JSON_BYTES)
        try:
            obj = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not JSON")))
        except (ValueError, RecursionError) as exc:
            raise Invalid(f"input 'sampling_parameters': not valid JSON ({str(exc)[:80]})") from None
        if not isinstance(obj, dict):
            raise Invalid("input 'sampling_parameters': must be a JSON object")
        given.update(obj)
    for key, p in params.items():
        if key == EMPTY_FINAL:
            if p.WhichOneof("parameter_choice") != "bool_param":
                raise Invalid(f"parameter {EMPTY_FINAL!r}: must be a bool")
            continue
        if key not in SAMPLING:
            raise Invalid(f"parameter {quote(key)}: not supported (sampling: {', '.join(SAMPLING)}; "
                          f"or {EMPTY_FINAL})")
        if key in given:
            raise Invalid(f"parameter {key!r}: given in sampling_parameters too (give it once)")
        given[key] = _param_value(p)
    out = {}
    for key, v in given.items():
        if key not in SAMPLING:
            raise Invalid(f"sampling_parameters: key {quote(key)} is not supported (supported: {', '.join(SAMPLING)})")
        out[key] = _KINDS[SAMPLING[key]](key, v)
    if out.get("n", 1) != 1:
        raise Invalid(f"sampling_parameters.n: only 1 is supported, got {out['n']}")
    if not 1 <= out.get("max_tokens", 1) < 2**31:
        raise Invalid(f"sampling_parameters.max_tokens: must be in 1..2^31-1, got {out['max_tokens']}")
    top_k = out.get("top_k", 0)
    if top_k == -1:
        out["top_k"] = 0  # vLLM's "all"
    elif not 0 <= top_k < 2**31:
        raise Invalid(f"sampling_parameters.top_k: must be -1 or 0 (all) or a count, got {top_k}")
    if not 0 <= out.get("seed", 0) < 2**64:
        raise Invalid(f"sampling_parameters.seed: must be in 0..2^63-1, got {out['seed']}")
    # min_tokens (genai-perf sends it equal to max_tokens for fixed lengths): only "run to
    # max_tokens" is served, as ignore_eos (an end-of-sequence token may then appear in the
    # text, where vLLM would never sample it).
    min_tokens = out.pop("min_tokens", 0)
    if min_tokens == out.get("max_tokens", 16) and min_tokens > 0:
        out["ignore_eos"] = True
    elif min_tokens != 0:
        raise Invalid(f"sampling_parameters.min_tokens: only 0 or max_tokens ({out.get('max_tokens', 16)}) "
                      f"is supported, got {min_tokens}")
    return out


# -- the answer --------------------------------------------------------------------------------------
def _raw(datatype: str, value) -> bytes:
    if datatype == "BYTES":
        b = value.encode("utf-8") if isinstance(value, str) else value
        return _BYTES_PREFIX.pack(len(b)) + b
    return struct.pack("<I", value)  # UINT32


class _Request:
    """One checked ModelInferRequest: what to queue and how to answer."""

    def __init__(self, req: kpb.ModelInferRequest, prompt_text: str, found: dict, on_stream: bool):
        """on_stream: it came on ModelStreamInfer (its responses carry the final flag).
        `parsed` (validate.Parsed) is set once the shared checks pass."""
        self.id, self.prompt_text, self.on_stream, self.parsed = req.id, prompt_text, on_stream, None
        self.streaming = on_stream and bool(found.get("stream"))  # one response per token
        # sampling() checked it is a bool parameter
        self.empty_final = EMPTY_FINAL in req.parameters and req.parameters[EMPTY_FINAL].bool_param
        exclude = found.get("exclude_input_in_output")
        self.prepend = not exclude if exclude is not None else not self.streaming
        if self.prepend and self.streaming:
            raise Invalid("input 'exclude_input_in_output': false is not allowed when streaming "
                          "(as Triton's vLLM backend)")
        asked = [o.name for o in req.outputs]
        for o in req.outputs:
            if o.name not in OUTPUTS:
                raise Invalid(f"output {quote(o.name)}: not an output of this model (its outputs: "
                              f"{', '.join(OUTPUTS)})")
            if o.parameters:
                raise Invalid(f"output {o.name!r}: parameter {quote(sorted(o.parameters)[0])} is not supported")
        self.outputs = asked or ["text_output"] + [out for flag, out in _RETURNS.items() if found.get(flag)]

    def whole(self, model: str, r, run: TextRun) -> kpb.ModelInferResponse:
        """The one response of a finished run: its text (after the prompt, unless excluded)."""
        return self.response(model, r, (self.prompt_text if self.prepend else "") + run.text, run, final=True,
                             promise=True)

    def response(self, model: str, r, text: str | None, run: TextRun | None, final: bool,
                 promise: bool) -> kpb.ModelInferResponse:
        """text None: no outputs (an empty final response). run: the finished run, whose
        finish reason and counts fill the other outputs and the measured parameters."""
        out = kpb.ModelInferResponse(model_name=model, model_version=VERSION, id=self.id)
        params = out.parameters
        if self.on_stream:
            params[FINAL].bool_param = final
        params["lockstep_request_id"].string_param = r.request_id
        if promise:
            params["lockstep_predicted_ttft_s"].double_param = r.predicted_ttft_s
            params["lockstep_predicted_tpot_s"].double_param = r.predicted_tpot_s
            params["lockstep_predicted_e2e_s"].double_param = r.predicted_e2e_s
            for key, value in replica_metadata(r):
                params[key.replace("-", "_")].string_param = value
        o = run.outcome if run is not None and final else None
        if o is not None:
            params["finish_reason"].string_param = o.reason
            params["prompt_tokens"].int64_param = len(r.prompt)
            params["completion_tokens"].int64_param = o.completion_tokens
            params["lockstep_e2e_s"].double_param = o.e2e_s
            for key, value in (("lockstep_ttft_s", o.ttft_s), ("lockstep_tpot_s", o.tpot_s),
                               ("lockstep_queue_s", o.queue_s)):
                if value is not None:
                    params[key].double_param = value
        if text is None:
            return out
        values = {"text_output": text}
        if o is not None:
            values.update(finish_reason=o.reason, num_input_tokens=len(r.prompt), num_output_tokens=o.completion_tokens)
        for name in self.outputs:
            if name in values:
                out.outputs.add(name=name, datatype=OUTPUTS[name], shape=[1])
                out.raw_output_contents.append(_raw(OUTPUTS[name], values[name]))
        return out


class KServeService:
    """inference.GRPCInferenceService over the same admission (an engine here or a router's
    replicas), tokenizer, limits and metrics as LockstepService."""

    def __init__(self, admission, info: pb.ModelInfo, tokenizer, limits: Limits, metrics=None):
        self.admission, self.tokenizer, self.limits = admission, tokenizer, limits
        self.metrics, self.model = metrics, info.model
        self.streams = 0  # calls still running (a drain waits for their last message)

    def add_to_server(self, server) -> None:
        """Registers the RPCs clients use, with the lenient deserializer (malformed bytes get
        INVALID_ARGUMENT, not UNKNOWN); the protocol's others answer UNIMPLEMENTED."""
        unary = {"ServerLive": kpb.ServerLiveRequest, "ServerReady": kpb.ServerReadyRequest,
                 "ModelReady": kpb.ModelReadyRequest, "ServerMetadata": kpb.ServerMetadataRequest,
                 "ModelMetadata": kpb.ModelMetadataRequest, "ModelConfig": kpb.ModelConfigRequest,
                 "ModelInfer": kpb.ModelInferRequest}
        handlers = {name: grpc.unary_unary_rpc_method_handler(
            getattr(self, name), _lenient(cls), lambda m: m.SerializeToString()) for name, cls in unary.items()}
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.ModelStreamInfer, _lenient(kpb.ModelInferRequest), kpb.ModelStreamInferResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

    # -- probes and metadata -------------------------------------------------------------------------
    @staticmethod
    async def _malformed(request, context) -> None:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not valid ({request.error})")

    def _not_served(self, name: str, version: str) -> str:
        """Why a model or version is not served here ("" when it is)."""
        if name != self.model:
            return f"model {quote(name)}: not served here (this server serves {self.model!r})"
        if version not in ("", VERSION):
            return f"model {self.model!r} version {quote(version)}: not served here (version {VERSION} is)"
        return ""

    async def _model(self, request, context) -> None:
        """NOT_FOUND for a model or version not served here."""
        await self._malformed(request, context)
        if why := self._not_served(request.name, request.version):
            await context.abort(grpc.StatusCode.NOT_FOUND, why)

    async def ServerLive(self, request, context):
        await self._malformed(request, context)
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        await self._malformed(request, context)
        return kpb.ServerReadyResponse(ready=self.admission.up and self.admission.accepting)

    async def ModelReady(self, request, context):
        """A probe, as Triton's: a model or version not served here is not ready (no error)."""
        await self._malformed(request, context)
        served = not self._not_served(request.name, request.version)
        return kpb.ModelReadyResponse(ready=served and self.admission.up and self.admission.accepting)

    async def ServerMetadata(self, request, context):
        await self._malformed(request, context)
        return kpb.ServerMetadataResponse(name="lockstep", version=metadata.version("lockstep"), extensions=[])

    async def ModelMetadata(self, request, context):
        await self._model(request, context)
        return kpb.ModelMetadataResponse(
            name=self.model, versions=[VERSION], platform="lockstep",
            inputs=[kpb.ModelMetadataResponse.TensorMetadata(name=n, datatype=d, shape=[1]) for n, d in INPUTS.items()],
            outputs=[kpb.ModelMetadataResponse.TensorMetadata(name=n, datatype=d, shape=[-1])
                     for n, d in OUTPUTS.items()])

    async def ModelConfig(self, request, context):
        """As Triton's vLLM backend completes its model's: no batch dimension (the engine
        batches), decoupled (a stream answers a request with one response per token)."""
        await self._model(request, context)
        return kpb.ModelConfigResponse(config=mc.ModelConfig(
            name=self.model, platform="lockstep", backend="lockstep", max_batch_size=0,
            version_policy=mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=[int(VERSION)])),
            input=[mc.ModelInput(name=n, data_type=_config_dtype(d), dims=[1], optional=n != "text_input")
                   for n, d in INPUTS.items()],
            output=[mc.ModelOutput(name=n, data_type=_config_dtype(d), dims=[-1]) for n, d in OUTPUTS.items()],
            model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True)))

    # -- inference -----------------------------------------------------------------------------------
    def _check(self, req, streaming: bool) -> _Request:
        """Every check of one request (raises BadRequest), cheapest first; then parse_request's."""
        if isinstance(req, Malformed):
            raise Invalid(f"request: not a valid ModelInferRequest ({req.error})")
        if why := self._not_served(req.model_name, req.model_version):
            raise BadRequest(grpc.StatusCode.NOT_FOUND, why)
        if len(req.id) > MAX_ID_CHARS:  # parse_request checks it further (printable ASCII)
            raise Invalid(f"id: at most {MAX_ID_CHARS} characters, got {len(req.id)}")
        found = tensors(req)
        if found.get("stream") and not streaming:
            raise Invalid("input 'stream': true needs ModelStreamInfer (ModelInfer answers once)")
        s = sampling(found, req.parameters)
        for key in ("temperature", "top_p"):
            if key in s and (why := float32_change(s[key])):
                raise Invalid(f"sampling_parameters.{key}: {why}")
        checked = _Request(req, _text("text_input", found["text_input"]), found, streaming)  # before tokenizing
        g = pb.GenerateRequest(text=checked.prompt_text, max_tokens=s.get("max_tokens", 16),
                               request_id=req.id, stop=s.get("stop", ()), stop_token_ids=s.get("stop_token_ids", ()))
        g.sampling.temperature = s.get("temperature", 1.0)  # vLLM's defaults
        g.sampling.top_p = s.get("top_p", 1.0)
        g.sampling.top_k = s.get("top_k", 0)
        g.sampling.seed = s.get("seed", 0)
        try:
            checked.parsed = parse_request(g, self.limits, self.tokenizer, self.model, s.get("ignore_eos", False))
        except BadRequest as exc:  # the shared checks name the native door's fields
            message = str(exc).replace("sampling.", "sampling_parameters.").replace("prompt:", "input 'text_input':")
            message = message.replace("max_tokens:", "sampling_parameters.max_tokens:")
            raise BadRequest(exc.code, message.replace("request_id:", "id:")) from None
        return checked

    async def _admit(self, req, context, streaming: bool):
        """(_Request, admitted Request, its queue); raises BadRequest or Refused, counted."""
        arrival = time.perf_counter()  # the promise counts from here, parsing and tokenizing in it
        try:
            checked = self._check(req, streaming)
            r, queue = await self.admission.admit(checked.parsed, context.time_remaining(), arrival)
        except (BadRequest, Refused) as exc:
            if self.metrics is not None:
                self.metrics.request_rejected(PROTOCOL, exc.code.name)
            raise
        if self.metrics is not None:
            self.metrics.request_admitted(PROTOCOL, len(checked.parsed.prompt))
        return checked, r, queue

    def _run(self, checked: _Request, r, queue, context) -> TextRun:
        return TextRun(self.admission, self.tokenizer, self.metrics, PROTOCOL, r, queue, checked.parsed.stop,
                       cut=lambda: _client_ending(context))

    async def ModelInfer(self, request, context):
        self.streams += 1
        try:
            try:
                checked, r, queue = await self._admit(request, context, streaming=False)
            except (BadRequest, Refused) as exc:
                await context.abort(exc.code, str(exc))
            await context.send_initial_metadata(promise_metadata(r))
            run = self._run(checked, r, queue, context)
            await _drain(run)
            if run.error is not None:
                await context.abort(run.outcome.code, run.error)
            return checked.whole(self.model, r, run)
        finally:
            self.streams -= 1

    async def ModelStreamInfer(self, request_iterator, context):
        """Requests on one stream run side by side; their responses interleave, told apart by id."""
        self.streams += 1
        out: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        reading = True

        async def read():
            nonlocal reading
            try:
                async for req in request_iterator:
                    task = asyncio.ensure_future(self._one(req, out, context))
                    tasks.add(task)
                    task.add_done_callback(lambda t: (tasks.discard(t), out.put_nowait(None)))
            finally:
                reading = False
                out.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while reading or tasks or not out.empty():
                message = await out.get()
                if message is not None:
                    yield message
            reader.result()  # a failure reading the stream is raised here
        finally:
            reader.cancel()
            for task in list(tasks):  # the client left: each request ends, its slot freed
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self.streams -= 1

    async def _one(self, req, out: asyncio.Queue, context) -> None:
        """One request of a stream, answered on `out`: its responses, or one error response."""
        rid = req.id if isinstance(req, kpb.ModelInferRequest) else ""
        try:
            await self._answer(req, rid, out, context)
        except Exception as exc:  # a fault here, not the request's: it ends (counted by its run) and the stream goes on
            out.put_nowait(_error(rid, self.model, f"request {rid!r}: internal error ({type(exc).__name__})"))

    async def _answer(self, req, rid: str, out: asyncio.Queue, context) -> None:
        try:
            checked, r, queue = await self._admit(req, context, streaming=True)
        except (BadRequest, Refused) as exc:
            out.put_nowait(_error(rid, self.model, str(exc)))
            return
        run, first, n = self._run(checked, r, queue, context), True, 0
        if not checked.streaming:  # stream false on a stream: one whole response, as vLLM's backend
            await _drain(run)
            if run.error is not None:
                out.put_nowait(_error(rid, self.model, run.error))
                return
            out.put_nowait(kpb.ModelStreamInferResponse(infer_response=checked.whole(self.model, r, run)))
            return
        rest = ""
        async with contextlib.aclosing(run.events()) as events:
            async for delta in events:
                if n < run.sent.n:  # one response per token
                    n += 1
                    out.put_nowait(kpb.ModelStreamInferResponse(
                        infer_response=checked.response(self.model, r, delta, None, final=False, promise=first)))
                    first = False
                else:  # the held-back rest, after the last token: it goes in the final response
                    rest += delta
        if run.error is not None:
            out.put_nowait(_error(rid, self.model, run.error))
            return
        text = rest if rest or not checked.empty_final else None
        out.put_nowait(kpb.ModelStreamInferResponse(
            infer_response=checked.response(self.model, r, text, run, final=True, promise=True)))


async def _drain(run: TextRun) -> None:
    """Runs `run` to its end (its text and outcome are then set)."""
    async with contextlib.aclosing(run.events()) as events:
        async for _ in events:
            pass


def _error(rid: str, model: str, message: str) -> kpb.ModelStreamInferResponse:
    """A stream's answer to one request that failed: Triton's shape (the stream goes on)."""
    return kpb.ModelStreamInferResponse(error_message=message,
                                        infer_response=kpb.ModelInferResponse(model_name=model, id=rid))
