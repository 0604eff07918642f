"""Weights for a stage: a seeded random init, or a local Hugging Face checkpoint folder.

Random init draws every tensor from its own generator, seeded by (seed, tensor name), so a
stage that builds only its own layers gets exactly the tensors the whole model would
have: the split into stages never changes the weights.

Checkpoints: `config.json` + `*.safetensors` (read with the `safetensors` library, only
the tensors the stage needs). A tied LM head reads `model.embed_tokens.weight`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from scheduler.errors import SpecError

from server.runtime.model import StageModel

INIT_STD = 0.02  # transformers' default initializer_range for Llama


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_random(stage: StageModel, seed: int) -> None:
    """Fills every parameter: norms with ones, the rest N(0, 0.02), per-name generators."""
    with torch.no_grad():
        for name, param in stage.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            if name == "lm_head.weight" and stage.spec.tie_embeddings:
                name = "model.embed_tokens.weight"  # tied: the head is the embedding table
            gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * INIT_STD)


def _checkpoint_index(folder: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors.index.json or every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        absent = sorted({file for file in weight_map.values() if not (folder / file).is_file()})
        if absent:  # else safe_open fails later with a bare FileNotFoundError
            raise SpecError(f"checkpoint {str(folder)!r}: {index.name} names {absent[0]}, which does not exist")
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SpecError(f"checkpoint {str(folder)!r} has no *.safetensors files")
    out = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                out[name] = file
    return out


def load_checkpoint(stage: StageModel, folder: str | Path) -> None:
    """Copies the stage's tensors from a safetensors checkpoint, checking every shape."""
    folder = Path(folder)
    where = _checkpoint_index(folder)
    wanted = dict(stage.named_parameters())
    if stage.has_head and "lm_head.weight" not in where and stage.spec.tie_embeddings:
        where["lm_head.weight"] = where.get("model.embed_tokens.weight")
    missing = sorted(name for name in wanted if where.get(name) is None)
    if missing:
        raise SpecError(f"checkpoint {str(folder)!r} lacks {len(missing)} tensors, e.g. {missing[0]}")
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(where[name], []).append(name)
    with torch.no_grad():
        for file, names in sorted(by_file.items()):
            with safe_open(file, framework="pt") as f:
                for name in names:
                    key = "model.embed_tokens.weight" if name == "lm_head.weight" and name not in f.keys() else name
                    tensor = f.get_tensor(key)
                    if tuple(tensor.shape) != tuple(wanted[name].shape):
                        raise SpecError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                                        f"the model expects {tuple(wanted[name].shape)}")
                    wanted[name].copy_(tensor)
