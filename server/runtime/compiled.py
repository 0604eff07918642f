"""Compiled steps: a stage's whole forward as one AOTInductor package (docs/compiled-steps.md).

Every step a stage runs, decode, prefill or mixed, is the same computation over a packed
list of tokens: each token attends the keys [0, L) of its own KV slot, masked past its
position. `StepGraph` writes that computation once, `torch.export` traces it with the
token count N and the key bucket L as dynamic dimensions, and AOTInductor compiles it to
one C++ package (weights frozen into it, the linears oneDNN's prepacked kernels, every
elementwise op fused): one package per stage serves
every step shape, and a token's result depends on itself alone (one code path for any N
and L; the masked keys add exact zeros), which tests/server/runtime/test_compiled.py checks
bitwise and `build` checks again for each package before it serves.

Measured on the 2-core dev host (BENCHMARKS.md, `bench/decode.py --only compiled`): the
eager step spends a third of its time in per-op dispatch and per-row Python; the package
runs none of it.

Packages are cached on disk under LOCKSTEP_CACHE/compiled, keyed by what changes them:
the stage's weights (their SHA-256), model shape, layers, dtype, KV cache shape, torch
version, this host's CPU capability and COMPILED_VERSION. A failure to compile is one logged reason and
the eager path (`CompiledStage.build` returns it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from server.runtime.model import HALF_ROW_BLOCK, SparseMoE, StageModel, apply_rope, rope_tables

log = logging.getLogger("lockstep.compiled")
REPO = Path(__file__).resolve().parents[2]


# Bump when StepGraph's computation or INDUCTOR_OPTIONS change: cached packages (and the
# calibrations of compiled steps, server/programs.py) of older code are not used.
# 2: linears autotuned between the GEMM template and ATen's kernels; 3: no autotuning;
# 4: q, k, v and gate, up as one linear each, q rotated before the scores; 5: half-precision
# steps in blocks of at most 32 tokens (`run_blocked`: a 64-token step's time changes); 6:
# half-precision steps past 32 tokens in one call of a second package (WIDE_PACK_ROWS).
COMPILED_VERSION = 6
CACHE_DIR = Path(os.environ.get("LOCKSTEP_CACHE", Path.home() / ".cache" / "lockstep")) / "compiled"
# Inductor's own cache (FX graphs, generated C++, its objects: 250-500 MB a build of
# smollm2-135m) goes to TORCHINDUCTOR_CACHE_DIR, by default $TMPDIR/torchinductor_<user>,
# and nothing prunes it: 17 GB of a dev host's /tmp after a few sessions of builds. The
# package is what a server keeps (CACHE_DIR), so a build uses a cache of its own, removed
# with its temp folder, unless the operator chose one (the variable set before this
# import: torch sets it itself at its first compile, so it is read here, once).
OWN_INDUCTOR_CACHE = "TORCHINDUCTOR_CACHE_DIR" in os.environ

# Inductor options: frozen weights (the linears become oneDNN's prepacked kernels, every
# elementwise op fused around them); no autotuning. Measured side by side (smollm2-135m,
# real weights, one process, rounds alternating; BENCHMARKS.md, "Compiled steps without
# autotuning"): autotuning between Inductor's CPU GEMM template and ATen's kernels at the
# traced row count took twice as long to build (118 against 63 s bf16, 121 against 66 s
# fp32), and its choice is a timing: two bf16 builds of the same weights on this host picked
# the template (1.61 ms) and oneDNN (1.32 against 1.34) for the LM head, packages that ran
# batch-8 decode at 26.5 and 19.9 ms (20.6 and 19.6 without autotuning): same inputs,
# different programs. Without it, fp32 decode is 6% slower at batch 1 and 4% faster at 64
# prompt tokens. The template alone (the first version) made a 64-token prefill 1.7x (fp32)
# and 3.6x (bf16) slower. `build` still checks each package's rows for batch invariance
# before it serves (`_invariance`).
INDUCTOR_OPTIONS = {"freezing": True}

# Half-precision steps past HALF_ROW_BLOCK tokens (docs/compiled-steps.md, "Wide steps").
# oneDNN picks a bf16 matmul's kernel from the row count and from the layout its weight was
# packed in, and Inductor packs frozen weights for the traced row count (TRACED_TOKENS):
# packed so, a row's bits change past 32 rows, so steps ran in blocks of 32 tokens, each a
# whole pass over the weights (a 64-token prefill 1.9x a 32-token one). Packed for one row
# (WIDE_PACK_ROWS), every linear of smollm2-135m gave each row the bits it has alone at
# every row count up to 128 (the 1536-input down_proj moved past 130-150; the others were
# checked to 512), and the same bits as the narrow packing at up to 32 rows (this host, 1
# and 2 threads, torch 2.13). But the one-row packing runs a decode step 12% slower (18.5
# against 16.4 ms at batch 1, in the package). So a stage has two packages of the same
# graph: the narrow one for steps of up to HALF_ROW_BLOCK tokens, the wide one for larger
# steps, in calls of at most WIDE_ROWS tokens; `build` checks that a row's bits are the same
# in both before they serve, else the narrow one serves in blocks as before.
WIDE_PACK_ROWS = 1
WIDE_ROWS = 128


class StepGraph(nn.Module):
    """A stage's forward over packed tokens, in a form torch.export traces with dynamic N and L.

    x: token ids [N] int64 (first stage) or hidden [N, h]; positions, slots: [N] int64
    (padding tokens: the scratch slot); last_index: [R] int64 (last stage: the rows whose
    logits are returned); cos, sin: [N, 1, D] (rope_tables); hidden: [N, L] bool, the keys
    each token may not see; caches: (k, v) per block, each [S + 1, Hkv, C + 1, D], written
    in place at (slot, position) of every token. Returns hidden [N, h] or logits [R, V] fp32.

    Attention is written as reductions, not matmuls, so that Inductor fuses the slot gather
    into them (no [N, Hkv, L, D] copy) and a token's keys are read where they lie."""

    def __init__(self, model: StageModel):
        super().__init__()
        self.model = model
        # The linears that share an input as one weight each: q, k, v; gate, up. Four
        # linears a block instead of seven, each a longer stream of weights (the runtime's
        # linears have no bias). [out_q + 2 out_kv, h] and [2 intermediate, h].
        for li, i in enumerate(model.block_ids):
            block = model.model.layers[str(i)]
            a, m = block.self_attn, block.mlp
            self.register_buffer(f"qkv{li}", torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(),
                                 persistent=False)
            self.register_buffer(f"gate_up{li}", torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(),
                                 persistent=False)

    def forward(self, x, positions, slots, last_index, cos, sin, hidden, caches):
        sm, s = self.model, self.model.spec
        if sm.has_embed:
            x = sm.model.embed_tokens(x)
        n, keys = x.shape[0], hidden.shape[1]
        h, hkv, d = s.num_heads, s.num_kv_heads, s.head_dim
        heads = torch.arange(hkv, device=x.device)[None, :]
        for li, i in enumerate(sm.block_ids):
            block = sm.model.layers[str(i)]
            cache_k, cache_v = caches[2 * li], caches[2 * li + 1]
            attn = block.self_attn
            normed = block.input_layernorm(x)
            q, k, v = F.linear(normed, getattr(self, f"qkv{li}")).split([h * d, hkv * d, hkv * d], dim=-1)
            q, k, v = q.reshape(n, h, d), k.reshape(n, hkv, d), v.reshape(n, hkv, d)
            # q rotated into a buffer of its own (a scatter into a fresh tensor, which Inductor
            # must store): left a pointwise expression, Inductor recomputed the rotation inside
            # the score reduction, once per key (rotate-half loads, cos, sin: 20-25% of a
            # decode step's attention at 128-512 keys).
            q = q.new_empty(q.shape).index_put_((torch.arange(n, device=x.device),), apply_rope(q, cos, sin))
            k = apply_rope(k, cos, sin)
            # In place on the graph input (a per-layer view would be copied whole by functionalization).
            cache_k.index_put_((slots[:, None], heads, positions[:, None]), k)
            cache_v.index_put_((slots[:, None], heads, positions[:, None]), v)
            ks = cache_k[:, :, :keys][slots]  # [N, Hkv, L, D], fused into the reductions below
            vs = cache_v[:, :, :keys][slots]
            qg = q.view(n, hkv, h // hkv, 1, d).float()
            scores = (qg * ks[:, :, None].float()).sum(-1) * d ** -0.5  # [N, Hkv, G, L] fp32
            scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out = (probs[..., None] * vs[:, :, None].float()).sum(-2).to(x.dtype)  # [N, Hkv, G, D]
            x = x + attn.o_proj(out.reshape(n, h * d))
            normed = block.post_attention_layernorm(x)
            mlp = block.mlp
            gate, up = F.linear(normed, getattr(self, f"gate_up{li}")).chunk(2, dim=-1)
            x = x + mlp.down_proj(F.silu(gate) * up)
        if not sm.has_head:
            return x
        return sm.lm_head(sm.model.norm(x[last_index])).float()


def unsupported(model: StageModel) -> str:
    """Why this stage cannot be compiled ("" if it can)."""
    if model.cache_k.device.type != "cpu":
        return f"compiled steps are built for CPU stages; {model.cache_k.device.type} runs eager"
    if any(isinstance(m, SparseMoE) for m in model.modules()):
        return "MoE routing picks each expert's rows at run time (data-dependent shapes)"
    if any(getattr(m, "packed", None) is not None or getattr(m, "qkv", None) is not None for m in model.modules()):
        return "the stage's linears are prepacked for the eager path"
    return ""


def weights_digest(model: StageModel) -> str:
    """SHA-256 of the stage's parameters (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        t = param.detach().contiguous().cpu()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def package_key(model: StageModel, weights: str, pack_rows: int = 0) -> str:
    """`pack_rows`: the row count half-precision weights are packed for (0: the traced one)."""
    spec = model.spec
    shape = {"version": COMPILED_VERSION, "weights": weights, "torch": torch.__version__, "pack_rows": pack_rows,
             "cpu": torch.backends.cpu.get_cpu_capability(), "layers": [model.start, model.end],
             "dtype": str(model.cache_k.dtype), "cache": list(model.cache_k.shape), "options": INDUCTOR_OPTIONS,
             "traced_tokens": TRACED_TOKENS,
             "spec": [spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size,
                      spec.norm_eps, spec.num_layers, float(model.rope_scale)]}
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:24]


# The token count export traces with: a decode step's. With autotuning (COMPILED_VERSION 2),
# tracing at 64 ran the same (smollm2-135m bf16, 4 to 64 tokens, within 2-7%).
TRACED_TOKENS = 8


def example_inputs(model: StageModel, n: int = 0, rows: int = 4, keys: int = 128):
    """Inputs of the traced shapes (N = n tokens, default TRACED_TOKENS; R = rows, L = keys)."""
    spec, dtype, n = model.spec, model.cache_k.dtype, n or TRACED_TOKENS
    positions = torch.arange(n, dtype=torch.int64) % keys
    x = (torch.zeros(n, dtype=torch.int64) if model.has_embed else torch.zeros(n, spec.hidden_size, dtype=dtype))
    cos, sin = rope_tables(model.rope_inv_freq, model.rope_scale, positions, dtype)
    hidden = torch.arange(keys)[None, :] > positions[:, None]
    slots = torch.full((n,), model.scratch_slot, dtype=torch.int64)
    return x, positions, slots, torch.arange(rows, dtype=torch.int64), cos, sin, hidden


def block_caches(model: StageModel) -> list[torch.Tensor]:
    """StepGraph's `caches`: k, v of each block, views of the stage's KV cache."""
    return [c for li in range(len(model.block_ids)) for c in (model.cache_k[li], model.cache_v[li])]


class CompiledStage:
    """A stage's package, loaded, with the KV cache it writes (the eager model's buffers)."""

    def __init__(self, runner, model: StageModel, path: Path, seconds: float, cached: bool, wide=None):
        self.runner, self.model, self.path = runner, model, path
        self.seconds, self.cached = seconds, cached  # compile (or load) time; whether it came from disk
        self.wide = wide  # half precision: the package for steps past HALF_ROW_BLOCK tokens, or None
        self.caches = block_caches(model)

    @classmethod
    def build(cls, model: StageModel) -> "CompiledStage | str":
        """The stage's package, compiled or from the disk cache; or why not (a one-line reason)."""
        why = unsupported(model)
        if why:
            return why
        start = time.perf_counter()
        try:
            digest = weights_digest(model)
            path = CACHE_DIR / f"{package_key(model, digest)}.pt2"
            wide_path = (CACHE_DIR / f"{package_key(model, digest, WIDE_PACK_ROWS)}.pt2"  # half precision only
                         if model.cache_k.dtype != torch.float32 else None)
            cached = path.exists() and (wide_path is None or wide_path.exists())
            if not cached:
                _compile(model, {p: rows for p, rows in ((path, 0), (wide_path, WIDE_PACK_ROWS))
                                 if p is not None and not p.exists()})
            runner = _load(path)
            wide = _load(wide_path) if wide_path is not None and wide_path.exists() else None
            varies = _invariance(runner, model, wide)
            if wide is not None and varies:
                log.warning("wide steps off (blocks of %d tokens instead): %s", HALF_ROW_BLOCK, varies)
                wide = None
                varies = _invariance(runner, model)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means eager, with its reason
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return f"compilation failed ({type(exc).__name__}: {first[:200]})"
        if varies:
            return varies
        return cls(runner, model, path, time.perf_counter() - start, cached, wide)

    @torch.inference_mode()
    def __call__(self, x, positions, write_slots, attend, last_index):
        """As StageModel.forward (the same arguments)."""
        model = self.model
        keys = max(k for _, k, _, _ in attend)  # the step's widest key bucket: every row's keys fit
        cos, sin = rope_tables(model.rope_inv_freq, model.rope_scale, positions, model.cache_k.dtype)
        hidden = torch.arange(keys, device=positions.device)[None, :] > positions[:, None]  # [N, L]
        return run_blocked(self.runner, model, x, positions, write_slots, last_index, cos, sin, hidden, self.caches,
                           self.wide)


def run_blocked(runner, model: StageModel, x, positions, slots, last_index, cos, sin, hidden, caches, wide=None):
    """The package over a step's N tokens; in half precision, over blocks of at most
    HALF_ROW_BLOCK tokens, one call each, in order. oneDNN's bf16 and fp16 linears switch
    kernels above 32 rows, as on the eager path (server/runtime/model.py, HALF_ROW_BLOCK);
    whether a row's bits change with it depends on the host: a package that was row-invariant
    on the first hosts was not on another (its L3 reported as 480 MB: a 32-token slice's rows 7
    and 11 differed alone and beside 8+ more tokens), and `_invariance` then sent every step
    eager. The blocks run in position order, each writing its keys before the next reads
    them, and a token attends only to positions up to its own (its slice's earlier tokens, or
    earlier steps'), so each token sees the keys of one whole call: the same result. N is a
    multiple of ROW_MULTIPLE (server/runtime/step.py), so every block has at least 4 tokens.
    With `wide` (the package of WIDE_PACK_ROWS, whose rows have the same bits at any row
    count up to WIDE_ROWS: CompiledStage.build), a step past HALF_ROW_BLOCK tokens runs on it
    in calls of at most WIDE_ROWS tokens instead.
    Returns the last stage's logits [R, V] in `last_index` order, or hidden [N, h]."""
    n = x.shape[0]
    block = n  # fp32, or half precision up to HALF_ROW_BLOCK tokens: one call
    if model.cache_k.dtype != torch.float32 and n > HALF_ROW_BLOCK:
        runner, block = (wide, WIDE_ROWS) if wide is not None else (runner, HALF_ROW_BLOCK)
    if n <= block:
        return runner(x, positions, slots, last_index, cos, sin, hidden, caches)
    outs, picks = [], []
    for start in range(0, n, block):
        end = min(n, start + block)
        mine = ((last_index >= start) & (last_index < end)).nonzero().flatten()  # positions in last_index
        local = last_index[mine] - start
        # The package takes at least 2 logit rows (its traced "rows" dimension) and 2 tokens.
        ask = torch.cat([local, local.new_zeros(max(0, 2 - len(local)))])
        out = runner(x[start:end], positions[start:end], slots[start:end], ask, cos[start:end], sin[start:end],
                     hidden[start:end], caches)
        if not model.has_head:
            outs.append(out)
        elif len(mine):
            outs.append(out[:len(mine)])
            picks.append(mine)
    if not model.has_head:
        return torch.cat(outs)
    logits = torch.empty(len(last_index), outs[0].shape[-1], dtype=outs[0].dtype)
    logits[torch.cat(picks)] = torch.cat(outs)
    return logits


def _load(path: Path):
    """The package's runner. torch's loader extracts the package's library into
    $TMPDIR/aotinductor_XXXXXX and removes it only when the loader is destroyed: never in a
    process that ends with os._exit or a signal, as serve's own do, so each start left 316 MB
    behind for smollm2-135m (146 such folders had filled this host's disk). Loaded from a
    folder of our own, removed at once: the library stays mapped after its file is gone
    (tests/server/runtime/test_compiled.py runs steps after it)."""
    tmp = tempfile.mkdtemp(prefix="lockstep-aoti-")
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = tmp  # read by the C++ loader; only for the load
    try:
        return torch._inductor.aoti_load_package(str(path))
    finally:
        if before is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before
        shutil.rmtree(tmp, ignore_errors=True)


@torch.inference_mode()
def _invariance(runner, model: StageModel, wide=None) -> str:
    """"" if every token's output row is bitwise the same whatever else its step holds: a
    token alone (4 token rows, 3 of them padding) and beside a prompt slice in another slot
    (n = 64 rows, past the 32 rows where oneDNN's half-precision kernels change; with a
    `wide` package, WIDE_ROWS; n keys); the slice's first 32 rows there and in a step of
    their own at 32 keys (masked keys add exact zeros whatever their count);
    the slice but its last 3 tokens there and alone; else why not. Run as served
    (`run_blocked`), on scratch caches. A single row is not enough: bf16 rounding hid a
    kernel switch in most rows (one host's package changed 2 rows of a 32-token slice)."""
    spec, dtype = model.spec, model.cache_k.dtype
    n = min(WIDE_ROWS if wide is not None else 64, (model.cache_k.shape[-2] - 1) // 4 * 4)
    caches = [torch.zeros_like(c) for c in block_caches(model)]
    gen = torch.Generator().manual_seed(0)
    if model.has_embed:
        tokens = torch.randint(spec.vocab_size, (n,), generator=gen)
    else:
        tokens = torch.randn(n, spec.hidden_size, generator=gen).to(dtype)
    slot, other = 0, (1 if model.scratch_slot > 1 else model.scratch_slot)  # the slice: another slot

    def step(ids, positions, slots, keys=n):
        cos, sin = rope_tables(model.rope_inv_freq, model.rope_scale, positions, dtype)
        hidden = torch.arange(keys)[None, :] > positions[:, None]
        for c in caches:
            c.zero_()
        rows = torch.arange(len(ids))  # every token's row (logits, or the hidden state it hands on)
        return run_blocked(runner, model, tokens[ids].clone(), positions, slots, rows, cos, sin, hidden,
                           caches, wide).clone()

    scratch = model.scratch_slot
    alone = step(torch.arange(4), torch.tensor([5, 0, 0, 0]), torch.tensor([slot, scratch, scratch, scratch]))
    mixed = step(torch.arange(n), torch.cat([torch.tensor([5]), torch.arange(n - 1)]),
                 torch.tensor([slot] + [other] * (n - 1)))
    # The slice's first 32 alone, at 32 keys (a prefill step's: scheduler.ticks.MIN_PROMPT_KEYS).
    own = step(torch.arange(1, 33), torch.arange(32), torch.full((32,), other), 32)
    most = step(torch.arange(1, n - 3), torch.arange(n - 4), torch.full((n - 4,), other))
    for a, b, what in ((alone[:1], mixed[:1], "a token alone and beside a prompt slice"),
                       (own, mixed[1:33], "a prompt slice alone and beside a token"),
                       (most, mixed[1:n - 3], f"a {n - 4}-token prompt slice alone and beside a token")):
        if not torch.equal(a, b):
            return (f"a row's result changes with the step's row count in this package ({what}: max difference "
                    f"{(a.float() - b.float()).abs().max().item():.3g}), so the kernels Inductor picked on this "
                    f"host are not batch-invariant")
    return ""


def _compile(model: StageModel, paths: dict[Path, int]) -> None:
    """Build the stage's package at each path, its half-precision weights packed for that
    row count (0: the traced one; WIDE_PACK_ROWS). The graph is exported once; with two
    packages, the export is saved and a child process builds the last one beside this one
    (a build is mostly single-threaded Python: smollm2-135m's two took 71 s at once on
    this 2-core host, 108 s one after the other, 55-62 s for one alone). A package that
    fails in the child is not written (its reason on the child's stderr); the caller goes
    on without it."""
    from torch.export import Dim

    n, rows = Dim("tokens", min=2, max=1 << 16), Dim("rows", min=2, max=1 << 16)
    # Up to max_context: the cache holds one key more (StageModel), so a key bucket's slice is
    # never the whole axis (export would otherwise guard on L != the cache's length).
    keys = Dim("keys", min=2, max=model.cache_k.shape[-2] - 1)
    x_dims = {0: n} if model.has_embed else {0: n, 1: None}
    dims = (x_dims, {0: n}, {0: n}, {0: rows}, {0: n}, {0: n}, {0: n, 1: keys},
            [None] * (2 * len(model.block_ids)))
    caches = [torch.zeros_like(c) for c in block_caches(model)]
    graph = StepGraph(model).eval()
    folder = next(iter(paths)).parent
    folder.mkdir(parents=True, exist_ok=True)
    jobs, child = list(paths.items()), None
    with torch.no_grad(), tempfile.TemporaryDirectory(dir=folder) as tmp:
        exported = torch.export.export(graph, (*example_inputs(model), caches), dynamic_shapes=dims)
        try:
            if len(jobs) > 1:
                saved = Path(tmp) / "exported.pt2"
                torch.export.save(exported, saved)
                (child_path, child_rows), jobs = jobs[-1], jobs[:-1]
                # The child's Inductor cache as this process's (torch sets the variable at its
                # first compile: inherited, it would read as the operator's, and stay behind).
                env = {k: v for k, v in os.environ.items() if OWN_INDUCTOR_CACHE or k != "TORCHINDUCTOR_CACHE_DIR"}
                child = subprocess.Popen([sys.executable, "-m", "server.runtime.compiled", str(saved),
                                          str(child_path), str(child_rows)], cwd=REPO, env=env,
                                         stdout=subprocess.DEVNULL)
            for path, pack_rows in jobs:
                _package(exported, path, pack_rows)
            if child is not None and child.wait() != 0:
                log.warning("%s (weights packed for %d rows) was not built (exit %d; its error above)",
                            child_path.name, child_rows, child.returncode)
        finally:
            if child is not None and child.poll() is None:
                child.kill()
                child.wait()


def _package(exported, path: Path, pack_rows: int) -> None:
    """AOTInductor's package of `exported` at `path` (whole or absent: a crash leaves no half
    package), weights packed for `pack_rows` (`_pack_for_rows`)."""
    with torch.no_grad(), tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        partial = Path(tmp) / path.name
        with _inductor_cache(Path(tmp) / "inductor"), _pack_for_rows(pack_rows):
            torch._inductor.aoti_compile_and_package(exported, package_path=str(partial),
                                                     inductor_configs=dict(INDUCTOR_OPTIONS))
        os.replace(partial, path)


@contextlib.contextmanager
def _pack_for_rows(rows: int):
    """Inductor's freezing packs each half-precision linear's weight for the traced row count
    (TRACED_TOKENS); within this context, for `rows` (WIDE_PACK_ROWS: see there; 0: as
    traced). Inductor has no option for it, so its CPU pass
    (mkldnn_fusion.CpuMkldnnDeviceOp.pack_linear_weight) is wrapped for the build."""
    if not rows:
        yield
        return
    from torch._inductor.fx_passes import mkldnn_fusion

    cls = mkldnn_fusion.CpuMkldnnDeviceOp
    original = cls.pack_linear_weight

    def pack_linear_weight(self, graph, is_lp_weight, transpose_weight_node, batch_size):
        return original(self, graph, is_lp_weight, transpose_weight_node, rows if is_lp_weight else batch_size)

    cls.pack_linear_weight = pack_linear_weight
    try:
        yield
    finally:
        cls.pack_linear_weight = original


def _inductor_cache(folder: Path):
    """The Inductor cache a build writes to: `folder` (removed with the build's temp folder),
    or the operator's TORCHINDUCTOR_CACHE_DIR (OWN_INDUCTOR_CACHE)."""
    if OWN_INDUCTOR_CACHE:
        return contextlib.nullcontext()
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    return temporary_cache_dir(str(folder))


if __name__ == "__main__":  # `_compile`'s child: python -m server.runtime.compiled EXPORTED PACKAGE PACK_ROWS
    _package(torch.export.load(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
