"""The torch decoder against Hugging Face `transformers`, and its static KV cache."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import scheduler
from server.runtime.executor import LocalExecutor
from server.runtime.model import StageModel
from tests.server.helpers import Seq, generate, hf_plan, random_prompt, run_step


@pytest.mark.parametrize("name", ["llama", "llama-tied", "mixtral"])
def test_logits_and_greedy_tokens_match_transformers(hf_checkpoint, name):
    model, folder = hf_checkpoint(name)
    executor = LocalExecutor(hf_plan(folder))
    prompt = random_prompt(40, seed=1)  # two prefill chunks of 32
    seq = generate(executor, 0, prompt, 20)

    with torch.no_grad():  # logits of the last prompt token and of every decode step
        ref = model(torch.tensor([prompt + seq.out[:-1]])).logits[0, len(prompt) - 1:]
        expected = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  do_sample=False, max_new_tokens=20, eos_token_id=None)
    torch.testing.assert_close(torch.stack(seq.logits), ref, atol=1e-4, rtol=0)
    assert seq.out == expected[0, len(prompt):].tolist()


def test_tied_checkpoint_has_no_head_tensor(hf_checkpoint):
    _, folder = hf_checkpoint("llama-tied")  # so the test above really reads the head from the embedding
    assert scheduler.from_hf_config(folder).tie_embeddings
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()


def test_spec_reads_transformers5_rope_theta(tmp_path):
    config = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert scheduler.from_hf_config(tmp_path).rope_theta == 1e6


def test_kv_cache_is_preallocated_and_never_moves(tiny_plan):
    executor = LocalExecutor(tiny_plan)
    stage, spec = executor.runners[0].model, tiny_plan.spec
    # One key past max_context: a compiled step's key-bucket slice is never the whole axis (model.py).
    shape = (spec.num_layers, tiny_plan.slots + 1, spec.num_kv_heads, tiny_plan.max_context + 1, spec.head_dim)
    assert stage.cache_k.shape == stage.cache_v.shape == shape
    before = (stage.cache_k.data_ptr(), stage.cache_v.data_ptr())

    seqs = [Seq(slot, random_prompt(10, seed=slot)) for slot in (1, 2, 5)]
    run_step(executor, seqs, 4, 32)
    for bucket in (4, 8, 4):
        run_step(executor, seqs, bucket, 1)

    assert stage.cache_k.shape == stage.cache_v.shape == shape
    assert (stage.cache_k.data_ptr(), stage.cache_v.data_ptr()) == before
    # Only the sequences' own slots (and the scratch slot, for padding) were written.
    written = stage.cache_k.abs().sum(dim=(0, 2, 3, 4)) > 0  # [slots + 1]
    assert written.nonzero().flatten().tolist() == [1, 2, 5, tiny_plan.slots]
    assert stage.cache_k[:, 1, :, 13:].abs().sum() == 0  # slot 1 holds positions 0..12 only


def test_each_stage_caches_only_its_own_blocks():
    spec = scheduler.ModelSpec("t", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                               num_heads=4, num_kv_heads=2)
    blocks = [StageModel(spec, a, b, slots=2, max_context=16, dtype=torch.float32).cache_k.shape[0]
              for a, b in ((0, 2), (2, 4), (4, 5))]  # embed + block 0 | blocks 1, 2 | head
    assert blocks == [1, 2, 0]


@pytest.mark.parametrize("start, end", [(-1, 2), (2, 2), (0, 7)])
def test_stage_rejects_layers_outside_the_model(start, end):
    spec = scheduler.get_model("tiny")  # layers 0..5: embed, 4 blocks, head
    with pytest.raises(ValueError, match="outside"):
        StageModel(spec, start, end, slots=1, max_context=8, dtype=torch.float32)


def test_prepacked_linears_match_plain_ones():
    """The oneDNN-prepacked path (the runtime's CPU default: q, k, v packed as one
    weight, gate and up as another) computes the same layer."""
    spec = scheduler.get_model("tiny")
    from server.runtime.weights import init_random

    plain = StageModel(spec, 0, spec.num_layers + 2, slots=2, max_context=64, dtype=torch.float32)
    packed = StageModel(spec, 0, spec.num_layers + 2, slots=2, max_context=64, dtype=torch.float32)
    init_random(plain, seed=3)
    init_random(packed, seed=3)
    if not packed.pack_linears():
        pytest.skip("this torch build has no oneDNN weight packing")
    tokens = torch.tensor([5, 9, 11, 2] * 4)  # two rows of 4 tokens, then 8 padding tokens
    positions = torch.arange(4).repeat(4)
    slots = torch.tensor([0] * 4 + [1] * 4 + [2] * 8)
    args = (tokens, positions, slots, ((0, 64, 0, 4), (1, 64, 4, 4)), torch.tensor([3, 7, 15, 15]))
    torch.testing.assert_close(packed(*args), plain(*args), atol=1e-5, rtol=1e-5)
    assert packed.lm_head.weight.numel() == 0  # the packed copy replaced the weight
    block = packed.model.layers["0"]
    assert block.self_attn.qkv is not None and block.mlp.gate_up is not None
    assert block.self_attn.q_proj.packed is None and block.self_attn.q_proj.weight.numel() == 0  # fused, not packed twice
