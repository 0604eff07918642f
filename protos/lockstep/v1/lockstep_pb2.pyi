from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("text", "token_ids", "max_tokens", "sampling", "stop", "stop_token_ids", "request_id", "model")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    max_tokens: int
    sampling: SamplingParams
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    request_id: str
    model: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token", "finished")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    token: Token
    finished: Finished
    def __init__(self, token: _Optional[_Union[Token, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("id", "text", "index", "sent_unix_s", "tick")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    TICK_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    index: int
    sent_unix_s: float
    tick: int
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., index: _Optional[int] = ..., sent_unix_s: _Optional[float] = ..., tick: _Optional[int] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("finish_reason", "prompt_tokens", "completion_tokens", "predicted_ttft_s", "measured_ttft_s", "predicted_tpot_s", "measured_tpot_s", "request_id", "queue_s", "e2e_s", "predicted_e2e_s", "text")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TTFT_S_FIELD_NUMBER: _ClassVar[int]
    MEASURED_TTFT_S_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TPOT_S_FIELD_NUMBER: _ClassVar[int]
    MEASURED_TPOT_S_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    E2E_S_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_E2E_S_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    predicted_ttft_s: float
    measured_ttft_s: float
    predicted_tpot_s: float
    measured_tpot_s: float
    request_id: str
    queue_s: float
    e2e_s: float
    predicted_e2e_s: float
    text: str
    def __init__(self, finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., predicted_ttft_s: _Optional[float] = ..., measured_ttft_s: _Optional[float] = ..., predicted_tpot_s: _Optional[float] = ..., measured_tpot_s: _Optional[float] = ..., request_id: _Optional[str] = ..., queue_s: _Optional[float] = ..., e2e_s: _Optional[float] = ..., predicted_e2e_s: _Optional[float] = ..., text: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("batch", "prompt_len", "ttft_s", "tpot_s", "tokens_per_s")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LEN_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    TPOT_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    batch: int
    prompt_len: int
    ttft_s: float
    tpot_s: float
    tokens_per_s: float
    def __init__(self, batch: _Optional[int] = ..., prompt_len: _Optional[int] = ..., ttft_s: _Optional[float] = ..., tpot_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "plan_hash", "pool", "buckets", "max_slots", "max_context", "prefill_chunk", "dtype", "time_scale", "deterministic", "guard_band_s", "predictions", "vocab_size", "executor", "max_prompt_tokens", "max_tokens_limit", "max_queue", "max_message_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    MAX_SLOTS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CHUNK_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TIME_SCALE_FIELD_NUMBER: _ClassVar[int]
    DETERMINISTIC_FIELD_NUMBER: _ClassVar[int]
    GUARD_BAND_S_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXECUTOR_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    plan_hash: str
    pool: str
    buckets: _containers.RepeatedScalarFieldContainer[int]
    max_slots: int
    max_context: int
    prefill_chunk: int
    dtype: str
    time_scale: float
    deterministic: bool
    guard_band_s: float
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    vocab_size: int
    executor: str
    max_prompt_tokens: int
    max_tokens_limit: int
    max_queue: int
    max_message_bytes: int
    def __init__(self, model: _Optional[str] = ..., plan_hash: _Optional[str] = ..., pool: _Optional[str] = ..., buckets: _Optional[_Iterable[int]] = ..., max_slots: _Optional[int] = ..., max_context: _Optional[int] = ..., prefill_chunk: _Optional[int] = ..., dtype: _Optional[str] = ..., time_scale: _Optional[float] = ..., deterministic: _Optional[bool] = ..., guard_band_s: _Optional[float] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., vocab_size: _Optional[int] = ..., executor: _Optional[str] = ..., max_prompt_tokens: _Optional[int] = ..., max_tokens_limit: _Optional[int] = ..., max_queue: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class PredictArrivalRequest(_message.Message):
    __slots__ = ("prompt_tokens", "max_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    max_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class ArrivalPrediction(_message.Message):
    __slots__ = ("admissible", "refusal", "ttft_s", "e2e_s", "outstanding")
    ADMISSIBLE_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    E2E_S_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    admissible: bool
    refusal: str
    ttft_s: float
    e2e_s: float
    outstanding: int
    def __init__(self, admissible: _Optional[bool] = ..., refusal: _Optional[str] = ..., ttft_s: _Optional[float] = ..., e2e_s: _Optional[float] = ..., outstanding: _Optional[int] = ...) -> None: ...

class ServerStatus(_message.Message):
    __slots__ = ("queue_length", "slots_in_use", "max_slots", "running", "ticks", "overruns", "accepting", "uptime_s", "max_queue", "engine_up", "pace_factor", "repaces")
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SLOTS_IN_USE_FIELD_NUMBER: _ClassVar[int]
    MAX_SLOTS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    TICKS_FIELD_NUMBER: _ClassVar[int]
    OVERRUNS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTING_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_UP_FIELD_NUMBER: _ClassVar[int]
    PACE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    REPACES_FIELD_NUMBER: _ClassVar[int]
    queue_length: int
    slots_in_use: int
    max_slots: int
    running: int
    ticks: int
    overruns: int
    accepting: bool
    uptime_s: float
    max_queue: int
    engine_up: bool
    pace_factor: float
    repaces: int
    def __init__(self, queue_length: _Optional[int] = ..., slots_in_use: _Optional[int] = ..., max_slots: _Optional[int] = ..., running: _Optional[int] = ..., ticks: _Optional[int] = ..., overruns: _Optional[int] = ..., accepting: _Optional[bool] = ..., uptime_s: _Optional[float] = ..., max_queue: _Optional[int] = ..., engine_up: _Optional[bool] = ..., pace_factor: _Optional[float] = ..., repaces: _Optional[int] = ...) -> None: ...
