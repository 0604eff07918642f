"""The tick scheduler: which sequences advance on the next lockstep tick. Pure: no
threads, clocks, torch or I/O, so the engine, the admission predictor and tests run the
same object (nano-vllm's schedule / run / postprocess split; docs/architecture.md has the whole loop).

    sched.add(seq)                 # FIFO queue, bounded by max_queue
    plan = sched.schedule()        # admits waiting seqs into free KV slots; picks the tick's work
    ... the engine runs plan on the executor ...
    outs = sched.update(plan, ids) # advances the rows; finished seqs free their slots
    sched.abort(seq)               # a cancel, from any state

Tick policy (static shapes): with only decoding seqs, a decode step of all of them,
padded to the smallest compiled bucket that holds them; with only prompts to fill, one
prefill chunk of the oldest (padded to the smallest slice shape that holds it); with both, a mixed step: every decoding seq plus a slice of
the oldest prompt, of the size the compiler chose for that bucket (`slices`), so every
running stream gets a token on every tick while prompts go in (stall-free batching, as
Sarathi-Serve and chunked prefill do). A program without mixed steps (`slices` empty)
alternates prefill and decode ticks instead.

Invariants: a seq is in exactly one of waiting, running (holding `slot`), or finished;
free slots + running slots = all slots; every decoding seq gets exactly one token per
decode tick; orderings are total (FIFO by `seq_id`, lowest free slot first), so the same
arrivals give the same ticks. Each plan names its compiled step (`TickPlan.key`: phase,
bucket, the key bucket its longest row attends, the slice shape), which the program times.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import NamedTuple

PREFILL, DECODE, MIXED = "prefill", "decode", "mixed"
MIN_KEY_BUCKET = 128  # smallest attended-key length: keys are bucketed to powers of two
MIN_SLICE = 4  # prompt tokens: slices are 4, 8, 16, ... (the matmul row multiple), up to the prefill chunk


def key_bucket(context: int, max_context: int) -> int:
    """Keys a row attends: a power of two >= its context, >= MIN_KEY_BUCKET, <= max_context."""
    return min(max(MIN_KEY_BUCKET, 1 << (context - 1).bit_length()), max_context)


def key_buckets(max_context: int) -> list[int]:
    """Every key bucket a program with this context admits: 128, 256, ..., max_context."""
    out, k = [], MIN_KEY_BUCKET
    while k < max_context:
        out.append(k)
        k *= 2
    return out + [max_context]


def slice_sizes(chunk: int) -> list[int]:
    """The static prompt-slice shapes of prefill and mixed steps: 4, 8, 16, ... and the chunk."""
    return sorted({min(MIN_SLICE << k, chunk) for k in range(chunk.bit_length()) if MIN_SLICE << k < 2 * chunk})


def slice_shape(tokens: int, chunk: int) -> int:
    """The smallest slice shape that holds `tokens` prompt tokens (<= chunk)."""
    return next(p for p in slice_sizes(chunk) if p >= tokens)


class StepKey(NamedTuple):
    """A compiled step shape, which the program times: `tokens` is 1 for decode, else the
    prompt slice's static shape; `keys` the key bucket the longest row attends."""

    phase: str
    batch: int
    keys: int
    tokens: int


@dataclass(eq=False)
class Seq:
    """One request as the scheduler sees it (token contents stay with the engine)."""

    seq_id: int  # arrival order: the FIFO tie-break
    prompt_len: int
    max_tokens: int
    stop_ids: frozenset[int] = frozenset()
    slot: int = -1
    prefilled: int = 0  # prompt tokens in the KV cache
    generated: int = 0  # tokens sampled
    finish_reason: str | None = None  # length | stop | aborted

    @property
    def decoding(self) -> bool:
        return self.prefilled == self.prompt_len


@dataclass(frozen=True)
class TickPlan:
    phase: str  # prefill | decode | mixed
    bucket: int  # compiled batch size the step is padded to (mixed: of its decode rows)
    rows: tuple[Seq, ...]  # decode: every decoding seq; prefill: the one seq; mixed: both, the prompt last
    start: int = 0  # prefill, mixed: the slice's first prompt position
    length: int = 1  # prefill, mixed: the slice's tokens (<= chunk or the bucket's slice); decode: 1
    keys: int = MIN_KEY_BUCKET  # the key bucket of the row that attends the most keys
    shape: int = 1  # static prompt tokens of the step: slice_shape(length) or the bucket's slice; decode: 1

    @property
    def key(self) -> StepKey:
        """The compiled step this tick runs: what its duration is looked up by."""
        return StepKey(self.phase, self.bucket, self.keys, self.shape)

    def is_slice(self, i: int) -> bool:
        """Whether row i carries prompt tokens (the others decode one token)."""
        return self.phase == PREFILL or (self.phase == MIXED and i == len(self.rows) - 1)


@dataclass(frozen=True)
class Output:
    seq: Seq
    token: int | None  # None: a prefill slice that did not finish the prompt
    finish_reason: str | None


@dataclass
class TickScheduler:
    max_slots: int
    max_context: int
    chunk: int  # prompt tokens per prefill tick
    buckets: tuple[int, ...]  # compiled decode batch sizes, ascending
    max_queue: int = 64
    slices: dict[int, int] = field(default_factory=dict)  # decode bucket -> mixed step's prompt slice
    waiting: deque[Seq] = field(default_factory=deque)
    running: list[Seq] = field(default_factory=list)  # in admission order
    free_slots: list[int] = field(default_factory=list)
    last_phase: str = DECODE

    def __post_init__(self):
        if not self.buckets or list(self.buckets) != sorted(self.buckets) or self.buckets[-1] < self.max_slots:
            raise ValueError(f"buckets must ascend to at least max_slots={self.max_slots}, got {self.buckets}")
        if self.slices and (set(self.slices) != set(self.buckets) or min(self.slices.values()) < 1):
            raise ValueError(f"slices must give a prompt slice >= 1 for every bucket {self.buckets}, got {self.slices}")
        if min(self.max_slots, self.max_context, self.chunk) < 1 or self.max_queue < 0:
            raise ValueError("max_slots, max_context and chunk must be >= 1 and max_queue >= 0")
        if not self.free_slots and not self.running:
            self.free_slots = list(range(self.max_slots))

    # -- requests ---------------------------------------------------------------------
    def add(self, seq: Seq) -> None:
        """Queues `seq`; OverflowError when max_queue seqs already wait."""
        if len(self.waiting) >= self.max_queue:
            raise OverflowError(f"queue full ({self.max_queue} waiting)")
        self.waiting.append(seq)

    def abort(self, seq: Seq) -> bool:
        """Removes `seq` wherever it is (freeing its slot); False if it already ended."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self._release(seq)
        else:
            return False
        seq.finish_reason = seq.finish_reason or "aborted"
        return True

    def idle(self) -> bool:
        return not self.waiting and not self.running

    def clone(self) -> TickScheduler:
        """An independent copy (seqs copied too) for running forward without side effects."""
        return TickScheduler(self.max_slots, self.max_context, self.chunk, self.buckets, self.max_queue, self.slices,
                             deque(replace(s) for s in self.waiting), [replace(s) for s in self.running],
                             list(self.free_slots), self.last_phase)

    def bucket_for(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    # -- ticks ------------------------------------------------------------------------
    def schedule(self) -> TickPlan | None:
        """Admits waiting seqs into free slots (FIFO, lowest slot first), then returns the
        tick's work, or None when nothing runs."""
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop(0)
            self.running.append(seq)
        prefilling = [s for s in self.running if not s.decoding]
        decoding = [s for s in self.running if s.decoding]
        keys = max((key_bucket(s.prompt_len + s.generated, self.max_context) for s in decoding), default=0)
        if prefilling and decoding and self.slices:
            seq, bucket = prefilling[0], self.bucket_for(len(decoding))
            n = min(self.slices[bucket], seq.prompt_len - seq.prefilled)
            keys = max(keys, key_bucket(seq.prefilled + n, self.max_context))
            return TickPlan(MIXED, bucket, (*decoding, seq), seq.prefilled, n, keys, self.slices[bucket])
        if prefilling and (not decoding or self.last_phase == DECODE):
            seq = prefilling[0]
            n = min(self.chunk, seq.prompt_len - seq.prefilled)
            return TickPlan(PREFILL, 1, (seq,), seq.prefilled, n, key_bucket(seq.prefilled + n, self.max_context),
                            slice_shape(n, self.chunk))
        if decoding:
            return TickPlan(DECODE, self.bucket_for(len(decoding)), tuple(decoding), keys=keys)
        return None

    def update(self, plan: TickPlan, tokens: dict[int, int] | None = None) -> list[Output]:
        """Advances the plan's rows by what the step did. `tokens`: seq_id -> sampled id
        for the rows that sampled (None: all did, ids unknown, as in a simulation). A row
        missing from `tokens` failed and must be aborted by the caller."""
        self.last_phase = plan.phase
        outs = []
        for i, seq in enumerate(plan.rows):
            if seq not in self.running:
                continue  # aborted during the step
            if tokens is not None and seq.seq_id not in tokens:
                continue
            if plan.is_slice(i):
                seq.prefilled += plan.length
                if not seq.decoding:
                    outs.append(Output(seq, None, None))
                    continue
            token = None if tokens is None else tokens[seq.seq_id]
            seq.generated += 1
            reason = self._finish_reason(seq, token)
            if reason is not None:
                seq.finish_reason = reason
                self._release(seq)
            outs.append(Output(seq, token, reason))
        return outs

    def _finish_reason(self, seq: Seq, token: int | None) -> str | None:
        if token is not None and token in seq.stop_ids:
            return "stop"
        if seq.generated >= seq.max_tokens or seq.prompt_len + seq.generated >= self.max_context:
            return "length"
        return None

    def _release(self, seq: Seq) -> None:
        self.running.remove(seq)
        self.free_slots.append(seq.slot)
        self.free_slots.sort()  # lowest free slot first: deterministic placement
