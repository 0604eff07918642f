"""The layer-cost IR: layer order, bytes, FLOPs and collectives per device."""

import dataclasses

import pytest

from scheduler.ir import build_ir
from scheduler.model import DTYPE_BYTES, get_model


def decode_flops(ir, tp=1, batch=1, past=0):
    return sum(ir.work(layer, tp, batch, 1, past).flops for layer in ir.layers)


def test_layer_order_embed_blocks_head():
    model = get_model("tiny")
    ir = build_ir(model, "bf16")
    assert [layer.name for layer in ir.layers] == ["embed"] + [f"block.{i}" for i in range(4)] + ["head"]
    assert [layer.kind for layer in ir.layers] == ["embed"] + ["block"] * 4 + ["head"]
    assert [layer.index for layer in ir.layers] == list(range(6))


@pytest.mark.parametrize("name", ["tiny", "llama-2-7b", "llama-3-8b", "mixtral-8x7b"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_param_bytes_sum_to_model_size(name, dtype):
    model = get_model(name)
    assert not model.tie_embeddings
    ir = build_ir(model, dtype)
    assert ir.weight_bytes == model.num_params * DTYPE_BYTES[dtype]


@pytest.mark.parametrize("name", ["tiny", "llama-2-7b", "llama-2-70b", "mixtral-8x7b"])
def test_decode_flops_are_two_per_active_param(name):
    model = get_model(name)
    ir = build_ir(model, "bf16")
    assert decode_flops(ir) == pytest.approx(2 * model.active_params_per_token, rel=0.01)


def test_decode_flops_grow_with_context_and_batch():
    ir = build_ir(get_model("llama-2-7b"), "bf16")
    assert decode_flops(ir, past=4000) > decode_flops(ir, past=0)
    assert decode_flops(ir, batch=4) == pytest.approx(4 * decode_flops(ir, batch=1), rel=0.01)


@pytest.mark.parametrize("name, dtype", [("llama-2-70b", "bf16"), ("llama-2-70b", "int8"),
                                         ("llama-3-8b", "fp32"), ("mixtral-8x7b", "fp16")])
def test_kv_bytes_per_token(name, dtype):
    m = get_model(name)
    ir = build_ir(m, dtype)
    act = 4 if dtype == "fp32" else 2  # int8 weights keep an fp16 cache
    assert ir.kv_bytes_per_token == 2 * m.num_layers * m.num_kv_heads * m.head_dim * act


def test_llama_2_70b_kv_cache_size():
    # GQA with 8 KV heads: 320 KiB per token in fp16 (80 layers x 2 x 8 x 128 x 2 bytes).
    assert build_ir(get_model("llama-2-70b"), "fp16").kv_bytes_per_token == 327_680


def test_decode_step_writes_and_reads_kv():
    ir = build_ir(get_model("llama-2-7b"), "bf16")
    block = ir.layers[1]
    short, long = ir.work(block, 1, 1, 1, 0), ir.work(block, 1, 1, 1, 1000)
    # Reading 1000 more tokens of history costs exactly their cache bytes.
    assert long.bytes - short.bytes == pytest.approx(1000 * block.kv_bytes_per_token)


def test_moe_decode_touches_more_experts_with_larger_batch():
    m = get_model("mixtral-8x7b")
    ir = build_ir(m, "bf16")
    block = ir.layers[1]
    w = DTYPE_BYTES["bf16"]

    def weight_bytes(batch):  # strip the batch-dependent activation and KV terms
        work = ir.work(block, 1, batch, 1, 0)
        act = 2 * batch * m.hidden_size * 2 + 2 * batch * m.experts_per_token * m.intermediate_size * 2
        kv = batch * ir.kv_bytes_per_token_per_device(block, 1)
        return work.bytes - act - kv

    dense_part = w * (m.attn_params + m.hidden_size * m.num_experts + 2 * m.hidden_size)
    one = weight_bytes(1)
    eight = weight_bytes(8)
    huge = weight_bytes(10_000)
    assert one == pytest.approx(dense_part + 2 * w * m.expert_params)  # top-2 experts
    assert eight > one
    assert eight <= dense_part + 8 * w * m.expert_params
    assert huge == pytest.approx(dense_part + 8 * w * m.expert_params)  # every expert, once


def test_tensor_parallel_splits_per_device_bytes():
    m = get_model("llama-2-70b")
    ir = build_ir(m, "bf16")
    for layer in ir.layers:
        one, eight = ir.resident_bytes(layer, 1), ir.resident_bytes(layer, 8)
        assert eight < one
    for layer in ir.layers[1:]:  # the embedding is a row gather: its traffic does not shrink
        assert ir.work(layer, 8, 1, 1, 100).bytes < ir.work(layer, 1, 1, 1, 100).bytes
    block = ir.layers[1]
    assert ir.kv_bytes_per_token_per_device(block, 8) == block.kv_bytes_per_token / 8
    # Past num_kv_heads (8) the K/V heads are replicated: one head per device, not a fraction.
    assert ir.kv_bytes_per_token_per_device(block, 16) == ir.kv_bytes_per_token_per_device(block, 8)
    assert ir.workspace_bytes(8, 256) < ir.workspace_bytes(1, 256)


def test_resident_bytes_at_tp1_are_the_layer_weights():
    ir = build_ir(get_model("llama-3-8b"), "bf16")
    for layer in ir.layers:
        assert ir.resident_bytes(layer, 1) == pytest.approx(layer.param_bytes)


def test_tied_head_is_counted_once_in_params_but_stored_on_last_stage():
    tied = dataclasses.replace(get_model("tiny"), tie_embeddings=True)
    ir = build_ir(tied, "bf16")
    head = ir.layers[-1]
    assert head.param_bytes == tied.hidden_size * 2
    assert ir.weight_bytes == tied.num_params * 2
    assert ir.resident_bytes(head, 1) == (tied.hidden_size + tied.vocab_size * tied.hidden_size) * 2


def test_collectives_only_with_tensor_parallelism():
    ir = build_ir(get_model("tiny"), "bf16")
    for layer in ir.layers:
        assert ir.work(layer, 1, 4, 1, 10).collectives == ()
    by_kind = {layer.kind: ir.work(layer, 2, 4, 1, 10).collectives for layer in ir.layers}
    hidden_bytes = 4 * 128 * 2
    assert by_kind["embed"] == (("all_reduce", hidden_bytes),)
    assert by_kind["block"] == (("all_reduce", hidden_bytes), ("all_reduce", hidden_bytes))
    assert by_kind["head"] == (("all_gather", 4 * 512 / 2 * 2),)


def test_prefill_costs_more_than_decode():
    ir = build_ir(get_model("tiny"), "fp32")
    block = ir.layers[1]
    prefill, decode = ir.work(block, 1, 1, 128, 0), ir.work(block, 1, 1, 1, 127)
    assert prefill.flops > 100 * decode.flops
