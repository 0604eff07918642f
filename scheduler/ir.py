"""The layer-cost IR: a model as an ordered list of layers with analytic work formulas.

Layers: `embed`, `block` x num_layers, `head` (final norm + LM head + sampling).
`work(layer, tp, batch, new_tokens, past_tokens)` gives what ONE device of a
tensor-parallel group of width `tp` does in one step: FLOPs, bytes it moves through
memory, and the collectives it joins. Decode is the case new_tokens == 1.

Sources:
- Parameter shapes: Hugging Face `modeling_llama.py` / `modeling_mixtral.py`.
- FLOPs: 2 per multiply-add per weight per token; attention 4 * ctx * head_dim per head per
  token (QK^T and softmax @ V; Hoffmann et al. 2022, "Chinchilla", Appendix F).
- Tensor-parallel sharding: Megatron-LM (Shoeybi et al. 2019): q/o, gate/up/down and the
  vocabulary split `tp` ways; K/V heads split while tp <= num_kv_heads, else replicated;
  one all-reduce after attention and one after the MLP.
- Attention is fused (FlashAttention, Dao et al. 2022): no [ctx x ctx] score matrix in memory.
- MoE decode with B tokens touches E * (1 - (1 - k/E)^B) distinct experts in expectation
  (uniform routing), so their weights are read once each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scheduler.model import DTYPE_BYTES, ModelSpec, activation_dtype

KINDS = ("embed", "block", "head")


@dataclass(frozen=True)
class Layer:
    index: int
    kind: str  # embed | block | head
    name: str  # "embed", "block.0", ..., "head"
    param_bytes: float  # whole layer, as published (a tied head counts 0 here)
    kv_bytes_per_token: float  # whole layer: K and V for one token
    act_bytes_per_token: float  # hidden state handed to the next layer


@dataclass(frozen=True)
class Work:
    """One device's share of one layer in one step."""

    flops: float
    bytes: float  # memory traffic: weights read + KV read/write + activations
    ops: int  # kernels / instruction groups launched
    collectives: tuple[tuple[str, float], ...] = ()  # (all_reduce | all_gather, bytes per device)


@dataclass(frozen=True)
class ModelIR:
    model: ModelSpec
    dtype: str  # weight dtype
    layers: tuple[Layer, ...]

    @property
    def act_dtype(self) -> str:
        return activation_dtype(self.dtype)

    @property
    def weight_bytes(self) -> float:
        return sum(layer.param_bytes for layer in self.layers)

    @property
    def handoff_bytes_per_token(self) -> float:
        """Activation bytes one token hands from a stage to the next (every layer hands on
        its [h] hidden state in the activation dtype)."""
        return self.layers[0].act_bytes_per_token

    @property
    def kv_bytes_per_token(self) -> float:
        return sum(layer.kv_bytes_per_token for layer in self.layers)

    def kv_heads_per_device(self, tp: int) -> int:
        return math.ceil(self.model.num_kv_heads / tp)

    def resident_bytes(self, layer: Layer, tp: int) -> float:
        """Weight bytes one device of a width-`tp` group holds for `layer`."""
        m, w = self.model, DTYPE_BYTES[self.dtype]
        if layer.kind == "embed":
            return m.vocab_size * m.hidden_size * w / tp
        if layer.kind == "head":
            # A tied head is stored again on the last stage: it usually is not the embedding's.
            return m.hidden_size * w + m.vocab_size * m.hidden_size * w / tp
        q_out = m.num_heads * m.head_dim
        kv_out = self.kv_heads_per_device(tp) * m.head_dim
        attn = m.hidden_size * 2 * q_out / tp + m.hidden_size * 2 * kv_out
        router = m.hidden_size * m.num_experts if m.is_moe else 0
        return w * (attn + m.num_experts * m.expert_params / tp + router + 2 * m.hidden_size)

    def kv_bytes_per_token_per_device(self, layer: Layer, tp: int) -> float:
        if layer.kind != "block":
            return 0.0
        m = self.model
        return 2 * self.kv_heads_per_device(tp) * m.head_dim * DTYPE_BYTES[self.act_dtype]

    def workspace_bytes(self, tp: int, step_tokens: int) -> float:
        """Activation buffers one device needs for a step of `step_tokens` tokens, reused
        across layers: hidden in/out, residual and norm output [T, h], plus the MLP's
        gate and up outputs [T, k * i / tp], plus [B, vocab / tp] logits (bounded by T)."""
        m, a = self.model, DTYPE_BYTES[self.act_dtype]
        mlp = 2 * m.experts_per_token * m.intermediate_size / tp
        return step_tokens * (4 * m.hidden_size + mlp + m.vocab_size / tp) * a

    def work(self, layer: Layer, tp: int, batch: int, new_tokens: int, past_tokens: int) -> Work:
        """One device's work for `batch` sequences, each adding `new_tokens` after `past_tokens`."""
        m, w, a = self.model, DTYPE_BYTES[self.dtype], DTYPE_BYTES[self.act_dtype]
        tokens = batch * new_tokens  # T
        hidden_bytes = tokens * m.hidden_size * a  # [T, h]
        if layer.kind == "embed":
            # A row gather; a vocab-split table needs an all-reduce of the partial rows.
            coll = (("all_reduce", hidden_bytes),) if tp > 1 else ()
            return Work(flops=0.0, bytes=2 * hidden_bytes, ops=1, collectives=coll)
        if layer.kind == "head":
            # Only each sequence's last position needs logits: [B, vocab / tp].
            vocab_dev = m.vocab_size / tp
            flops = 2 * batch * m.hidden_size * vocab_dev
            bytes_ = self.resident_bytes(layer, tp) + batch * (m.hidden_size + vocab_dev) * a
            coll = (("all_gather", batch * vocab_dev * a),) if tp > 1 else ()
            return Work(flops=flops, bytes=bytes_, ops=3, collectives=coll)
        return self._block_work(layer, tp, batch, new_tokens, past_tokens, tokens, hidden_bytes, w, a)

    def mixed_work(self, layer: Layer, tp: int, batch: int, slice_tokens: int, past_tokens: int) -> Work:
        """One device's work for a mixed step: `batch` decode rows (one token after
        `past_tokens`) and one prompt slice of `slice_tokens` ending at the same context.
        FLOPs and KV traffic add up; the layer's weights are read once (for a MoE block,
        the experts the larger part touches: an approximation), and the collectives carry
        both parts' activations."""
        d = self.work(layer, tp, batch, 1, past_tokens)
        p = self.work(layer, tp, 1, slice_tokens, past_tokens + 1 - slice_tokens)
        shared = 0.0 if layer.kind == "embed" else min(d.bytes, p.bytes, self.resident_bytes(layer, tp))
        coll = tuple((op, nd + npre) for (op, nd), (_, npre) in zip(d.collectives, p.collectives))
        return Work(flops=d.flops + p.flops, bytes=d.bytes + p.bytes - shared, ops=d.ops, collectives=coll)

    def _block_work(self, layer, tp, batch, new_tokens, past_tokens, tokens, hidden_bytes, w, a) -> Work:
        m = self.model
        q_out = m.num_heads * m.head_dim
        kv_out = self.kv_heads_per_device(tp) * m.head_dim
        attn_params = m.hidden_size * 2 * q_out / tp + m.hidden_size * 2 * kv_out
        expert_params = m.expert_params / tp
        touched = m.num_experts * (1 - (1 - m.experts_per_token / m.num_experts) ** tokens)
        router = m.hidden_size * m.num_experts if m.is_moe else 0
        weight_bytes = w * (attn_params + touched * expert_params + router + 2 * m.hidden_size)
        matmul_flops = 2 * tokens * (attn_params + m.experts_per_token * expert_params + router)
        # Attention over the cache: token j of the new ones sees past_tokens + j + 1 keys.
        keys_seen = batch * (new_tokens * past_tokens + new_tokens * (new_tokens + 1) / 2)
        heads_dev = math.ceil(m.num_heads / tp)
        attn_flops = 4 * keys_seen * heads_dev * m.head_dim
        kv_tok = self.kv_bytes_per_token_per_device(layer, tp)
        kv_bytes = batch * past_tokens * kv_tok + tokens * kv_tok  # read history, write new
        # Residual stream in/out plus the MLP intermediate written and read once.
        act_bytes = 2 * hidden_bytes + 2 * tokens * m.experts_per_token * m.intermediate_size / tp * a
        coll = (("all_reduce", hidden_bytes), ("all_reduce", hidden_bytes)) if tp > 1 else ()
        return Work(flops=matmul_flops + attn_flops, bytes=weight_bytes + kv_bytes + act_bytes,
                    ops=10 if m.is_moe else 8, collectives=coll)


def build_ir(model: ModelSpec, dtype: str) -> ModelIR:
    w = DTYPE_BYTES[dtype]
    a = DTYPE_BYTES[activation_dtype(dtype)]
    kv_per_token = 2 * model.num_kv_heads * model.head_dim * a
    hidden = model.hidden_size * a
    layers = [Layer(0, "embed", "embed", model.embed_params * w, 0.0, hidden)]
    for i in range(model.num_layers):
        layers.append(Layer(i + 1, "block", f"block.{i}", model.block_params * w, kv_per_token, hidden))
    layers.append(Layer(model.num_layers + 1, "head", "head", model.head_params * w, 0.0, hidden))
    return ModelIR(model, dtype, tuple(layers))
