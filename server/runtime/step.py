"""The step contract between the engine and an executor: plain frozen dataclasses.

The engine says which sequences (by KV slot) advance by which tokens; the executor pads
the batch to the compiled bucket's static shape, runs every stage, samples, and says
what each stage cost. Neither side holds the other's objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scheduler.ticks import MIN_KEY_BUCKET, MIN_PROMPT_KEYS, PREFILL, PREFILL_ROWS, SLICE_ROWS, key_bucket
from server.runtime.model import ROW_MULTIPLE
from server.runtime.sampling import GREEDY, SamplingParams

PHASES = ("prefill", "decode", "mixed")


class ExecutorFailed(RuntimeError):
    """The executor itself is broken (a stage actor died, a device failed, a step timed
    out), not one row of the batch: the engine cannot go on and stops. Any other
    exception from `step` is taken as one row's fault and isolated (see engine._tick)."""


@dataclass(frozen=True)
class StepBatch:
    """One step. prefill: prompt slices, `bucket` x `chunk` tokens in all, in up to
    max(`bucket`, PREFILL_ROWS) rows (several prompts packed into one chunk); decode:
    `bucket` rows of one token; mixed: up to `bucket` decoding rows of one token, then up
    to SLICE_ROWS rows of prompt slices, `chunk` tokens in all (stall-free batching:
    running streams advance while prompts go in)."""

    phase: str  # prefill | decode | mixed
    bucket: int  # compiled batch size this step is padded to (mixed: its decode rows)
    chunk: int  # static tokens per row: 1 for decode, the prefill chunk, or mixed's prompt slice
    slot_ids: tuple[int, ...]  # KV slot of each real row
    token_ids: tuple[tuple[int, ...], ...]  # each row's new tokens (1 for decode, <= chunk for prefill)
    positions: tuple[int, ...]  # position of each row's first new token
    sampling: tuple[SamplingParams, ...]

    def __post_init__(self):
        n = len(self.slot_ids)
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if not len(self.token_ids) == len(self.positions) == len(self.sampling) == n:
            raise ValueError("slot_ids, token_ids, positions and sampling must have one entry per row")
        if any(not 0 < len(t) <= self.chunk for t in self.token_ids):
            raise ValueError(f"each row needs 1..{self.chunk} tokens")
        rows = {"prefill": max(self.bucket, PREFILL_ROWS), "decode": self.bucket, "mixed": self.bucket + SLICE_ROWS}
        if not 0 < n <= rows[self.phase]:
            raise ValueError(f"{n} rows do not fit a {self.phase} step of bucket {self.bucket}")
        total = sum(map(len, self.token_ids))
        if self.phase == "prefill" and total > self.bucket * self.chunk:
            raise ValueError(f"{total} prompt tokens do not fit a prefill step of {self.bucket} x {self.chunk}")
        if self.phase == "mixed":
            # Its decode rows lead; a one-token slice may follow them (the last token of a prompt).
            decode = min(next((i for i, t in enumerate(self.token_ids) if len(t) != 1), n), self.bucket, n - 1)
            if decode < 1 or n - decode > SLICE_ROWS or total - decode > self.chunk:
                raise ValueError(f"a mixed step is 1..{self.bucket} one-token decode rows, then up to {SLICE_ROWS} "
                                 f"prompt slices of {self.chunk} tokens in all")
        if len(set(self.slot_ids)) != n:
            raise ValueError(f"slot ids repeat: {self.slot_ids}")

    @property
    def rows(self) -> int:
        """Logit rows: the bucket (mixed: and SLICE_ROWS slices; prefill: at least
        PREFILL_ROWS packed prompts) rounded up to the matmul row multiple (see model.ROW_MULTIPLE)."""
        if self.phase == "mixed":
            return _round_up(self.bucket + SLICE_ROWS)
        return _round_up(self.bucket if self.phase == "decode" else max(self.bucket, PREFILL_ROWS))

    @property
    def tokens(self) -> int:
        """Token rows of the step's static shape: bucket x chunk, rounded up to the row
        multiple. Rows' tokens are packed one after another (no per-row padding to the
        chunk: a prefill chunk of 64 runs 64 token rows, not the 4 x 64 of a [4, 64]
        batch), the rest is padding that writes to the scratch slot."""
        if self.phase == "mixed":
            return _round_up(self.bucket + self.chunk)
        return _round_up(self.bucket * self.chunk)

    def sample_positions(self) -> list[int]:
        """Position of the token each row samples next."""
        return [p + len(t) for p, t in zip(self.positions, self.token_ids)]


@dataclass(frozen=True)
class StepResult:
    token_ids: tuple[int, ...]  # one sampled id per real row
    stage_times_s: tuple[float, ...]  # measured per stage, seconds
    step_time_s: float  # the whole step as the executor saw it, seconds


def _round_up(n: int) -> int:
    return -(-n // ROW_MULTIPLE) * ROW_MULTIPLE


@dataclass
class StepTensors:
    """StepBatch as static-shape tensors, tokens packed row after row (varlen, as
    FlashAttention's varlen API lays them out); on the host, each stage moves them to its
    device. N = StepBatch.tokens, R = StepBatch.rows."""

    tokens: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    write_slots: torch.Tensor  # [N] int64: padding goes to the scratch slot
    last_index: torch.Tensor  # [R] int64: index in [0, N) of each row's last real token (padding rows: N - 1)
    # (slot, keys attended, first token index, tokens) per real row: keys is a power of
    # two >= the row's context (>= MIN_KEY_BUCKET, in a prefill step >= MIN_PROMPT_KEYS;
    # <= max_context), so a row's work depends on itself alone.
    attend: tuple[tuple[int, int, int, int], ...]

    def to(self, device) -> "StepTensors":
        if self.tokens.device == torch.device(device):
            return self
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return StepTensors(move(self.tokens), move(self.positions), move(self.write_slots),
                           move(self.last_index), self.attend)


def tensorize(batch: StepBatch, scratch_slot: int, max_context: int) -> StepTensors:
    n_tokens = batch.tokens
    tokens = torch.zeros(n_tokens, dtype=torch.int64)
    positions = torch.zeros(n_tokens, dtype=torch.int64)
    write_slots = torch.full((n_tokens,), scratch_slot, dtype=torch.int64)
    last_index = torch.full((batch.rows,), n_tokens - 1, dtype=torch.int64)
    attend, at = [], 0
    least = MIN_PROMPT_KEYS if batch.phase == PREFILL else MIN_KEY_BUCKET
    for r, (slot, toks, pos) in enumerate(zip(batch.slot_ids, batch.token_ids, batch.positions)):
        n = len(toks)
        # Checked here, not by indexing: slot -1 would silently use the scratch slot and
        # -2 another sequence's cache (negative indices wrap).
        if not 0 <= slot < scratch_slot:
            raise ValueError(f"row {r}: slot {slot} outside the KV slots 0..{scratch_slot - 1}")
        if pos < 0 or pos + n > max_context:
            raise ValueError(f"row {r}: positions {pos}..{pos + n - 1} outside the context of {max_context}")
        tokens[at:at + n] = torch.tensor(toks, dtype=torch.int64)
        positions[at:at + n] = torch.arange(pos, pos + n)
        write_slots[at:at + n] = slot
        last_index[r] = at + n - 1
        attend.append((slot, key_bucket(pos + n, max_context, least), at, n))
        at += n
    return StepTensors(tokens, positions, write_slots, last_index, tuple(attend))


def full_batch(phase: str, bucket: int, tokens: int, end: int, max_slots: int, slice_end: int = 0) -> StepBatch:
    """A compiled shape with every row real (slots 0, 1, ...), for measuring it: each row's
    `tokens` new tokens end at position `end` - 1; mixed: min(bucket, max_slots - 1) one-token
    decode rows ending at `end` (the prompt holds a slot), then a `tokens` slice ending at
    `slice_end` (default `end`). A prefill step of more tokens than `end` (a prefill step
    packing several prompts, each within its key bucket `end`): rows of `end` tokens (the
    last one shorter) at position 0, as many as the tokens need."""
    if phase == "prefill" and bucket == 1 and tokens > end:
        lens = [end] * (tokens // end) + ([tokens % end] if tokens % end else [])
        return StepBatch(phase, 1, tokens, tuple(range(len(lens))), tuple((1,) * n for n in lens),
                         (0,) * len(lens), (GREEDY,) * len(lens))
    if phase != "mixed":
        rows = range(bucket)
        return StepBatch(phase, bucket, tokens, tuple(rows), tuple((1,) * tokens for _ in rows),
                         tuple(end - tokens for _ in rows), tuple(GREEDY for _ in rows))
    rows = range(min(bucket, max_slots - 1) + 1)
    return StepBatch(phase, bucket, tokens, tuple(rows), tuple((1,) for _ in rows[:-1]) + ((1,) * tokens,),
                     tuple(end - 1 for _ in rows[:-1]) + ((slice_end or end) - tokens,), tuple(GREEDY for _ in rows))
