"""RoPE scaling (Llama-3.1 / 3.2's "llama3", "linear", "yarn") against transformers, at
positions far enough in for the scaling to matter; the length-dependent kinds and GGUF
files whose scaling transformers drops are refused by name."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import scheduler
from scheduler.errors import SpecError
from server.runtime import gguf
from server.runtime.executor import LocalExecutor
from server.runtime.stage import plan_from_program
from tests.server.helpers import HF_SHAPE, OPTIONS, generate, random_prompt

transformers = pytest.importorskip("transformers")

# A Llama-3.2-style checkpoint, small: tied embeddings, rope_theta 500000, llama3 scaling.
LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
SCALINGS = {
    "llama3": LLAMA3,
    "linear": {"rope_type": "linear", "factor": 4.0},
    # attention_factor inferred: 0.1 ln(8) + 1; cos and sin are scaled by it.
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128},
}
OPTIONS_LONG = dataclasses.replace(OPTIONS, max_context=1024, prefill_chunk=128)
PROMPT, NEW = 700, 6  # the prompt's last tokens sit at positions ~700: scaled and unscaled RoPE differ there


def save_llama(folder, rope: dict, old_style: bool = False):
    """A random-init transformers Llama with `rope` (in transformers 5's rope_parameters, or
    as a 4.x config.json's rope_scaling beside a top-level rope_theta), saved and returned."""
    torch.manual_seed(0)
    shape = {**HF_SHAPE, "max_position_embeddings": 131072}
    config = transformers.LlamaConfig(**shape, num_hidden_layers=2, tie_word_embeddings=True,
                                      rope_parameters={**rope, "rope_theta": 500000.0})
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    if old_style:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.pop("rope_parameters")
        (folder / "config.json").write_text(json.dumps({**cfg, "rope_theta": 500000.0, "rope_scaling": rope}))
    return model


def served(folder) -> LocalExecutor:
    program = scheduler.compile(scheduler.from_hf_config(folder), scheduler.parse_pool("cpu:1"), OPTIONS_LONG)
    return LocalExecutor(plan_from_program(program.view(), checkpoint=str(folder)))


def unscaled(model):
    """The same weights with plain RoPE: what serving the checkpoint without its scaling gives."""
    config = model.config.to_dict() | {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    plain.load_state_dict(model.state_dict())
    return plain


@pytest.mark.parametrize("kind", SCALINGS)
def test_scaled_rope_logits_match_transformers_far_into_the_sequence(tmp_path, kind):
    model = save_llama(tmp_path, SCALINGS[kind])
    spec = scheduler.from_hf_config(tmp_path)
    assert spec.rope_scaling == kind and spec.tie_embeddings and spec.rope_theta == 500000.0
    prompt = random_prompt(PROMPT, seed=2)
    seq = generate(served(tmp_path), 0, prompt, NEW, chunk=OPTIONS_LONG.prefill_chunk)
    with torch.no_grad():  # logits of the last prompt token and of every decode step
        ids = torch.tensor([prompt + seq.out[:-1]])
        ref = model(ids).logits[0, PROMPT - 1:]
        plain = unscaled(model)(ids).logits[0, PROMPT - 1:]
    torch.testing.assert_close(torch.stack(seq.logits), ref, atol=1e-4, rtol=0)
    assert (plain - ref).abs().max() > 1e-2  # the scaling matters here: far beyond the tolerance


def test_a_4x_config_reads_the_same_scaling(tmp_path):
    save_llama(tmp_path / "new", LLAMA3)
    save_llama(tmp_path / "old", LLAMA3, old_style=True)
    new, old = (scheduler.from_hf_config(tmp_path / name) for name in ("new", "old"))
    assert "rope_parameters" not in json.loads((tmp_path / "old" / "config.json").read_text())
    assert (old.rope_scaling, old.rope_theta, old.rope_parameters) == (new.rope_scaling, new.rope_theta,
                                                                         new.rope_parameters)
    assert dict(new.rope_parameters) == {k: v for k, v in LLAMA3.items() if k != "rope_type"}


def test_the_scaling_travels_in_the_program_and_unscaled_specs_are_unchanged(tmp_path):
    save_llama(tmp_path, LLAMA3)
    program = scheduler.compile(scheduler.from_hf_config(tmp_path), scheduler.parse_pool("cpu:1"), OPTIONS)
    again = scheduler.Program.from_json(program.to_json()).view().model
    assert again == program.view().model and dict(again.rope_parameters)["factor"] == 32.0
    # A model without scaling serializes as before the field existed: same fingerprint, same plan hash.
    assert "rope_parameters" not in scheduler.get_model("tiny").to_dict()


def spec_with(rope_type: str, **params) -> scheduler.ModelSpec:
    return scheduler.ModelSpec("scaled", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                               num_heads=4, num_kv_heads=2, max_position=4096, rope_scaling=rope_type,
                               rope_parameters=params)


@pytest.mark.parametrize("rope_type, params, why", [
    ("dynamic", {"factor": 2.0}, "dynamic NTK scaling recomputes its frequencies"),
    ("longrope", {"short_factor": [1.0] * 4, "long_factor": [2.0] * 4, "original_max_position_embeddings": 1024},
     "LongRoPE switches"),
    ("su", {}, "does not implement it"),
])
def test_length_dependent_and_unknown_scalings_are_refused_by_name(rope_type, params, why):
    program = scheduler.compile(spec_with(rope_type, **params), scheduler.parse_pool("cpu:1"), OPTIONS)
    with pytest.raises(ValueError, match=f"uses '{rope_type}' RoPE scaling, which the runtime does not serve") as exc:
        plan_from_program(program.view())
    assert why in str(exc.value) and "served: linear, llama3, yarn" in str(exc.value)


def test_incomplete_parameters_are_named():
    from server.runtime.model import rope_frequencies

    with pytest.raises(ValueError, match="'llama3' RoPE parameters .* are incomplete or invalid .*low_freq_factor"):
        rope_frequencies(spec_with("llama3", factor=8.0))
    inv_freq, scale = rope_frequencies(spec_with("yarn", factor=8.0, original_max_position_embeddings=512))
    assert inv_freq.shape == (4,) and scale == pytest.approx(0.1 * np.log(8.0) + 1)


@pytest.mark.parametrize("write", ["rope_freqs", "scaling_type"])
def test_a_gguf_file_with_rope_scaling_is_refused(tmp_path, write):
    # transformers' GGUF reader drops a Llama file's scaling: converted, it would serve wrong frequencies.
    from gguf import GGUFWriter, RopeScalingType

    path = tmp_path / "llama-3.1.gguf"
    writer = GGUFWriter(str(path), "llama")
    # A small shape: were the file read, transformers would otherwise build a 7B default Llama.
    writer.add_context_length(64)
    writer.add_embedding_length(4)
    writer.add_block_count(1)
    writer.add_feed_forward_length(8)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_vocab_size(8)
    writer.add_rope_freq_base(500000.0)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    if write == "rope_freqs":  # as llama.cpp converts Llama-3.1 / 3.2: per-frequency factors
        writer.add_tensor("rope_freqs.weight", np.ones(2, dtype=np.float32))
    else:
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    what = "a rope_freqs tensor" if write == "rope_freqs" else "llama.rope.scaling.type = 'linear'"
    with pytest.raises(SpecError, match=f"uses RoPE scaling \\({what}\\), which transformers' GGUF reader drops"):
        gguf.folder_for(path, cache_dir=tmp_path)
    assert not any((tmp_path / "gguf").glob("*")), "a refused conversion leaves nothing behind"
