"""Compiled steps (server/runtime/compiled.py): the bitwise row-invariance tests of
test_executor.py run again with compiled stages, fp32 and bf16; compiled against eager; the
package cache on disk; the fallback to eager with its reason."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from server.runtime import compiled
from server.runtime.executor import LocalExecutor
from tests.server.helpers import generate, random_prompt
from tests.server.runtime import test_executor as eager
from tests.server.runtime.test_executor import MOE, PARAMS, TARGET_PROMPT, WIDE


@pytest.fixture(scope="module")
def compiled_plans(tiny_plan):
    plans = {"tiny": replace(tiny_plan, compiled=True),
             "wide-bf16": replace(eager.one_stage_plan(WIDE, "bf16"), compiled=True)}
    for name, plan in plans.items():  # compiled once here (or loaded from the disk cache)
        runner = LocalExecutor(plan).runners[0]
        assert runner.compiled is not None, f"{name}: {runner.compile_note}"
    return plans


@pytest.mark.parametrize("params", PARAMS, ids=str)
@pytest.mark.parametrize("model", ["tiny", "wide-bf16"])
def test_tokens_and_logits_do_not_depend_on_batch_or_slot(compiled_plans, model, params):
    eager.test_tokens_and_logits_do_not_depend_on_batch_or_slot(compiled_plans, model, params)


@pytest.mark.parametrize("params", PARAMS, ids=str)
def test_a_mixed_step_gives_each_row_what_it_gets_alone(compiled_plans, params):
    eager.test_a_mixed_step_gives_each_row_what_it_gets_alone(compiled_plans["tiny"], params)


def test_stage_split_gives_the_same_tokens(compiled_plans):
    """Stages that take hidden states and return them (not token ids, not logits) compile too."""
    eager.test_stage_split_gives_the_same_tokens(compiled_plans["tiny"], "greedy")


@pytest.mark.parametrize("model", ["tiny", "wide-bf16"])
def test_compiled_steps_compute_what_the_eager_ones_do(compiled_plans, model):
    plan = compiled_plans[model]
    prompt = random_prompt(40, seed=11)
    fast = generate(LocalExecutor(plan), 2, prompt, 8)
    slow = generate(LocalExecutor(replace(plan, compiled=False)), 2, prompt, 8)
    # Not bitwise: fused kernels round differently (attention in fp32 throughout).
    tolerance = 1e-4 if plan.dtype == "fp32" else 0.05
    for a, b in zip(fast.logits, slow.logits):
        assert torch.allclose(a, b, atol=tolerance * max(1.0, float(b.abs().max())), rtol=0)
    if plan.dtype == "fp32":
        assert fast.out == slow.out


def test_half_precision_steps_past_32_tokens_run_on_the_wide_package_with_the_same_bits(compiled_plans):
    """bf16: a step of more than HALF_ROW_BLOCK tokens runs on the package packed for one row,
    in one call, and each row gets exactly what the narrow package gives it in blocks of 32
    (what served it before, and what serves when the wide one fails the build's check)."""
    stage = LocalExecutor(compiled_plans["wide-bf16"]).runners[0].compiled
    assert stage.wide is not None  # passed the build's check on this host
    calls = []

    def wide(*args):
        calls.append(args[0].shape[0])
        return stage.wide(*args)

    model = stage.model
    n = 96
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(model.spec.vocab_size, (n,), generator=gen)
    positions = torch.arange(n)
    slots = torch.zeros(n, dtype=torch.int64)
    cos, sin = compiled.rope_tables(model.rope_inv_freq, model.rope_scale, positions, model.cache_k.dtype)
    hidden = torch.arange(128)[None, :] > positions[:, None]
    rows = torch.arange(n)
    runs = []
    for runner in (wide, None):
        for c in stage.caches:
            c.zero_()
        runs.append(compiled.run_blocked(stage.runner, model, x, positions, slots, rows, cos, sin, hidden,
                                         stage.caches, runner).clone())
    assert calls == [n]
    assert torch.equal(runs[0], runs[1])


def test_a_wide_package_that_fails_the_check_leaves_the_narrow_one_in_blocks(compiled_plans, monkeypatch, caplog):
    """A wide package whose rows move (on another host, another torch) is dropped with one
    logged line; the narrow package serves every step, in blocks of HALF_ROW_BLOCK tokens."""
    real = compiled._invariance

    def check(runner, model, wide=None):
        return "rows moved" if wide is not None else real(runner, model)

    monkeypatch.setattr(compiled, "_invariance", check)
    with caplog.at_level("WARNING", logger="lockstep.compiled"):
        stage = LocalExecutor(compiled_plans["wide-bf16"]).runners[0].compiled
    assert stage is not None and stage.wide is None
    assert "wide steps off (blocks of 32 tokens instead): rows moved" in caplog.text


def test_a_second_build_loads_the_package_from_disk(compiled_plans):
    first = LocalExecutor(compiled_plans["tiny"]).runners[0].compiled
    again = LocalExecutor(compiled_plans["tiny"]).runners[0].compiled
    assert again.cached and again.path == first.path
    assert again.path.parent == compiled.CACHE_DIR


def test_other_weights_get_another_package(compiled_plans):
    plain = replace(compiled_plans["tiny"], compiled=False, pack_weights=False)  # weights as loaded
    digests = [compiled.weights_digest(LocalExecutor(replace(plain, seed=seed)).runners[0].model) for seed in (7, 7, 99)]
    assert digests[0] == digests[1] != digests[2]
    model = LocalExecutor(plain).runners[0].model
    assert compiled.package_key(model, digests[0]) != compiled.package_key(model, digests[2])


def test_moe_runs_eager_and_says_why():
    runner = LocalExecutor(replace(eager.one_stage_plan(MOE), compiled=True)).runners[0]
    assert runner.compiled is None and "MoE" in runner.compile_note
    assert generate(LocalExecutor(replace(eager.one_stage_plan(MOE), compiled=True)), 0, TARGET_PROMPT, 3).out


def test_a_package_whose_rows_change_with_the_batch_is_refused(compiled_plans):
    """The check `build` runs before serving, on fake runners that return one row per
    requested token (its position): every row moving with the row count; only one row of a
    prompt slice moving (as bf16 rounding hid a kernel switch in all but 2 rows of a slice
    on one host); neither."""
    model = LocalExecutor(compiled_plans["tiny"]).runners[0].compiled.model

    def rows(positions, last_index):
        return positions[last_index].float()[:, None].expand(-1, 8).clone()

    def varying(x, positions, slots, last_index, *rest):
        return rows(positions, last_index) + positions.shape[0]

    def one_slice_row_varies(x, positions, slots, last_index, *rest):
        out = rows(positions, last_index)
        out[positions[last_index] == 7] += positions.shape[0] > 32
        return out

    assert "a token alone and beside a prompt slice" in compiled._invariance(varying, model)
    assert "a prompt slice alone and beside a token" in compiled._invariance(one_slice_row_varies, model)
    assert compiled._invariance(lambda x, positions, slots, last_index, *rest: rows(positions, last_index), model) == ""


def test_loading_a_package_leaves_nothing_in_the_temp_folder(compiled_plans, tmp_path, monkeypatch):
    """torch extracts a package's library under $TMPDIR and removes it only when its loader
    is destroyed, which a process ended by os._exit or a signal never does (each serve start
    left 316 MB behind): the load runs in a folder of its own, removed at once."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    runner = LocalExecutor(compiled_plans["tiny"]).runners[0]
    assert runner.compiled is not None and runner.compiled.cached
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("aotinductor_", "lockstep-aoti-"))]
    assert os.environ["TMPDIR"] == str(tmp_path)


def test_a_build_leaves_nothing_in_inductors_cache_unless_the_operator_chose_one(compiled_plans, tmp_path,
                                                                                 monkeypatch):
    """Inductor's cache (250-500 MB a build of smollm2-135m, by default under $TMPDIR, never
    pruned) is the build's own, removed with it; a TORCHINDUCTOR_CACHE_DIR set before the
    server started is the operator's, and kept."""
    model = LocalExecutor(replace(compiled_plans["tiny"], compiled=False, pack_weights=False)).runners[0].model
    default = tmp_path / "torchinductor_default"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(default))  # where torch would write (it sets the variable)
    monkeypatch.setattr(compiled, "OWN_INDUCTOR_CACHE", False)
    # Two packages: the second built by a child process from the saved export, beside the first.
    compiled._compile(model, {tmp_path / "own" / "step.pt2": 0, tmp_path / "own" / "wide.pt2": compiled.WIDE_PACK_ROWS})
    assert sorted(p.name for p in (tmp_path / "own").iterdir()) == ["step.pt2", "wide.pt2"]
    assert all(p.stat().st_size > 0 for p in (tmp_path / "own").iterdir())
    assert not default.exists() or not any(default.iterdir())
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(default)
    monkeypatch.setattr(compiled, "OWN_INDUCTOR_CACHE", True)  # the operator's: the build writes there, untouched
    with compiled._inductor_cache(tmp_path / "unused"):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(default)
