"""The torch decoder, built from a scheduler `ModelSpec`, split into pipeline stages.

Llama family (RMSNorm, RoPE, grouped-query attention, SwiGLU) and Mixtral-style MoE.
Module and parameter names match Hugging Face `transformers` (LlamaForCausalLM,
MixtralForCausalLM), so a `save_pretrained` folder loads without renaming.

A `StageModel` holds layers [start, end) of the scheduler's layer list (0 = embed,
1..n = blocks, n + 1 = final norm + LM head) and the static KV cache of its blocks.
Its forward takes token ids (if it holds the embedding) or hidden states, and returns
hidden states or, if it holds the head, the logits of each row's last real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scheduler.model import ModelSpec

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# CPU sgemm (oneDNN / MKL) gives row-wise bitwise-identical results only when the row
# count is a multiple of 4 (measured: rows of M=1, 2, 3, 5 differ from the same rows in
# M=8; M=4, 8, 12, 16 agree). Every matmul here therefore sees a multiple of 4 rows,
# which is what makes a sequence's tokens independent of its batch (see executor.py).
ROW_MULTIPLE = 4
# bf16 / fp16 (oneDNN's AMX / AVX-512 kernels) switch kernels above 32 rows: a row's result
# in M = 36 or 64 differs from the same row in M <= 32, while blocks of 1..32 rows all
# agree bitwise (measured on this host's Sapphire Rapids, torch 2.13; the wide-bf16 case of
# tests/server/test_executor.py fails without this). Half-precision linears therefore run
# in blocks of at most HALF_ROW_BLOCK rows: a 64-token bf16 prefill costs ~25% more (two
# passes over the weights), still ~1.7x faster than fp32 here (BENCHMARKS.md).
HALF_ROW_BLOCK = 32


def pad_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x: [M, ...] -> [ceil(M / 4) * 4, ...] (zero rows appended), and M."""
    m = x.shape[0]
    extra = -m % ROW_MULTIPLE
    return (F.pad(x, (0, 0) * (x.dim() - 1) + (0, extra)) if extra else x), m


def _onednn_packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class Linear(nn.Linear):
    """nn.Linear that, on CPU, can run from a weight prepacked for oneDNN's matmul.

    Measured on the 2-core dev machine, a [2048 x 768] fp32 weight streamed for 4 or 8
    rows: F.linear (MKL sgemm) ~7-10 GB/s, prepacked oneDNN ~25-28 GB/s, against ~28-32
    GB/s of plain memory reads; decode is weight streaming, so this is the decode speed.
    Prepacked results are also row-consistent for any row count >= 2 and any thread count
    (checked bitwise), which batch invariance needs."""

    packed: torch.Tensor | None = None

    def pack(self) -> None:
        self.packed = pack_fused(self)  # the packed copy replaces the weight

    def forward(self, x):
        if self.packed is None:
            return F.linear(x, self.weight)
        return packed_matmul(x, self.packed)


def packed_matmul(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x: [M, in] @ a oneDNN-prepacked [out, in] weight -> [M, out]; half precision in
    blocks of at most HALF_ROW_BLOCK rows (see there)."""
    if x.dtype != torch.float32 and x.shape[0] > HALF_ROW_BLOCK:
        return torch.cat([_packed(part, packed) for part in x.split(HALF_ROW_BLOCK)])
    return _packed(x, packed)


def _packed(x, packed):
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def pack_fused(*linears: Linear) -> torch.Tensor:
    """One oneDNN-prepacked weight of these linears' weights stacked on the output axis
    (their outputs side by side, in order; one linear: its own); their own weights are
    dropped. Linears that read the same input then cost one call, not several (vLLM's
    QKVParallelLinear and MergedColumnParallelLinear): `bench/decode.py --only fused` on
    smollm2-135m fp32, 2 cores: decode 34.2 -> 31.9 ms at batch 1, 43.7 -> 40.5 at batch 8, a 32-token prefill
    66.6 -> 64.5 (a 64-token one the same). Each output column is still its own dot
    product over the input, so a row's result does not depend on the others."""
    # Private but stable op pair that torch.compile's CPU backend (inductor) uses for frozen
    # linears; the hint is the expected row count.
    weight = torch.cat([m.weight.detach() for m in linears]) if len(linears) > 1 else linears[0].weight.detach()
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 8)
    for m in linears:
        m.weight.data = torch.empty(0, dtype=m.weight.dtype)
    return packed


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # computed in fp32 as in transformers' LlamaRMSNorm
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# RoPE scalings whose frequencies are fixed, from transformers' ROPE_INIT_FUNCTIONS; "yarn"
# also scales cos and sin by its attention factor, as transformers' rotary embedding does.
ROPE_SCALINGS = ("linear", "llama3", "yarn")
# Those that change with the sequence's length: tables fixed per model cannot follow them.
_LENGTH_DEPENDENT = {"dynamic": "dynamic NTK scaling recomputes its frequencies from the longest sequence "
                                "in the batch once it passes max_position_embeddings",
                     "longrope": "LongRoPE switches between short and long factors at "
                                 "original_max_position_embeddings"}


def rope_frequencies(spec: ModelSpec) -> tuple[torch.Tensor, float]:
    """The inverse frequencies [D/2] fp32 and the factor cos and sin are scaled by.
    ValueError naming a rope_type the runtime does not serve."""
    d = spec.head_dim
    if not spec.rope_scaling:
        return 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)), 1.0
    if spec.rope_scaling not in ROPE_SCALINGS:
        why = _LENGTH_DEPENDENT.get(spec.rope_scaling, "the runtime does not implement it")
        raise ValueError(f"{spec.name} uses {spec.rope_scaling!r} RoPE scaling, which the runtime does not serve "
                         f"({why}); served: {', '.join(ROPE_SCALINGS)}")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {**dict(spec.rope_parameters), "rope_type": spec.rope_scaling, "rope_theta": spec.rope_theta}
    try:  # transformers checks the parameters as it builds the config
        config = LlamaConfig(hidden_size=spec.hidden_size, num_attention_heads=spec.num_heads, head_dim=spec.head_dim,
                             num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_position,
                             rope_parameters=rope)
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[spec.rope_scaling](config, "cpu")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{spec.name}: {spec.rope_scaling!r} RoPE parameters {dict(spec.rope_parameters)!r} "
                         f"are incomplete or invalid ({type(exc).__name__}: {exc})") from None
    if inv_freq.shape != (d // 2,):
        raise ValueError(f"{spec.name}: {spec.rope_scaling!r} RoPE gives {tuple(inv_freq.shape)} frequencies, not "
                         f"{d // 2} (a partial rotary factor is not served)")
    return inv_freq.float(), float(attention_factor)


def rope_tables(inv_freq: torch.Tensor, scale: float, positions: torch.Tensor,
                dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """inv_freq: [D/2] fp32; positions: [N] int64 -> cos, sin: [N, 1, D] (the
    non-interleaved "rotate half" form), each times `scale`."""
    freqs = positions[..., None].float() * inv_freq  # [N, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x, cos, sin):
    """x: [N, heads, D]; cos, sin: [N, 1, D] (rope_tables)."""
    return x * cos + _rotate_half(x) * sin


def _attend_row(q, keys, values, positions):
    """One sequence: q: [H, T, D]; keys, values: [Hkv, L, D] (views into its KV slot);
    positions: [T]. Returns [H, T, D].

    Rows are attended one at a time, as plain matmuls over views of the cache, because
    - a sequence's result must not depend on its batch: torch's CPU flash kernel gives
      rows run by its second thread misaligned scratch buffers and different last bits
      (measured: rows 2-3 of 4 and 4-7 of 8 differ at T = 1), and depends on the thread
      count, so a Ray actor at 1 thread and the driver at 2 would disagree;
    - gathering [B, Hkv, L, D] keys into a batch copy cost ~100 us per layer at small's
      shape and, at L = 2048, batch 8, allocated 16 MB per layer per step (steps then ran
      2.5x slower than calibrated: allocator page faults). A view copies nothing."""
    h, t, d = q.shape
    hkv, length, _ = keys.shape
    group = h // hkv  # query heads per kv head, consecutive (as transformers' repeat_kv)
    scores = torch.matmul(q.reshape(hkv, group * t, d), keys.transpose(-1, -2)) * d ** -0.5  # [Hkv, G*T, L]
    visible = torch.arange(length, device=q.device)[None, :] <= positions[:, None]  # [T, L]
    scores = scores.view(hkv, group, t, length).masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs.view(hkv, group * t, length), values).view(h, t, d)


# Prepacked linears that read the same input run as one (q, k, v; gate, up): `pack_fused`.
# Off: one call each (the A/B of bench/decode.py).
FUSED_LINEARS = True

# One-token rows (decode, and the decode rows of mixed steps) attend in one call per key
# bucket and layer (`_attend_decode`); off, one call per row as prompt slices do (the
# same bits: tests/server/runtime/test_executor.py). `bench/decode.py --only attention`
# on smollm2-135m fp32, 2 cores: batch 8 decode 56.7 -> 43.9 ms at 128 keys, 82.1 -> 60.8
# ms at 1024; batch 4 -13..19%; batch 1 the same.
BATCHED_DECODE = True


# A step's prompt slices (rows of 2+ tokens) attend in one call per layer (`_attend_prompts`):
# each padded to the step's longest slice and its widest key bucket, masked. The same bits
# as one call per slice (padded queries and masked keys change no real row's result:
# tests/server/runtime/test_executor.py, fp32 and bf16). smollm2-135m, 2 threads, a 64-token
# prefill of 4 packed prompts: bf16 94.8 -> 80.8 ms, fp32 159.1 -> 144.9 (`bench/decode.py --only
# prompts`, BENCHMARKS.md).
# Off: one call per slice, as a lone slice always runs.
BATCHED_PROMPTS = True


@dataclass(frozen=True)
class PromptGroup:
    """The prompt slices of a step, laid out once per step for every layer."""

    lo: int  # the slices' slots span [lo, hi)
    hi: int
    t: int  # query rows per slot: the longest slice
    keys: int  # the widest key bucket
    tokens: torch.Tensor  # [M] the slices' token indices in the step
    where: torch.Tensor  # [M] each one's place in the [hi - lo, t] padded layout
    hidden: torch.Tensor  # [hi - lo, 1, 1, t, keys] bool: the keys each query may not see


@dataclass(frozen=True)
class DecodeGroup:
    """One-token rows that attend the same number of keys, laid out once per step for every
    layer (`attention_layout`)."""

    rows: slice | torch.Tensor  # their token indices in the step: a slice when consecutive
    lo: int  # the rows' slots span [lo, hi)
    hi: int
    keys: int
    index: torch.Tensor | None  # each row's place in [lo, hi) when the slots are not lo, lo + 1, ...
    hidden: torch.Tensor  # [hi - lo, 1, 1, keys] bool: the keys past each slot's position


def attention_layout(attend, positions) -> tuple[tuple[tuple[int, int, slice], ...], PromptGroup | None,
                                                  tuple[DecodeGroup, ...]]:
    """How a step's rows attend, the same in every layer, so computed once per step: (the
    rows attended one at a time: (slot, keys, token slice); the prompt slices attended in
    one call, `PromptGroup`, when there are several (they are then not among the former);
    the one-token rows grouped by key bucket, with their masks: `DecodeGroup`). attend:
    (slot, keys, first token, tokens) per real row; positions: [N] of the step's tokens."""
    singles, decoding = [], {}
    for slot, keys, at, t in attend:
        if t == 1 and BATCHED_DECODE:
            decoding.setdefault(keys, []).append((slot, at))
        else:
            singles.append((slot, keys, slice(at, at + t)))
    groups = []
    for keys, group in decoding.items():
        slots, at = [g[0] for g in group], [g[1] for g in group]
        # Rows one after another on the token axis (a decode step's are): slices, not an index.
        rows = slice(at[0], at[-1] + 1) if at == list(range(at[0], at[-1] + 1)) else torch.tensor(at, device=positions.device)
        lo, hi = min(slots), max(slots) + 1
        pos, index = positions[rows], None
        if slots != list(range(lo, hi)):  # the usual case (lowest free slot first) needs no scatter or gather
            index = torch.tensor([s - lo for s in slots], device=positions.device)
            pos = pos.new_zeros(hi - lo).index_copy_(0, index, pos)
        visible = torch.arange(keys, device=positions.device)[None, :] <= pos[:, None]  # [B', L]
        groups.append(DecodeGroup(rows, lo, hi, keys, index, ~visible[:, None, None, :]))
    if BATCHED_PROMPTS and len(singles) > 1:  # one slice: its own call (no scatter, no gather)
        return (), _prompt_group(singles, positions), tuple(groups)
    return tuple(singles), None, tuple(groups)


def _prompt_group(singles, positions) -> PromptGroup:
    lo, hi = min(s for s, _, _ in singles), max(s for s, _, _ in singles) + 1
    t = max(r.stop - r.start for _, _, r in singles)
    keys = max(k for _, k, _ in singles)
    dev = positions.device
    tokens = torch.cat([torch.arange(r.start, r.stop, device=dev) for _, _, r in singles])
    where = torch.cat([(s - lo) * t + torch.arange(r.stop - r.start, device=dev) for s, _, r in singles])
    # Padding queries (and slots in [lo, hi) with no slice) see key 0 only: finite, dropped.
    pos = torch.zeros((hi - lo) * t, dtype=positions.dtype, device=dev).index_copy_(0, where, positions[tokens])
    visible = torch.arange(keys, device=dev)[None, :] <= pos[:, None]  # [(hi - lo) * t, L]
    return PromptGroup(lo, hi, t, keys, tokens, where, ~visible.view(hi - lo, 1, 1, t, keys))


def _attend_prompts(q, cache_k, cache_v, g: PromptGroup):
    """Every prompt slice of a step in one call per layer: q: [N, H, D] (the step's tokens);
    cache_k/v: [S, Hkv, C, D]. Returns [M, H, D] for g.tokens. Per slot and kv head one
    matmul of its (query head group x padded slice) rows against its keys, as `_attend_row`
    does for one slice."""
    h, d = q.shape[1], q.shape[2]
    n, hkv = g.hi - g.lo, cache_k.shape[1]
    group = h // hkv
    qp = q.new_zeros(n * g.t, h, d).index_copy_(0, g.where, q[g.tokens])  # [n*T, H, D]
    qp = qp.view(n, g.t, h, d).transpose(1, 2).reshape(n, hkv, group * g.t, d)  # as _attend_row's per slot
    k, v = cache_k[g.lo:g.hi, :, :g.keys], cache_v[g.lo:g.hi, :, :g.keys]  # [n, Hkv, L, D] views
    scores = torch.matmul(qp, k.transpose(-1, -2)) * d ** -0.5  # [n, Hkv, G*T, L]
    scores = scores.view(n, hkv, group, g.t, g.keys).masked_fill(g.hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs.view(n, hkv, group * g.t, g.keys), v).view(n, h, g.t, d)
    return out.transpose(1, 2).reshape(n * g.t, h, d).index_select(0, g.where)


def _attend_decode(q, cache_k, cache_v, g: DecodeGroup):
    """One-token rows that attend the same number of keys, in one call per layer: q: [B, H, D];
    cache_k/v: [S, Hkv, C, D]. Returns [B, H, D].
    The keys are a view of the slots' range (no copy: a gathered copy made a batch-8 step
    at 1024 keys 2.6x slower); slots in the range but not the group's are computed and
    dropped. Each (slot, kv head) is its own matmul, so a row's result does not depend on
    the others; a row alone runs this same code."""
    b, h, d = q.shape
    hkv, n = cache_k.shape[1], g.hi - g.lo
    if g.index is not None:
        q = q.new_zeros(n, h, d).index_copy_(0, g.index, q)  # [B', H, D]
    k, v = cache_k[g.lo:g.hi, :, :g.keys], cache_v[g.lo:g.hi, :, :g.keys]  # [B', Hkv, L, D] views
    q = q.view(n, hkv, h // hkv, d)
    if q.dtype == torch.float32:
        scores = torch.matmul(q, k.transpose(-1, -2))  # [B', Hkv, G, L]
    else:
        # oneDNN's half-precision batched matmul copies a transposed operand first: the keys
        # ([B', Hkv, L, D] per layer) in q @ k^T, only q in (k @ q^T)^T. bf16, smollm2-135m,
        # 2 threads: decode at batch 8 33.4 -> 31.6 ms at 128 keys, 45.4 -> 37.3 at 512
        # (fp32's sgemm reads a transposed operand in place: no gain there).
        scores = torch.matmul(k, q.transpose(-1, -2)).transpose(-1, -2)
    scores = scores * d ** -0.5
    scores = scores.masked_fill(g.hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v).view(n, h, d)
    return out if g.index is None else out.index_select(0, g.index)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        h, d = spec.hidden_size, spec.head_dim
        self.q_proj = Linear(h, spec.num_heads * d, bias=False)
        self.k_proj = Linear(h, spec.num_kv_heads * d, bias=False)
        self.v_proj = Linear(h, spec.num_kv_heads * d, bias=False)
        self.o_proj = Linear(spec.num_heads * d, h, bias=False)
        self.qkv: torch.Tensor | None = None  # q, k, v prepacked as one (pack_linears)

    def pack(self) -> None:
        if FUSED_LINEARS:
            self.qkv = pack_fused(self.q_proj, self.k_proj, self.v_proj)

    def project(self, x):
        """x: [N, h] -> q [N, H*D], k, v [N, Hkv*D]."""
        if self.qkv is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        s = self.spec
        return packed_matmul(x, self.qkv).split((s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim,
                                                s.num_kv_heads * s.head_dim), dim=-1)

    def forward(self, x, cos, sin, cache_k, cache_v, write_slots, write_pos, layout):
        """x: [N, h] (rows' tokens packed); cache_k/v: [S, Hkv, C, D] for this layer;
        write_slots/write_pos: [N]; layout: the step's `attention_layout` of its real rows;
        tokens after the last row are padding and get zeros."""
        s = self.spec
        n = x.shape[0]
        q, k, v = self.project(x)
        q = q.view(n, s.num_heads, s.head_dim)  # [N, H, D]
        k = k.view(n, s.num_kv_heads, s.head_dim)  # [N, Hkv, D]
        v = v.view(n, s.num_kv_heads, s.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Write the new keys/values at (slot, position) per token: [N, Hkv, D].
        cache_k[write_slots, :, write_pos] = k.to(cache_k.dtype)
        cache_v[write_slots, :, write_pos] = v.to(cache_v.dtype)
        out = torch.zeros_like(q)
        singles, prompts, groups = layout
        if prompts is not None:
            out[prompts.tokens] = _attend_prompts(q, cache_k, cache_v, prompts)
        for slot, keys, rows in singles:
            out[rows] = _attend_row(q[rows].transpose(0, 1), cache_k[slot, :, :keys], cache_v[slot, :, :keys],
                                    write_pos[rows]).transpose(0, 1)
        for g in groups:
            out[g.rows] = _attend_decode(q[g.rows], cache_k, cache_v, g)
        return self.o_proj(out.view(n, s.num_heads * s.head_dim))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)
        self.gate_up: torch.Tensor | None = None  # gate and up prepacked as one (pack_linears)

    def pack(self) -> None:
        if FUSED_LINEARS:
            self.gate_up = pack_fused(self.gate_proj, self.up_proj)

    def forward(self, x):  # x: [M, h]
        if self.gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = packed_matmul(x, self.gate_up).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Expert(nn.Module):  # Mixtral's names: w1 = gate, w3 = up, w2 = down
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w1 = Linear(hidden, intermediate, bias=False)
        self.w2 = Linear(intermediate, hidden, bias=False)
        self.w3 = Linear(hidden, intermediate, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    """Top-k routing with renormalized softmax weights (Mixtral)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.top_k = spec.experts_per_token
        self.gate = Linear(spec.hidden_size, spec.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(spec.hidden_size, spec.intermediate_size) for _ in range(spec.num_experts))

    def forward(self, x):  # x: [M, h]
        weights = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, chosen = torch.topk(weights, self.top_k, dim=-1)  # [M, k]
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, which = torch.nonzero(chosen == e, as_tuple=True)
            if rows.numel() == 0:
                continue
            picked, m = pad_rows(x[rows])  # row count padded: a token's result must not depend on the others
            out.index_add_(0, rows, expert(picked)[:m] * weights[rows, which, None])
        return out


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.norm_eps)
        if spec.is_moe:
            self.block_sparse_moe = SparseMoE(spec)
        else:
            self.mlp = MLP(spec.hidden_size, spec.intermediate_size)

    def forward(self, x, rope, cache_k, cache_v, write, layout):  # x: [N, h]
        x = x + self.self_attn(self.input_layernorm(x), *rope, cache_k, cache_v, *write, layout)
        normed = self.post_attention_layernorm(x)
        return x + (self.block_sparse_moe(normed) if hasattr(self, "block_sparse_moe") else self.mlp(normed))


class _Inner(nn.Module):  # the `model.` prefix of transformers' names
    pass


class StageModel(nn.Module):
    """Layers [start, end) of the scheduler's layer list, with the KV cache of its blocks.

    The cache holds `slots + 1` rows: the last is scratch for padding rows and tokens."""

    def __init__(self, spec: ModelSpec, start: int, end: int, slots: int, max_context: int, dtype: torch.dtype):
        super().__init__()
        n = spec.num_layers
        if not 0 <= start < end <= n + 2:
            raise ValueError(f"stage layers [{start}, {end}) outside 0..{n + 2}")
        self.spec, self.start, self.end = spec, start, end
        self.block_ids = list(range(max(start, 1) - 1, min(end, n + 1) - 1))  # decoder block indices
        self.model = _Inner()
        if start == 0:
            self.model.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.model.layers = nn.ModuleDict({str(i): Block(spec) for i in self.block_ids})
        self.has_head = end == n + 2
        if self.has_head:
            self.model.norm = RMSNorm(spec.hidden_size, spec.norm_eps)
            self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.to(dtype)
        self.scratch_slot = slots
        # One key past max_context: compiled steps slice [0, key bucket) of this axis, and a
        # slice that is never the whole axis keeps that dimension dynamic (compiled.py).
        shape = (len(self.block_ids), slots + 1, spec.num_kv_heads, max_context + 1, spec.head_dim)
        self.register_buffer("cache_k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape, dtype=dtype), persistent=False)
        inv_freq, self.rope_scale = rope_frequencies(spec)
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)  # fp32, whatever the dtype

    def pack_linears(self) -> bool:
        """Prepacks every linear weight for oneDNN (CPU only, after the weights are loaded).
        Returns whether it did."""
        if self.cache_k.device.type != "cpu" or not _onednn_packing_available():
            return False
        for module in self.modules():
            if isinstance(module, (Attention, MLP)):
                module.pack()  # the linears that share an input, as one
        for module in self.modules():
            if isinstance(module, Linear) and module.weight.numel():
                module.pack()
        return True

    def drop_weights(self) -> None:
        """Frees every parameter (a compiled step holds its own copy); the KV cache stays."""
        for param in self.parameters():
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)

    @property
    def has_embed(self) -> bool:
        return self.start == 0

    @torch.inference_mode()
    def forward(self, x, positions, write_slots, attend, last_index):
        """x: token ids [N] or hidden [N, h], rows' tokens packed; positions, write_slots:
        [N] int64; attend: (slot, keys attended, first token, tokens) per real row;
        last_index: [R], each row's last token. Returns hidden [N, h] or logits [R, V] fp32."""
        if self.has_embed:
            x = self.model.embed_tokens(x)
        if self.block_ids:
            rope = rope_tables(self.rope_inv_freq, self.rope_scale, positions, x.dtype)
            layout = attention_layout(attend, positions)  # the same in every layer: once per step
            for li, i in enumerate(self.block_ids):
                x = self.model.layers[str(i)](x, rope, self.cache_k[li], self.cache_v[li],
                                              (write_slots, positions), layout)
        if not self.has_head:
            return x
        return self.lm_head(self.model.norm(x[last_index])).float()  # [R, V]
