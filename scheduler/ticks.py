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
prefill step packing the oldest prompts (up to PREFILL_ROWS of them, `chunk` tokens in all,
padded to the smallest slice shape that holds them); with both, a mixed step: every
decoding seq plus slices of the oldest prompts, `slices[bucket]` tokens in all (the size
the compiler chose for that bucket), so every running stream gets a token on every tick
while prompts go in (stall-free batching, as Sarathi-Serve and chunked prefill do). A
program without mixed steps (`slices` empty) alternates prefill and decode ticks instead.

Promises (`tick_s` set: deterministic serving; docs/architecture.md, "Promises per
request"): each seq carries the TPOT it was promised (`cadence_s`), and ticks follow the
work (each lasts its own paced step, `tick_s(plan.key)`), so no tick may last longer than
the cadence of any seq holding a slot (`fits`): a waiting seq takes a slot only when the
decode tick with it keeps every cadence, and prompt slices go in beside decoding seqs only
when the mixed tick does; otherwise they wait (FIFO, no overtaking).
Every tick is then no longer than any running stream's cadence, so each of its tokens is
computed no later than promised, whoever arrives later. A stream banks what its ticks leave
of its cadence (`Seq.slack_s`: a decode tick shorter than the cadence it was promised), and
a longer tick fits when its banked slack covers the excess: a cadence below the mixed tick
(`join_share` < 1) lets a prompt go in beside the stream once it has banked the room, so
the stream is not promised the mixed tick on every token (docs/architecture.md, "Joins paid
from slack").

Arrival groups (`Seq.group`: requests admitted together in one admission window, when
they found the server idle): a member that has its first token but has not decoded yet
is held back while a running member of its group still has prompt to go in, so a burst's
prompts go in by whole prefill steps (up to PREFILL_ROWS prompts, `chunk` tokens each) and
then decode together, instead of the first one decoding while the others trickle in as
mixed-step slices; meanwhile no other prompt goes in (a later arrival must not make the
group's prefill steps longer than its promises counted on). Their promises come from running this forward
(scheduler/simulate.promise_group): the first token of a member is promised when its
stream can go on at its cadence.

Invariants: a seq is in exactly one of waiting, running (holding `slot`), or finished;
free slots + running slots = all slots; every decoding seq not held by its group gets exactly one token
per decode tick; orderings are total (FIFO by `seq_id`, lowest free slot first), so the same
arrivals give the same ticks. Each plan names its compiled step (`TickPlan.key`: phase,
bucket, the key bucket its longest row attends, the slice shape), which the program times.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple

PREFILL, DECODE, MIXED = "prefill", "decode", "mixed"
MIN_KEY_BUCKET = 128  # smallest attended-key length: keys are bucketed to powers of two
# Prefill steps (prompt slices alone) attend from 32 keys: a fresh 25-token prompt's step
# attended 128 keys, 4/5 of them masked, and attention is a third of a prompt step
# (docs/architecture.md, "Prompt keys"). Decode and mixed steps keep MIN_KEY_BUCKET.
MIN_PROMPT_KEYS = 32
MIN_SLICE = 4  # prompt tokens: slices are 4, 8, 12, 16, 24, ... (multiples of the matmul row multiple), up to the chunk
# Prompts one mixed step packs at most: its logit rows are padded to a multiple of 4
# (server/runtime/model.ROW_MULTIPLE), so up to 4 prompt rows cost no extra shape.
SLICE_ROWS = 4
# Prompts one prefill step packs at most: as many as the largest bucket (8 slots), so a
# burst of eight short prompts can go in by one step where the chunk holds them
# (`--prefill-chunk 256`; the default 64 holds two or three of 25 tokens: the chunk
# decides, docs/architecture.md, "Prompts packed"). A prefill step's cost is its
# tokens, not its rows (the logit rows, 8 against 4, are the LM head's: the same weights
# read once), and the tokens of eight 25-token prompts in one step cost less than in four
# (docs/compiled-steps.md: 4 x 44 tokens 87-90 ms, against 40-43 for 64).
PREFILL_ROWS = 8
# The share of the mixed tick's excess over the decode tick that a stream promised in company
# pays on every token (`company_cadence`; `serve --join-share`): prompts go in beside it as its
# banked slack allows, at most one mixed tick in two at a full house. Measured against 1.0
# (the longest tick on every token; BENCHMARKS.md, "Twenty-second session"): `lockstep
# simulate` of this host's pace record, c=8 closed loop 68.3 tokens/s against 58.9, 2 req/s
# (gamma 4) 56.2 against 54.3, first tokens at c=8 p50 560 against 488 ms; 0.25: c=8 59.3
# tokens/s, its first tokens p50 1767 ms (joins starve). Served side by side, c=8 69.3
# against 57.7 tokens/s in the second of two runs (the first: 55.7 against 61.0, its pace
# factors apart), 0.25 73.1 against 61.0.
JOIN_SHARE = 0.5


def company_cadence(decode_s: float, join_s: float, share: float = JOIN_SHARE) -> float:
    """The TPOT in company: the longest decode tick and `share` of what the longest tick that
    lets a prompt in (mixed, or a prefill tick beside the decode ticks) takes past it."""
    return decode_s + share * max(0.0, join_s - decode_s)


def queue_is_full(waiting: int, free_slots: int, max_queue: int) -> bool:
    """Whether `max_queue` requests already wait beyond the `free_slots` (those the next
    schedule gives to the first waiting): a burst that arrives faster than the ticks take
    it in still finds max_slots + max_queue places, not max_queue and the few slots its
    first tick took. The one bound of the scheduler (`TickScheduler.full`), the engines
    (server/core/engine.py) and the simulations."""
    return waiting >= max_queue + free_slots


CADENCE_ULP = 1 + 1e-9  # relative slack when a tick is compared with a promised cadence


def key_bucket(context: int, max_context: int, least: int = MIN_KEY_BUCKET) -> int:
    """Keys a row attends: a power of two >= its context, >= `least` (MIN_KEY_BUCKET; a
    prefill step's rows: MIN_PROMPT_KEYS), <= max_context."""
    return min(max(least, 1 << (context - 1).bit_length()), max_context)


def prompt_keys(context: int, max_context: int) -> int:
    """Keys a row of a prefill step attends (`key_bucket` from MIN_PROMPT_KEYS)."""
    return key_bucket(context, max_context, MIN_PROMPT_KEYS)


def key_buckets(max_context: int, least: int = MIN_KEY_BUCKET) -> list[int]:
    """Every key bucket a program with this context admits: 128, 256, ..., max_context
    (a prefill step's, from `least` = MIN_PROMPT_KEYS: 32, 64, 128, ...)."""
    out, k = [], least
    while k < max_context:
        out.append(k)
        k *= 2
    return out + [max_context]


def slice_sizes(chunk: int) -> list[int]:
    """The static prompt-slice shapes of prefill and mixed steps: 4, 8, then 1.5x steps
    (12, 16, 24, 32, 48, 64, ...) and the chunk. A prompt pads to at most 1.33x its tokens,
    not 2x: smollm2-135m's 35-token prompt went into a 64-token step (120-130 ms measured
    here), now a 48 (93-110 ms), and a mixed tick's slice can grow by half a step, not only
    double."""
    steps = [MIN_SLICE] + [p for k in range(chunk.bit_length()) for p in (MIN_SLICE << k << 1, 3 * (MIN_SLICE << k))]
    return sorted({p for p in steps if p < chunk} | {chunk})


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
    cadence_s: float = 0.0  # the TPOT it was promised, wall seconds (0: none; it bounds no tick)
    # The paced tick table its promise was made with (None: the scheduler's `tick_s`).
    ticks: Callable[[StepKey], float] | None = field(default=None, repr=False, compare=False)
    # Arrivals admitted together (one admission window; -1: none): a member that has not
    # decoded yet waits while a running member of its group still has prompt to go in, so
    # the group's prompts go in by whole prefill steps, not slices beside its first streams.
    group: int = -1
    # Schedule seconds its tokens so far came before their promises (its cadence less the
    # ticks between its tokens, summed from its first token), and seconds of ticks since its
    # last token: a tick longer than the cadence fits while the slack covers the excess.
    slack_s: float = 0.0
    gap_s: float = 0.0

    @property
    def decoding(self) -> bool:
        return self.prefilled == self.prompt_len

    @property
    def final_context(self) -> int:
        """Positions it holds at most: the prompt and every token it may generate."""
        return self.prompt_len + self.max_tokens


@dataclass(frozen=True)
class TickPlan:
    phase: str  # prefill | decode | mixed
    bucket: int  # compiled batch size the step is padded to (mixed: of its decode rows)
    rows: tuple[Seq, ...]  # decoding seqs, then the seqs with prompt slices (prefill: slices only)
    spans: tuple[tuple[int, int], ...] = ()  # (first position, tokens) of each slice row, in row order
    keys: int = MIN_KEY_BUCKET  # the key bucket of the row that attends the most keys
    shape: int = 1  # static prompt tokens of the step: slice_shape(tokens) or the bucket's slice; decode: 1

    @property
    def key(self) -> StepKey:
        """The compiled step this tick runs: what its duration is looked up by."""
        return StepKey(self.phase, self.bucket, self.keys, self.shape)

    @property
    def decoding(self) -> int:
        """Rows that decode one token (the first ones)."""
        return len(self.rows) - len(self.spans)

    def is_slice(self, i: int) -> bool:
        """Whether row i carries prompt tokens (the others decode one token)."""
        return i >= self.decoding

    def span(self, i: int) -> tuple[int, int]:
        """(first position, tokens) of slice row i."""
        return self.spans[i - self.decoding]

    def samples(self, i: int) -> bool:
        """Whether row i samples a token: a decode row, or a slice that ends its prompt."""
        return not self.is_slice(i) or sum(self.span(i)) >= self.rows[i].prompt_len

    def samples_for(self, group: int) -> bool:
        """Whether this tick samples a token for a member of arrival group `group` (its
        admission window closes at the first such tick: engine and simulation alike)."""
        return any(seq.group == group and self.samples(i) for i, seq in enumerate(self.rows))


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
    # Paced wall seconds of each step shape (scheduler/simulate.py, `paced_ticks`): set, the
    # seqs' promised cadences bound the ticks (see the module's doc); None: no promises.
    tick_s: Callable[[StepKey], float] | None = None
    # A request that arrives alone is promised the longest tick as in company (False: a
    # burst after a quiet spell does not wait for its first), or its own decode step (True).
    alone_own_step: bool = False
    # Set by the caller before a promise (this object has no clock): a stream admitted
    # earlier is still being handed out, its promised end later than now, so an arrival
    # that finds nothing running or waiting is not alone: the others of a closed loop come
    # back one by one as their streams end (scheduler/simulate.promise_cadence).
    delivering: bool = False
    # The share of the longest mixed (or prefill) tick's excess over the longest decode tick
    # that a stream promised in company pays on every token (scheduler/simulate.group_cadence):
    # 1.0, the longest tick (no tick ever needs slack); below it, a prompt goes in beside a
    # stream only as its banked slack allows (`fits`).
    join_share: float = JOIN_SHARE

    def __post_init__(self):
        if not self.buckets or list(self.buckets) != sorted(self.buckets) or self.buckets[-1] < self.max_slots:
            raise ValueError(f"buckets must ascend to at least max_slots={self.max_slots}, got {self.buckets}")
        if self.slices and (set(self.slices) != set(self.buckets) or min(self.slices.values()) < 1):
            raise ValueError(f"slices must give a prompt slice >= 1 for every bucket {self.buckets}, got {self.slices}")
        if not 0 <= self.join_share <= 1:
            raise ValueError(f"join_share must be in [0, 1], got {self.join_share}")
        if min(self.max_slots, self.max_context, self.chunk) < 1 or self.max_queue < 0:
            raise ValueError("max_slots, max_context and chunk must be >= 1 and max_queue >= 0")
        if not self.free_slots and not self.running:
            self.free_slots = list(range(self.max_slots))

    # -- requests ---------------------------------------------------------------------
    def full(self, free_slots: int | None = None) -> bool:
        """`queue_is_full` for this scheduler; `free_slots`: the count during the tick the
        arrival came in, for a caller that takes arrivals only after the tick's `update`
        (scheduler/simulate.py)."""
        return queue_is_full(len(self.waiting), len(self.free_slots) if free_slots is None else free_slots,
                          self.max_queue)

    def add(self, seq: Seq) -> None:
        """Queues `seq`; OverflowError when the queue is `full`."""
        if self.full():
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
                             list(self.free_slots), self.last_phase, self.tick_s, self.alone_own_step,
                             self.delivering, self.join_share)

    def bucket_for(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    # -- ticks ------------------------------------------------------------------------
    def fits(self, *keys: StepKey, joining: Seq | None = None, started: bool = False) -> bool:
        """Whether a gap of these ticks (one after another) in the running seqs' streams, and
        in `joining`'s, keeps every promised cadence, each at the pace its promise was made
        at (`Seq.ticks`: a later re-pace does not tighten or loosen an earlier promise)."""
        if self.tick_s is None:
            return True
        # A tick now (`started`): the running seqs past their first token; one still before it
        # has no gap between tokens at stake (its first token's promise is where the scheduler
        # run forward made it). A decode tick to come (a joiner's): every running seq.
        running = (s for s in self.running if s.generated or not started)
        for seq in (*running, *((joining,) if joining is not None else ())):
            # CADENCE_ULP: a cadence that went through a promise's (TTFT, e2e) round trip is
            # the longest tick give or take a rounding; without it that tick was refused
            # (the server's waves at c=8, first tokens up to 1.3 s past their promise).
            # A tick now may spend the seq's banked slack; a decode tick to come may not: it is
            # every tick from then on (a joiner's batch), and each must keep the cadence.
            room = seq.cadence_s + max(0.0, seq.slack_s) - seq.gap_s if started else seq.cadence_s
            if seq.cadence_s > 0 and sum(self.tick_for(seq, key) for key in keys) > room * CADENCE_ULP:
                return False
        return True

    def tick_for(self, seq: Seq, key: StepKey) -> float:
        """Seconds of tick `key` at the pace `seq`'s promise was made at (0 without promises)."""
        ticks = seq.ticks or self.tick_s
        return ticks(key) if ticks is not None and seq.cadence_s > 0 else 0.0

    def bank(self, plan: TickPlan, ticks: int = 1) -> None:
        """Books `ticks` ticks of `plan` (before `update` applies its last one, or a run
        skipped at once) into the slack of every running seq past its first token: each tick
        adds to its gap, and each token it samples banks its cadence less the gap."""
        rows = {id(s) for i, s in enumerate(plan.rows) if not plan.is_slice(i)}
        gates = self._gates()  # as `schedule` saw them
        for seq in self.running:
            if seq.cadence_s <= 0 or seq.generated < 1:
                continue
            if self._held(seq, gates):
                # Held back by its group (`schedule`): its next token is promised a cadence after
                # the group's prompts are in (simulate.promise_group), so the hold is no gap in its
                # stream. Booked as one, a held member's slack went below zero by the group's prefill
                # ticks and stayed there for ~24 ticks, and no prompt could go in beside the group
                # until it ended: a burst's three stragglers waited 0.9-1.1 s for their first tokens.
                continue
            tick = self.tick_for(seq, plan.key)
            if id(seq) in rows:  # it samples on each of them
                seq.slack_s += ticks * seq.cadence_s - seq.gap_s - ticks * tick
                seq.gap_s = 0.0
            else:
                seq.gap_s += ticks * tick

    def _gates(self) -> set[int]:
        """The arrival groups with a running member whose prompt still has tokens to go in."""
        return {s.group for s in self.running if s.group >= 0 and not s.decoding}

    @staticmethod
    def _held(seq: Seq, gates: set[int]) -> bool:
        """Whether `seq` is held back by its group (`gates`): it has its first token, not a decoded one."""
        return seq.group in gates and seq.generated <= 1

    def _may_enter(self, seq: Seq) -> bool:
        """Whether `seq` may take a slot now: the decode tick of every running seq and it,
        at the key bucket the longest of them may reach, keeps every cadence."""
        if self.tick_s is None or not self.running:
            return True
        keys = key_bucket(max(s.final_context for s in (*self.running, seq)), self.max_context)
        return self.fits(StepKey(DECODE, self.bucket_for(len(self.running) + 1), keys, 1), joining=seq)

    def schedule(self) -> TickPlan | None:
        """Admits waiting seqs into free slots (FIFO, lowest slot first, while promises
        allow), then returns the tick's work, or None when nothing runs."""
        while self.waiting and self.free_slots and self._may_enter(self.waiting[0]):
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop(0)
            self.running.append(seq)
        prefilling = [s for s in self.running if not s.decoding]
        gates = self._gates()
        if gates:  # the group's prompts first: a later arrival's must not delay the group's start
            prefilling = [s for s in prefilling if s.group in gates]
        decoding = [s for s in self.running if s.decoding and not self._held(s, gates)]
        keys = max((key_bucket(s.prompt_len + s.generated, self.max_context) for s in decoding), default=0)
        if prefilling and decoding and self.slices:
            bucket = self.bucket_for(len(decoding))
            shape = self.slices[bucket]
            slices, spans = self._pack(prefilling, shape, SLICE_ROWS)
            keys = max(keys, *(key_bucket(p + n, self.max_context) for p, n in spans))
            plan = TickPlan(MIXED, bucket, (*decoding, *slices), spans, keys, shape)
            if self.fits(plan.key, started=True):
                return plan
        elif prefilling and (not decoding or self.last_phase == DECODE):
            # Beside decoding seqs (no mixed steps), a prefill tick and the decode tick after
            # it (the prompts' rows in it too) are one gap in their streams: the most of the
            # oldest prompts whose gap fits, so that a later prompt packed beside an earlier
            # one never holds the earlier one out (its promise was made without it).
            for rows in range(min(PREFILL_ROWS, len(prefilling)), 0, -1):
                slices, spans = self._pack(prefilling, self.chunk, rows)
                prompt = max(prompt_keys(p + n, self.max_context) for p, n in spans)
                plan = TickPlan(PREFILL, 1, tuple(slices), spans, prompt,
                                slice_shape(sum(n for _, n in spans), self.chunk))
                if not decoding:
                    return plan
                gap = max(keys, *(key_bucket(p + n, self.max_context) for p, n in spans))
                started = sum(p + n >= seq.prompt_len for seq, (p, n) in zip(slices, spans))  # decode next tick too
                after = StepKey(DECODE, self.bucket_for(min(self.max_slots, len(decoding) + started)), gap, 1)
                if self.fits(plan.key, after, started=True):
                    return plan
        if decoding:
            return TickPlan(DECODE, self.bucket_for(len(decoding)), tuple(decoding), keys=keys)
        return None

    @staticmethod
    def _pack(prefilling: list[Seq], budget: int, rows: int) -> tuple[list[Seq], tuple[tuple[int, int], ...]]:
        """The oldest prompts' next slices, `budget` tokens and `rows` rows at most."""
        seqs, spans = [], []
        for seq in prefilling[:rows]:
            n = min(budget, seq.prompt_len - seq.prefilled)
            seqs.append(seq)
            spans.append((seq.prefilled, n))
            budget -= n
            if not budget:
                break
        return seqs, tuple(spans)

    def update(self, plan: TickPlan, tokens: dict[int, int] | None = None) -> list[Output]:
        """Advances the plan's rows by what the step did. `tokens`: seq_id -> sampled id
        for the rows that sampled (None: all did, ids unknown, as in a simulation). A row
        missing from `tokens` failed and must be aborted by the caller."""
        self.last_phase = plan.phase
        self.bank(plan)
        outs = []
        for i, seq in enumerate(plan.rows):
            if seq not in self.running:
                continue  # aborted during the step
            if tokens is not None and seq.seq_id not in tokens:
                continue
            if plan.is_slice(i):
                seq.prefilled += plan.span(i)[1]
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
