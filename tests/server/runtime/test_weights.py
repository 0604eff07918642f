"""Stage weights: seeded random init independent of the split; safetensors checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import scheduler
from scheduler.errors import SpecError
from server.runtime.model import StageModel
from server.runtime.weights import init_random, load_checkpoint

SPEC = scheduler.ModelSpec("t", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                           num_heads=4, num_kv_heads=2)  # layers 0..4: embed, 3 blocks, head
TIED = scheduler.ModelSpec("t-tied", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                           num_heads=4, num_kv_heads=2, tie_embeddings=True)
MOE = scheduler.ModelSpec("t-moe", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                          num_heads=4, num_kv_heads=2, num_experts=4, experts_per_token=2)


def stage(spec=SPEC, start=0, end=None, seed=None) -> StageModel:
    model = StageModel(spec, start, spec.num_layers + 2 if end is None else end, slots=2, max_context=16,
                       dtype=torch.float32)
    if seed is not None:
        init_random(model, seed)
    return model


def state(model: StageModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def save_checkpoint(folder, tensors: dict[str, torch.Tensor]):
    folder.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    return folder


def test_random_init_is_deterministic_per_seed():
    a, b, c = state(stage(seed=1)), state(stage(seed=1)), state(stage(seed=2))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a if not k.endswith("norm.weight"))
    assert all(torch.equal(a[k], torch.ones_like(a[k])) for k in a if k.endswith("norm.weight"))


@pytest.mark.parametrize("spec", [SPEC, MOE], ids=lambda s: s.name)
def test_random_init_does_not_depend_on_the_stage_split(spec):
    whole = state(stage(spec, seed=3))
    n = spec.num_layers + 2
    parts = {}
    for start, end in ((0, 2), (2, n - 1), (n - 1, n)):
        parts.update(state(stage(spec, start, end, seed=3)))
    assert parts.keys() == whole.keys()
    assert all(torch.equal(parts[k], whole[k]) for k in whole)


def test_random_init_ties_the_head_to_the_embedding():
    head_only = state(stage(TIED, TIED.num_layers + 1, seed=4))
    embed = state(stage(TIED, 0, 1, seed=4))
    assert torch.equal(head_only["lm_head.weight"], embed["model.embed_tokens.weight"])


def test_checkpoint_loads_only_the_stage_tensors(tmp_path):
    tensors = state(stage(seed=5))
    folder = save_checkpoint(tmp_path / "ckpt", tensors)
    middle = stage(start=2, end=4)  # blocks 1 and 2
    load_checkpoint(middle, folder)
    got = state(middle)
    assert sorted({k.split(".")[2] for k in got}) == ["1", "2"]
    assert all(torch.equal(got[k], tensors[k]) for k in got)


def test_sharded_checkpoint_follows_the_index(tmp_path):
    tensors = state(stage(seed=6))
    names = sorted(tensors)
    folder = tmp_path / "sharded"
    folder.mkdir()
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({k: tensors[k] for k in part}, folder / file)
    weight_map = {k: file for file, part in shards.items() for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = stage()
    load_checkpoint(model, folder)
    assert all(torch.equal(p, tensors[k]) for k, p in model.named_parameters())
    (folder / "b.safetensors").unlink()
    with pytest.raises(SpecError, match="names b.safetensors, which does not exist"):
        load_checkpoint(stage(), folder)


def test_tied_checkpoint_without_a_head_reads_the_embedding(tmp_path):
    tensors = {k: v for k, v in state(stage(TIED, seed=7)).items() if k != "lm_head.weight"}
    folder = save_checkpoint(tmp_path / "tied", tensors)
    head = stage(TIED, TIED.num_layers + 1)
    load_checkpoint(head, folder)
    assert torch.equal(head.lm_head.weight, tensors["model.embed_tokens.weight"])


def test_missing_tensor_is_named(tmp_path):
    tensors = state(stage(seed=8))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    folder = save_checkpoint(tmp_path / "missing", tensors)
    with pytest.raises(SpecError, match=r"lacks 1 tensors, e\.g\. model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(stage(), folder)
    load_checkpoint(stage(start=0, end=2), folder)  # a stage that does not need it loads


def test_wrong_shape_is_named(tmp_path):
    tensors = state(stage(seed=9))
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    folder = save_checkpoint(tmp_path / "shape", tensors)
    with pytest.raises(SpecError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(8, 32\).*\(16, 32\)"):
        load_checkpoint(stage(), folder)


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: None], ids=["empty", "absent"])
def test_folder_without_safetensors_is_named(tmp_path, make):
    folder = tmp_path / "nothing-here"
    make(folder)
    with pytest.raises(SpecError, match="nothing-here.*no \\*\\.safetensors"):
        load_checkpoint(stage(), folder)
