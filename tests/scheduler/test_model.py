"""Model specs: preset parameter counts, Hugging Face config.json parsing, validation."""

import json

import pytest

from scheduler.errors import SpecError
from scheduler.model import PRESETS, ModelSpec, activation_dtype, from_hf_config, get_model

# Published parameter counts (model cards / HF hub).
PUBLISHED_PARAMS = {
    "llama-2-7b": 6.74e9,
    "llama-2-70b": 68.98e9,
    "llama-3-8b": 8.03e9,
    "llama-3-70b": 70.6e9,
    "mixtral-8x7b": 46.7e9,
}

LLAMA_CONFIG = {  # meta-llama/Llama-2-7b-hf config.json, trimmed
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
}

MIXTRAL_CONFIG = {  # mistralai/Mixtral-8x7B-v0.1 config.json, trimmed
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
}


def write_config(folder, cfg) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("name, published", sorted(PUBLISHED_PARAMS.items()))
def test_preset_parameter_count_matches_published(name, published):
    assert get_model(name).num_params == pytest.approx(published, rel=0.01)


def test_moe_active_params_count_only_routed_experts():
    mixtral = get_model("mixtral-8x7b")
    # Mixtral's model card: ~12.9B active parameters per token (top-2 of 8 experts).
    assert mixtral.active_params_per_token == pytest.approx(12.9e9, rel=0.02)
    assert mixtral.active_params_per_token < mixtral.num_params / 3


def test_dense_active_params_close_to_total():
    llama = get_model("llama-2-7b")
    # Everything but the embedding lookup and the norms.
    assert llama.active_params_per_token == pytest.approx(llama.num_params - llama.embed_params, rel=1e-3)


def test_from_hf_config_llama(tmp_path):
    path = write_config(tmp_path / "Llama-2-7b-hf", LLAMA_CONFIG)
    spec = from_hf_config(path)
    assert spec.name == "Llama-2-7b-hf"  # the folder names it when _name_or_path is absent
    assert (spec.vocab_size, spec.hidden_size, spec.intermediate_size) == (32000, 4096, 11008)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (32, 32, 32, 128)
    assert spec.max_position == 4096
    assert not spec.is_moe and not spec.tie_embeddings
    assert spec.num_params == PRESETS["llama-2-7b"].num_params


def test_from_hf_config_mixtral(tmp_path):
    spec = from_hf_config(write_config(tmp_path / "mixtral", MIXTRAL_CONFIG))
    assert spec.is_moe
    assert (spec.num_experts, spec.experts_per_token, spec.num_kv_heads) == (8, 2, 8)
    assert spec.rope_theta == 1e6 and spec.max_position == 32768
    assert spec.num_params == pytest.approx(46.7e9, rel=0.01)


def test_from_hf_config_name_or_path_names_model(tmp_path):
    spec = from_hf_config(write_config(tmp_path / "x", {**LLAMA_CONFIG, "_name_or_path": "org/my-llama"}))
    assert spec.name == "org/my-llama"


def test_from_hf_config_missing_kv_heads_means_multi_head(tmp_path):
    cfg = {k: v for k, v in LLAMA_CONFIG.items() if k != "num_key_value_heads"}
    cfg["num_attention_heads"] = 16
    assert from_hf_config(write_config(tmp_path / "m", cfg)).num_kv_heads == 16


def test_from_hf_config_explicit_head_dim(tmp_path):
    cfg = {**LLAMA_CONFIG, "head_dim": 256}
    spec = from_hf_config(write_config(tmp_path / "m", cfg))
    assert spec.head_dim == 256
    assert spec.attn_params == 4096 * 2 * (32 * 256 + 32 * 256)


def test_tied_embeddings_drop_the_lm_head(tmp_path):
    untied = from_hf_config(write_config(tmp_path / "untied", LLAMA_CONFIG))
    tied = from_hf_config(write_config(tmp_path / "tied", {**LLAMA_CONFIG, "tie_word_embeddings": True}))
    assert tied.tie_embeddings
    assert untied.num_params - tied.num_params == 32000 * 4096


def test_get_model_accepts_folder_and_file(tmp_path):
    path = write_config(tmp_path / "mymodel", MIXTRAL_CONFIG)
    by_folder = get_model(str(tmp_path / "mymodel"))
    by_file = get_model(path)
    assert by_folder == by_file
    assert by_folder.num_experts == 8


def test_get_model_unknown_name_lists_presets():
    with pytest.raises(SpecError, match="unknown model 'llama-9'.*llama-2-7b"):
        get_model("llama-9")


@pytest.mark.parametrize("missing", ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"])
def test_config_missing_key_is_named(tmp_path, missing):
    cfg = {k: v for k, v in LLAMA_CONFIG.items() if k != missing}
    with pytest.raises(SpecError, match=f"lacks {missing}"):
        from_hf_config(write_config(tmp_path / "m", cfg))


def test_config_not_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(SpecError, match="not readable JSON"):
        get_model(str(path))


def test_config_not_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(SpecError, match="not a JSON object"):
        from_hf_config(path)


def test_config_missing_file(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        get_model(str(tmp_path / "nope" / "config.json"))
    with pytest.raises(SpecError, match="does not exist"):
        get_model(str(tmp_path))  # a folder with no config.json


def test_config_with_bad_integer_value_names_field(tmp_path):
    cfg = {**LLAMA_CONFIG, "max_position_embeddings": "lots"}
    with pytest.raises(SpecError, match="max_position"):
        from_hf_config(write_config(tmp_path / "m", cfg))


@pytest.mark.parametrize("key", ["rope_theta", "rms_norm_eps"])
def test_config_with_non_numeric_float_field_is_spec_error(tmp_path, key):
    cfg = {**LLAMA_CONFIG, key: "big"}
    with pytest.raises(SpecError, match=key.split("_")[0]):
        from_hf_config(write_config(tmp_path / "m", cfg))


def tiny_kwargs(**overrides):
    base = dict(name="t", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                num_heads=4, num_kv_heads=2)
    return {**base, **overrides}


def test_heads_not_multiple_of_kv_heads():
    with pytest.raises(SpecError, match="num_heads 4 is not a multiple of num_kv_heads 3"):
        ModelSpec(**tiny_kwargs(num_kv_heads=3))


def test_hidden_not_divisible_by_heads_needs_head_dim():
    with pytest.raises(SpecError, match="give head_dim"):
        ModelSpec(**tiny_kwargs(hidden_size=30))
    assert ModelSpec(**tiny_kwargs(hidden_size=30, head_dim=8)).head_dim == 8


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                   "num_heads", "num_kv_heads", "num_experts", "max_position"])
@pytest.mark.parametrize("value", [0, -4])
def test_non_positive_sizes_rejected(field, value):
    with pytest.raises(SpecError, match=f"{field} must be a positive integer"):
        ModelSpec(**tiny_kwargs(**{field: value}))


def test_negative_head_dim_rejected():
    with pytest.raises(SpecError, match="head_dim must be positive"):
        ModelSpec(**tiny_kwargs(head_dim=-8))


def test_more_routed_experts_than_experts_rejected():
    with pytest.raises(SpecError, match="experts_per_token 3 exceeds num_experts 2"):
        ModelSpec(**tiny_kwargs(num_experts=2, experts_per_token=3))


def test_int8_weights_compute_in_fp16():
    assert activation_dtype("int8") == "fp16"
    assert activation_dtype("bf16") == "bf16"
    with pytest.raises(SpecError, match="unknown dtype 'fp8'"):
        activation_dtype("fp8")
