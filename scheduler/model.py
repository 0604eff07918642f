"""Decoder-only transformer specs: named presets and Hugging Face `config.json` files.

A `ModelSpec` is shape only (no weights): enough to count parameters, FLOPs and bytes.
Covers the Llama family (RMSNorm, RoPE, grouped-query attention, SwiGLU MLP) and
Mixtral-style mixture-of-experts (E SwiGLU experts per block, top-k routing).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from scheduler.errors import SpecError, read_file

# Bytes per element of each weight dtype.
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}


def activation_dtype(weight_dtype: str) -> str:
    """Dtype of activations and the KV cache: int8 weights are weight-only quantized and
    compute in fp16 (as in LLM.int8 / Groq's int8 weights with fp16 activations)."""
    check_dtype(weight_dtype)
    return "fp16" if weight_dtype == "int8" else weight_dtype


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPE_BYTES:
        raise SpecError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_BYTES)}")
    return dtype


@dataclass(frozen=True)
class ModelSpec:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # per expert for MoE
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    tie_embeddings: bool = False
    num_experts: int = 1  # 1: dense MLP
    experts_per_token: int = 1  # top-k routing
    max_position: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    rope_scaling: str = ""  # a HF rope_type other than "default" (costs ignore it)
    # The rest of that rope_type's HF parameters (factor, original_max_position_embeddings,
    # ...) as sorted (key, value) pairs: what the runtime builds its RoPE tables from.
    rope_parameters: tuple = ()

    def __post_init__(self):
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                      "num_heads", "num_kv_heads", "num_experts", "experts_per_token", "max_position"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise SpecError(f"model {self.name!r}: {field} must be a positive integer, got {value!r}")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise SpecError(f"model {self.name!r}: hidden_size {self.hidden_size} is not divisible "
                                f"by num_heads {self.num_heads}; give head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim < 0:
            raise SpecError(f"model {self.name!r}: head_dim must be positive, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise SpecError(f"model {self.name!r}: num_heads {self.num_heads} is not a multiple "
                            f"of num_kv_heads {self.num_kv_heads}")
        if self.experts_per_token > self.num_experts:
            raise SpecError(f"model {self.name!r}: experts_per_token {self.experts_per_token} "
                            f"exceeds num_experts {self.num_experts}")
        # A dict, or the lists JSON makes of the pairs: stored hashable, in one order.
        pairs = self.rope_parameters.items() if isinstance(self.rope_parameters, dict) else self.rope_parameters
        object.__setattr__(self, "rope_parameters", tuple(sorted((str(k), _frozen(v)) for k, v in pairs)))
        if self.rope_parameters and not self.rope_scaling:
            raise SpecError(f"model {self.name!r}: rope_parameters {dict(self.rope_parameters)!r} without a "
                            f"rope_scaling type")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    # Parameter counts (elements). Source: the Llama and Mixtral model code in Hugging Face
    # transformers (modeling_llama.py, modeling_mixtral.py): bias-free linears, RMSNorm weights.
    @property
    def attn_params(self) -> int:
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        return self.hidden_size * (2 * q_out + 2 * kv_out)  # q, o: [h, q_out]; k, v: [h, kv_out]

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size  # gate, up: [h, i]; down: [i, h]

    @property
    def mlp_params(self) -> int:
        router = self.hidden_size * self.num_experts if self.is_moe else 0
        return self.num_experts * self.expert_params + router

    @property
    def block_params(self) -> int:
        return self.attn_params + self.mlp_params + 2 * self.hidden_size  # + two RMSNorm weights

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """Final norm + LM head; a tied head shares the embedding's weights."""
        return self.hidden_size + (0 if self.tie_embeddings else self.vocab_size * self.hidden_size)

    @property
    def num_params(self) -> int:
        return self.embed_params + self.num_layers * self.block_params + self.head_params

    @property
    def active_params_per_token(self) -> int:
        """Parameters one token multiplies through (top-k experts only), embedding lookup excluded."""
        router = self.hidden_size * self.num_experts if self.is_moe else 0
        block = self.attn_params + self.experts_per_token * self.expert_params + router
        return self.num_layers * block + self.vocab_size * self.hidden_size

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.rope_parameters:  # absent, as before the field: unscaled models keep their fingerprints
            del d["rope_parameters"]
        return d


def _frozen(value):
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


# Presets. Figures from each model's published config.json (Hugging Face hub).
PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        # Serving-size models for a 2-core CPU: `tiny` steps in well under a millisecond,
        # `small` (~110M params, ~440 MB fp32) is memory-bound like the big ones.
        ModelSpec("tiny", vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4,
                  num_heads=4, num_kv_heads=2, max_position=2048),
        ModelSpec("small", vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12,
                  num_heads=12, num_kv_heads=4, max_position=4096),
        ModelSpec("llama-2-7b", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_layers=32, num_heads=32, num_kv_heads=32, max_position=4096),
        ModelSpec("llama-2-13b", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                  num_layers=40, num_heads=40, num_kv_heads=40, max_position=4096),
        ModelSpec("llama-2-70b", vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                  num_layers=80, num_heads=64, num_kv_heads=8, max_position=4096),
        ModelSpec("llama-3-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_layers=32, num_heads=32, num_kv_heads=8, max_position=8192,
                  rope_theta=500000.0),
        ModelSpec("llama-3-70b", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                  num_layers=80, num_heads=64, num_kv_heads=8, max_position=8192,
                  rope_theta=500000.0),
        ModelSpec("mistral-7b", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                  num_layers=32, num_heads=32, num_kv_heads=8, max_position=32768),
        ModelSpec("qwen2-7b", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                  num_layers=28, num_heads=28, num_kv_heads=4, max_position=32768,
                  rope_theta=1000000.0, norm_eps=1e-6),
        ModelSpec("mixtral-8x7b", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                  num_layers=32, num_heads=32, num_kv_heads=8, num_experts=8, experts_per_token=2,
                  max_position=32768, rope_theta=1000000.0),
        # Hypothetical ~1.1T-parameter dense Llama-shaped model for the compile-scale benchmark.
        ModelSpec("dense-1t", vocab_size=128256, hidden_size=24576, intermediate_size=98304,
                  num_layers=128, num_heads=192, num_kv_heads=16, max_position=8192),
    ]
}


def from_hf_config(path: str | Path) -> ModelSpec:
    """Reads a Hugging Face `config.json` (a file, or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    cfg = read_file(path, "model config", json.loads, "readable JSON")
    if not isinstance(cfg, dict):
        raise SpecError(f"model config {str(path)!r} is not a JSON object")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in required if key not in cfg]
    if missing:
        raise SpecError(f"model config {str(path)!r} lacks {', '.join(missing)}")
    # transformers >= 5 nests RoPE settings in rope_parameters; older configs keep rope_theta
    # at the top and scaling in rope_scaling.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise SpecError(f"model config {str(path)!r}: rope_parameters must be an object, got {rope!r}")
    cfg = {**cfg, "rope_theta": rope.get("rope_theta", cfg.get("rope_theta", 10000.0))}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    rope_parameters = {} if rope_type == "default" else {
        k: v for k, v in rope.items() if k not in ("rope_type", "type", "rope_theta")}
    for key in ("rope_theta", "rms_norm_eps"):
        if key in cfg and (isinstance(cfg[key], bool) or not isinstance(cfg[key], (int, float))):
            raise SpecError(f"model config {str(path)!r}: {key} must be a number, got {cfg[key]!r}")
    heads = cfg["num_attention_heads"]
    experts = cfg.get("num_local_experts") or 1
    return ModelSpec(
        name=cfg.get("_name_or_path") or path.parent.name or cfg.get("model_type", "hf-model"),
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or 0,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        num_experts=experts,
        experts_per_token=cfg.get("num_experts_per_tok", 1) if experts > 1 else 1,
        max_position=cfg.get("max_position_embeddings", 4096),
        rope_theta=float(cfg["rope_theta"]),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_scaling="" if rope_type == "default" else str(rope_type),
        rope_parameters=rope_parameters,
    )


def get_model(name_or_path: str) -> ModelSpec:
    """A preset by name, or a Hugging Face config.json file or folder by path."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_dir():
        return from_hf_config(path)
    raise SpecError(f"unknown model {name_or_path!r}; presets: {', '.join(PRESETS)} "
                    f"(or a path to a Hugging Face config.json)")
