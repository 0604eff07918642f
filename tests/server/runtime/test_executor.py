"""LocalExecutor: a sequence's tokens do not depend on its batch, its slot or the stage split."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import scheduler
from server.runtime.executor import LocalExecutor, make_executor
from server.runtime.stage import RuntimePlan, StageSpec, plan_from_program, torch_device_for
from server.runtime.sampling import GREEDY, SamplingParams
from server.runtime.step import StepBatch
from tests.server.helpers import OPTIONS, Seq, generate, hf_plan, random_prompt, run_step, step_logits

PARAMS = {
    "greedy": GREEDY,
    "sampled": SamplingParams(temperature=0.9, top_p=0.95, seed=1234),
}
# Companions: prompt lengths up to 200, so the batch attends 256 keys while the target
# alone attends 128 (step.MIN_KEY_BUCKET), and mixed sampling.
COMPANIONS = [
    (200, SamplingParams(temperature=1.2, top_k=20, seed=3)), (3, GREEDY),
    (77, SamplingParams(temperature=0.7, seed=9)), (1, GREEDY), (150, PARAMS["sampled"]),
    (31, SamplingParams(temperature=1.0, top_p=0.5, seed=5)), (64, GREEDY),
]
TARGET_PROMPT = random_prompt(40, seed=100)
NEW_TOKENS = 12
MOE = scheduler.ModelSpec("moe", vocab_size=512, hidden_size=64, intermediate_size=64, num_layers=2,
                          num_heads=4, num_kv_heads=2, num_experts=4, experts_per_token=2)
# Wide enough that bf16 linears reach oneDNN's kernels that change with the row count
# (hidden 512 x 1024, two blocks): without model.HALF_ROW_BLOCK the wide-bf16 case fails.
WIDE = scheduler.ModelSpec("wide", vocab_size=512, hidden_size=512, intermediate_size=1024, num_layers=2,
                           num_heads=8, num_kv_heads=4)


def one_stage_plan(spec: scheduler.ModelSpec, dtype: str = "fp32") -> RuntimePlan:
    return RuntimePlan(spec, dtype, OPTIONS.max_slots, OPTIONS.max_context,
                       (StageSpec(0, 0, spec.num_layers + 2, "cpu"),), seed=7)


def split_plan(plan: RuntimePlan, bounds: tuple[int, ...]) -> RuntimePlan:
    """The same plan with its layers cut at `bounds`: stages [0, b0), [b0, b1), ... on the CPU."""
    edges = (0, *bounds, plan.spec.num_layers + 2)
    return replace(plan, stages=tuple(StageSpec(i, a, b, "cpu") for i, (a, b) in enumerate(zip(edges, edges[1:]))))


@pytest.fixture(scope="module")
def plans(tiny_plan):
    return {"tiny": tiny_plan, "moe": one_stage_plan(MOE), "wide-bf16": one_stage_plan(WIDE, "bf16")}


def run_batched(plan: RuntimePlan, params: SamplingParams, bucket: int, slot: int) -> Seq:
    """The target with bucket - 1 companions: prefill chunks together, then decode together,
    the target's row moving every step."""
    executor = LocalExecutor(plan)
    target = Seq(slot, TARGET_PROMPT, params)
    free = [s for s in range(plan.slots) if s != slot]
    seqs = [target] + [Seq(free[i], random_prompt(n, seed=i), p) for i, (n, p) in enumerate(COMPANIONS[:bucket - 1])]
    step = 0
    while any(s.done < len(s.prompt) for s in seqs):
        prefilling = [s for s in seqs if s.done < len(s.prompt)]
        run_step(executor, prefilling[step % len(prefilling):] + prefilling[:step % len(prefilling)], bucket, 32)
        step += 1
    while len(target.out) < NEW_TOKENS:
        step += 1
        run_step(executor, seqs[step % bucket:] + seqs[:step % bucket], bucket, 1)
    return target


@pytest.mark.parametrize("params", PARAMS, ids=str)
@pytest.mark.parametrize("model", ["tiny", "moe", "wide-bf16"])
def test_tokens_and_logits_do_not_depend_on_batch_or_slot(plans, model, params):
    plan = plans[model]
    alone = generate(LocalExecutor(plan), 0, TARGET_PROMPT, NEW_TOKENS, PARAMS[params])
    for bucket, slot in ((2, 1), (4, 6), (8, 3)):
        batched = run_batched(plan, PARAMS[params], bucket, slot)
        assert batched.out == alone.out, f"bucket {bucket}"
        # Bitwise: every logit of every step, not just the argmax or the sampled token.
        assert all(torch.equal(a, b) for a, b in zip(alone.logits, batched.logits)), f"bucket {bucket}"


def test_sampled_tokens_differ_from_greedy(plans):
    # Guards the test above: the sampled target must really sample.
    greedy = generate(LocalExecutor(plans["tiny"]), 0, TARGET_PROMPT, NEW_TOKENS)
    sampled = generate(LocalExecutor(plans["tiny"]), 0, TARGET_PROMPT, NEW_TOKENS, PARAMS["sampled"])
    assert greedy.out != sampled.out


def _generate_with_step(executor: LocalExecutor, prompt: list[int], n: int, params: SamplingParams):
    """Through LocalExecutor.step itself: one prefill chunk, then decode."""
    result = executor.step(StepBatch("prefill", 1, 32, (2,), (tuple(prompt),), (0,), (params,)))
    out, results = list(result.token_ids), [result]
    while len(out) < n:
        results.append(executor.step(StepBatch("decode", 1, 1, (2,), ((out[-1],),), (len(prompt) + len(out) - 1,),
                                               (params,))))
        out.append(results[-1].token_ids[0])
    return out, results


@pytest.mark.parametrize("params", PARAMS, ids=str)
def test_stage_split_gives_the_same_tokens(tiny_plan, params):
    prompt = random_prompt(20, seed=5)
    one, _ = _generate_with_step(LocalExecutor(tiny_plan), prompt, 10, PARAMS[params])
    split = LocalExecutor(split_plan(tiny_plan, (2, 5)))  # embed + block 0 | blocks 1..3 | head
    three, results = _generate_with_step(split, prompt, 10, PARAMS[params])
    assert three == one
    assert all(len(r.stage_times_s) == 3 and r.step_time_s >= sum(r.stage_times_s) for r in results)


def test_stage_split_of_a_checkpoint_gives_the_same_logits(hf_checkpoint):
    _, folder = hf_checkpoint("llama")
    plan = hf_plan(folder)
    prompt = random_prompt(40, seed=6)
    one = generate(LocalExecutor(plan), 0, prompt, 8)
    for bounds in ((1,), (2, 3), (1, 2, 3, 4)):  # every cut of embed | 3 blocks | head
        split = generate(LocalExecutor(split_plan(plan, bounds)), 0, prompt, 8)
        assert split.out == one.out
        assert all(torch.equal(a, b) for a, b in zip(one.logits, split.logits))


def test_plan_reads_the_program():
    program = scheduler.compile(scheduler.get_model("tiny"), scheduler.parse_pool("lpu:1"), OPTIONS)
    plan = plan_from_program(program.view())
    assert (plan.slots, plan.max_context, plan.dtype) == (8, 256, "fp32")
    assert plan.stages[0].layer_start == 0 and plan.stages[-1].layer_end == plan.spec.num_layers + 2
    assert all(s.device == "cpu" and s.resource == "lpu" for s in plan.stages)  # simulated chips run on the host


def test_plan_refuses_int8_weights():
    options = replace(OPTIONS, dtype="int8")
    program = scheduler.compile(scheduler.get_model("tiny"), scheduler.parse_pool("cpu:1"), options)
    with pytest.raises(ValueError, match="int8"):
        plan_from_program(program.view())


def test_gpu_stage_needs_cuda():
    with pytest.raises(ValueError, match="no CUDA"):
        torch_device_for("gpu", 0, cuda_count=0)
    assert torch_device_for("gpu", 5, cuda_count=2) == "cuda:1"
    assert torch_device_for("simulated", 5, cuda_count=2) == torch_device_for("cpu", 0, cuda_count=2) == "cpu"


def test_unknown_executor_kind(tiny_plan):
    with pytest.raises(ValueError, match="unknown executor 'grpc'"):
        make_executor(tiny_plan, "grpc")


@pytest.mark.parametrize("params", PARAMS, ids=str)
def test_a_mixed_step_gives_each_row_what_it_gets_alone(tiny_plan, params):
    """Streams decode while the target's prompt goes in 16-token slices in the same steps
    (stall-free batching): every row's logits are bitwise those of its run alone."""
    executor = LocalExecutor(tiny_plan)
    companions = [Seq(s, random_prompt(n, seed=s), p) for s, (n, p) in zip((1, 4, 6), COMPANIONS)]
    for c in companions:  # prefilled, each with its first token
        while c.done < len(c.prompt):
            run_step(executor, [c], 1, 32)
    target = Seq(3, TARGET_PROMPT, PARAMS[params])
    while len(target.out) < NEW_TOKENS:
        if target.done < len(target.prompt):  # mixed: decode rows, then the slice
            rows = companions + [target]
            batch = StepBatch("mixed", 4, 16, tuple(s.slot for s in rows),
                              tuple(s.next_tokens(16) for s in rows), tuple(s.position for s in rows),
                              tuple(s.params for s in rows))
            logits, ids = step_logits(executor, batch)
            for row, s in enumerate(rows):
                s.done += len(s.next_tokens(16)) if s is target else 0
                if s.done == len(s.prompt):
                    s.out.append(ids[row])
                    s.logits.append(logits[row].clone())
        else:
            run_step(executor, companions + [target], 4, 1)
    alone = generate(LocalExecutor(tiny_plan), 3, TARGET_PROMPT, NEW_TOKENS, PARAMS[params], chunk=16)
    assert target.out == alone.out
    assert all(torch.equal(a, b) for a, b in zip(alone.logits, target.logits))
    for c in companions:
        ref = generate(LocalExecutor(tiny_plan), c.slot, c.prompt, len(c.out), c.params)
        assert c.out == ref.out and all(torch.equal(a, b) for a, b in zip(ref.logits, c.logits))


@pytest.mark.parametrize("order", ["in slot order", "scattered"])
def test_one_call_decode_attention_gives_each_row_its_per_row_result(tiny_plan, order, monkeypatch):
    """Decode rows attend in one call per key bucket and layer (model._attend_decode, over a
    view of the slots' range); each row's logits are bitwise those of attending it alone
    (model._attend_row), whether the rows' slots are in order or scattered with gaps."""
    from server.runtime import model

    slots = (0, 1, 2, 3) if order == "in slot order" else (6, 1, 4, 3)
    prompts = [random_prompt(n, seed=s) for s, n in zip(slots, (40, 3, 130, 17))]  # 128 and 256 keys

    def decode_logits(batched: bool) -> torch.Tensor:
        monkeypatch.setattr(model, "BATCHED_DECODE", batched)
        executor = LocalExecutor(tiny_plan)
        seqs = [Seq(slot, prompt, GREEDY) for slot, prompt in zip(slots, prompts)]
        for s in seqs:
            while s.done < len(s.prompt):
                run_step(executor, [s], 1, 32)
        logits, _ = step_logits(executor, StepBatch("decode", 4, 1, slots, tuple((s.out[-1],) for s in seqs),
                                                    tuple(s.position for s in seqs), (GREEDY,) * 4))
        return logits

    assert torch.equal(decode_logits(True), decode_logits(False))


@pytest.mark.parametrize("model", ["tiny", "wide-bf16"])
@pytest.mark.parametrize("order", ["in slot order", "scattered"])
def test_one_call_prompt_attention_gives_each_slice_its_per_row_result(plans, model, order, monkeypatch):
    """Prompt slices of different lengths and key buckets, packed in prefill steps, attend in
    one call per layer (model._attend_prompts: padded to the longest slice and the widest
    bucket, masked); every logit of every step is bitwise that of attending each slice alone
    (model._attend_row), in fp32 and in bf16, slots in order or scattered with gaps."""
    from server.runtime import model as runtime_model

    slots = (0, 1, 2, 3) if order == "in slot order" else (6, 1, 4, 3)
    lengths = (40, 3, 70, 17)  # slices of 2..32 tokens, keys 32..128 as they go in

    def prefill_logits(batched: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(runtime_model, "BATCHED_PROMPTS", batched)
        executor = LocalExecutor(plans[model])
        seqs = [Seq(slot, random_prompt(n, seed=slot)) for slot, n in zip(slots, lengths)]
        while any(s.done < len(s.prompt) for s in seqs):
            run_step(executor, [s for s in seqs if s.done < len(s.prompt)], 4, 32)
        run_step(executor, seqs, 4, 1)
        return [x for s in seqs for x in s.logits]

    batched, per_row = prefill_logits(True), prefill_logits(False)
    assert len(batched) == 8 and all(torch.equal(a, b) for a, b in zip(batched, per_row))
