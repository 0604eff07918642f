"""Drift-aware pacing: how long a paced tick lasts, from the steps the host really ran.

A tick of a step the program times at `s` program seconds lasts `s x factor + guard_s`
wall seconds. The factor starts as the measured time scale x (1 + the guard band), the
fixed margin of the first ticks; from then on it follows this host (a slowdown at once:
`fast_window`); every `every` ticks
it is re-estimated as the `quantile` of measured / program step time over the last
`window` ticks, plus `margin`, and replaced when it moved by more than `tolerance` (the
first estimate from its own ticks always: the start-up factor is a guess)
(a faster host so within `window` + `every` ticks)
(a re-pace: counted and exported). So a step overruns its tick rarely (less than
1 - quantile of the time, the margin absorbing most of that tail), whether the host drifted slower (its memory bandwidth moves 25-41 GB/s here from
minute to minute) or the start-up measurement was pessimistic; promises made after a
re-pace use the new factor (the admission simulation reads the same ticks), and promises
made before it keep theirs.

A phase with few ticks (prefill, between streams of 32 tokens: one tick in 32) waits long
for its own samples; until it has them it follows the decode pacer's re-paces (`follow`):
the host's drift shows there first (measured: the same decode shapes at 1.0x their
calibration at one minute and 1.6x some minutes later, and the prefill ticks of a burst
then overran by the same factor).

Pure: no clocks or threads; the engine feeds it one (measured, program) pair per tick.
"""

from __future__ import annotations

import statistics
from collections import deque
from itertools import islice
from dataclasses import dataclass, field, replace


@dataclass
class Pacer:
    factor: float  # wall seconds of a paced tick per program second of its step
    adaptive: bool = True
    # A 95th percentile, not a 99th: over a few hundred ticks the 99th is the one or two
    # slowest steps (a new shape's first run, a GIL stall), and pacing every tick for them
    # widened the demo's ITL p99/p50 from 1.08 to 1.21 and set the decode factor to 1.68.
    quantile: float = 0.95
    margin: float = 0.10  # over the quantile
    # Down as fast as the samples allow: the quantile of the last 128 ticks, so a host that
    # got faster is followed within window + every ticks (with 512 the slow samples of one
    # slowdown held the pace up for ~40 s: a full house at c=8 decoded at an 84 ms cadence
    # while the same steps ran at ~59 ms unpaced; bench/peer_vllm.py, BENCHMARKS.md).
    window: int = 128  # ticks
    # Re-estimating after 32 ticks, every 16, was tried: one phase's factor covers all its
    # buckets, and the 95th percentile of a short window is its worst bucket's outlier: the
    # decode factor went to 1.56 (batch 4 steps ran at 1.03x their program time) and with
    # it every company TPOT (c=8 0.68x --throughput against 0.95x; bench/peer_vllm.py).
    min_samples: int = 128  # before the first re-estimate
    every: int = 64  # ticks between re-estimates
    # Relative change that triggers a re-pace: below it the pace stays, so requests promised
    # a moment apart are not promised different TPOTs for noise (with 2%, when a re-pace
    # still moved running streams, streams of one Poisson run saw 53.7 and 57.8 ms TPOTs;
    # bench/compare.py).
    tolerance: float = 0.05
    # A slowdown is followed at once: when the median of the last `fast_window` ticks, plus
    # the margin, is past the pace by more than the tolerance, the pace becomes that. Only
    # slower (a faster host costs throughput, not promises), and a median (one slow step is
    # not a slower host). Measured: this host's steps went from 1.27x to 1.5x their
    # calibration between the start-up measurement and the first request, and with only the
    # 128-tick rule every tick of the first streams overran.
    fast_window: int = 16
    # Its state, not settings (so `fresh` copies the settings alone).
    repaces: int = field(default=0, init=False)
    _ratios: deque = field(default_factory=deque, repr=False, init=False)
    _seen: int = field(default=0, init=False)
    _fresh: int = field(default=0, init=False)  # ticks since the last fast re-pace (the fast rule reads the last fast_window of them)
    _estimated: bool = field(default=False, init=False)  # a re-estimate from its own ticks has been made

    def __post_init__(self):
        if not self.factor > 0 or not 0 < self.quantile <= 1 or self.margin < 0:
            raise ValueError(f"factor must be > 0, quantile in (0, 1], margin >= 0; got {self}")
        if not 1 <= self.fast_window <= self.window:
            raise ValueError(f"fast_window must be in 1..window, got {self.fast_window}")
        self._ratios = deque(maxlen=self.window)

    def fresh(self, **changes) -> "Pacer":
        """A pacer with these settings and this one's others, starting from its factor now,
        with no samples of its own."""
        return replace(self, **changes)  # __post_init__ gives it an empty window

    @property
    def samples(self) -> int:
        """Ticks observed so far (its own estimate applies from `min_samples` on)."""
        return self._seen

    def follow(self, ratio: float, down: bool = False) -> bool:
        """Scales the factor by `ratio` (another phase's re-pace) while this pacer has not
        re-estimated from its own ticks; returns whether it changed. Only slower (> 1)
        unless `down`: the other phase's first re-pace may instead correct its own
        start-up estimate, and a faster pace here would turn that into overruns; `down`
        for a pacer that started from the same estimate (mixed from decode's)."""
        allowed = 1 < ratio < float("inf") or down and 0 < ratio < 1
        if not self.adaptive or self._seen >= self.min_samples or not allowed:
            return False
        self.factor *= ratio
        self.repaces += 1
        return True

    def observe(self, measured_s: float, program_s: float) -> bool:
        """One tick's step; returns whether the factor changed."""
        if not self.adaptive or not program_s > 0:
            return False
        self._ratios.append(measured_s / program_s)
        self._seen += 1
        self._fresh += 1
        if self._fresh >= self.fast_window:
            slower = statistics.median(islice(reversed(self._ratios), self.fast_window)) * (1 + self.margin)
            if slower > self.factor * (1 + self.tolerance):
                self.factor = slower
                self.repaces += 1
                self._fresh = 0
                return True
        if len(self._ratios) < self.min_samples or self._seen % self.every:
            return False
        estimate = quantile(self._ratios, self.quantile) * (1 + self.margin)
        # The first estimate from its own ticks replaces the start-up factor, however close:
        # that was a guess (server/core/build.py: a wide start-up band, 25%, that served steps
        # at 1.22 would otherwise have kept within the tolerance all run long).
        first, self._estimated = not self._estimated, True
        if not first and abs(estimate / self.factor - 1) <= self.tolerance:
            return False
        if estimate == self.factor:
            return False
        self.factor = estimate
        self.repaces += 1
        return True


def quantile(samples, q: float) -> float:
    """The `q` quantile of `samples` as the pacer reads it: the sorted sample at index
    floor(q x n), the largest for q = 1."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
