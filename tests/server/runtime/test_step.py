"""StepBatch validation and its static-shape tensors."""

from __future__ import annotations

import pytest
import torch

from server.runtime.sampling import GREEDY
from scheduler.ticks import MIN_KEY_BUCKET
from server.runtime.step import StepBatch, full_batch, tensorize

SCRATCH = 8  # slots 0..7, scratch slot 8


def batch(phase="decode", bucket=4, chunk=1, slots=(0, 1), tokens=((5,), (6,)), positions=(3, 9), sampling=None):
    return StepBatch(phase, bucket, chunk, slots, tokens, positions, sampling or (GREEDY,) * len(slots))


@pytest.mark.parametrize("kw, message", [
    (dict(bucket=1), "2 rows do not fit a decode step of bucket 1"),
    (dict(phase="prefill", bucket=1, chunk=16, slots=tuple(range(9)), tokens=((1,),) * 9, positions=(0,) * 9),
     "9 rows do not fit a prefill step of bucket 1"),  # PREFILL_ROWS prompts at most
    (dict(phase="prefill", bucket=1, chunk=4, tokens=((1, 2, 3), (1, 2)), positions=(0, 0)),
     "5 prompt tokens do not fit a prefill step of 1 x 4"),
    (dict(phase="mixed", bucket=1, chunk=4, slots=(0, 1, 2), tokens=((1,), (1, 2, 3), (1, 2)), positions=(3, 0, 0)),
     "prompt slices of 4 tokens in all"),
    (dict(slots=(), tokens=(), positions=()), "0 rows"),
    (dict(slots=(3, 3)), r"slot ids repeat: \(3, 3\)"),
    (dict(tokens=((5, 6), (7,))), "1..1 tokens"),
    (dict(phase="prefill", chunk=4, tokens=((1, 2, 3, 4, 5), (1,))), "1..4 tokens"),
    (dict(tokens=((), (7,))), "1..1 tokens"),
    (dict(positions=(3,)), "one entry per row"),
    (dict(sampling=(GREEDY,)), "one entry per row"),
    (dict(phase="verify"), "phase must be one of"),
])
def test_bad_batches_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        batch(**kw)


def test_several_prompts_pack_into_one_prefill_chunk_or_mixed_slice():
    prefill = batch(phase="prefill", bucket=1, chunk=8, slots=(0, 1, 2), tokens=((1, 2, 3), (4, 5), (6,)),
                    positions=(0, 0, 0))
    assert (prefill.tokens, prefill.rows) == (8, 8)  # the shape of one 8-token prompt; PREFILL_ROWS logit rows
    t = tensorize(prefill, SCRATCH, 64)
    assert t.last_index.tolist() == [2, 4, 5] + [7] * 5
    assert t.write_slots.tolist() == [0, 0, 0, 1, 1, 2, SCRATCH, SCRATCH]
    mixed = batch(phase="mixed", bucket=2, chunk=8, slots=(0, 1, 2, 3), tokens=((1,), (2,), (3, 4, 5), (6, 7)),
                  positions=(9, 9, 0, 0))
    assert (mixed.tokens, mixed.rows) == (12, 8)  # 2 + 8 token rows; 2 decode + 4 slice logit rows


def test_a_full_prefill_batch_of_more_tokens_than_its_keys_packs_prompts_within_them():
    """What the calibration measures as a packed step (and the start-up, a prefill shape
    wider than its key bucket): rows of `end` tokens at position 0, the last one shorter."""
    b = full_batch("prefill", 1, 200, 32, 8)
    assert [len(t) for t in b.token_ids] == [32] * 6 + [8] and set(b.positions) == {0}
    assert b.slot_ids == tuple(range(7)) and (b.tokens, b.rows) == (200, 8)
    one = full_batch("prefill", 1, 24, 32, 8)  # within its keys: one prompt ending at the last key
    assert one.token_ids == ((1,) * 24,) and one.positions == (8,)


@pytest.mark.parametrize("slots, message", [((0, 8), "slot 8 outside"), ((-1, 0), "slot -1 outside")])
def test_slots_outside_the_cache_are_refused(slots, message):
    with pytest.raises(ValueError, match=message):  # slot -1 would otherwise alias the scratch slot
        tensorize(batch(slots=slots), SCRATCH, 64)


@pytest.mark.parametrize("positions, message", [((63, 64), "row 1: positions 64..64 outside the context of 64"),
                                                ((-1, 0), "row 0: positions -1..-1")])
def test_positions_past_the_context_are_refused(positions, message):
    with pytest.raises(ValueError, match=message):
        tensorize(batch(positions=positions), SCRATCH, 64)


def test_rows_are_packed_and_padding_goes_to_the_scratch_slot():
    t = tensorize(batch(phase="prefill", bucket=2, chunk=4, tokens=((1, 2, 3), (4,)), positions=(10, 0)), SCRATCH, 256)
    assert t.tokens.shape == (8,)  # bucket 2 x chunk 4 token rows (a multiple of model.ROW_MULTIPLE)
    assert t.tokens.tolist() == [1, 2, 3, 4, 0, 0, 0, 0]
    assert t.positions.tolist() == [10, 11, 12, 0, 0, 0, 0, 0]
    assert t.write_slots.tolist() == [0, 0, 0, 1] + [SCRATCH] * 4
    # (slot, keys, first token, tokens); a prefill step's keys from MIN_PROMPT_KEYS; padding attends nothing.
    assert t.attend == ((0, 32, 0, 3), (1, 32, 3, 1))
    assert t.last_index.tolist() == [2, 3] + [7] * 6  # logit rows: a prefill step's PREFILL_ROWS


@pytest.mark.parametrize("bucket, chunk, tokens", [(1, 64, 64), (1, 1, 4), (3, 1, 4), (8, 1, 8), (1, 30, 32)])
def test_a_prefill_chunk_runs_chunk_token_rows_not_four_times_as_many(bucket, chunk, tokens):
    phase = "prefill" if chunk > 1 else "decode"
    assert batch(phase=phase, bucket=bucket, chunk=chunk, slots=(0,), tokens=((1,),), positions=(0,)).tokens == tokens


@pytest.mark.parametrize("bucket, rows", [(1, 4), (2, 4), (4, 4), (5, 8), (8, 8)])
def test_rows_are_a_multiple_of_four(bucket, rows):
    assert batch(bucket=bucket, slots=(0,), tokens=((1,),), positions=(0,)).rows == rows


@pytest.mark.parametrize("longest, max_context, key_len", [
    (1, 1024, MIN_KEY_BUCKET), (128, 1024, 128), (129, 1024, 256), (600, 1024, 1024), (600, 700, 700), (20, 64, 64),
])
def test_keys_are_bucketed_to_powers_of_two(longest, max_context, key_len):
    t = tensorize(batch(slots=(0,), tokens=((1,),), positions=(longest - 1,)), SCRATCH, max_context)
    assert t.attend == ((0, key_len, 0, 1),)


def test_each_row_attends_its_own_key_bucket():
    t = tensorize(batch(slots=(0, 1), tokens=((1,), (2,)), positions=(10, 300)), SCRATCH, 1024)
    assert t.attend == ((0, 128, 0, 1), (1, 512, 1, 1))


def test_sample_positions():
    b = batch(phase="prefill", chunk=8, tokens=((1, 2, 3), (4,)), positions=(0, 20))
    assert b.sample_positions() == [3, 21]
    assert tensorize(b, SCRATCH, 64).to("cpu").tokens.dtype == torch.int64


def test_a_mixed_step_packs_decode_rows_then_the_prompt_slice():
    b = StepBatch("mixed", 2, 8, (0, 1, 5), ((7,), (8,), (1, 2, 3, 4, 5)), (20, 30, 16), (GREEDY,) * 3)
    assert (b.tokens, b.rows) == (12, 8)  # bucket 2 + slice 8 token rows; 2 + SLICE_ROWS logit rows -> 8
    t = tensorize(b, SCRATCH, 256)
    assert t.tokens.tolist() == [7, 8, 1, 2, 3, 4, 5] + [0] * 5
    assert t.attend == ((0, 128, 0, 1), (1, 128, 1, 1), (5, 128, 2, 5)) and t.last_index.tolist()[:3] == [0, 1, 6]
    assert b.sample_positions() == [21, 31, 21]


@pytest.mark.parametrize("tokens, message", [
    (((7,), (8,), (1, 2), (3,), (4,), (5,), (6,)), "7 rows do not fit a mixed step of bucket 2"),
    (((7,), (8,), (1, 2, 3, 4, 5), (3, 4, 5, 6)), "then up to 4 prompt slices of 8 tokens in all"),
    (((7, 9), (1, 2)), "one-token decode rows, then up to 4 prompt slices"),
    (((1, 2),), "one-token decode rows, then up to 4 prompt slices"),
])
def test_bad_mixed_steps_are_refused(tokens, message):
    n = len(tokens)
    with pytest.raises(ValueError, match=message):
        StepBatch("mixed", 2, 8, tuple(range(n)), tokens, (0,) * n, (GREEDY,) * n)
