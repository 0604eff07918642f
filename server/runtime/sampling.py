"""Token sampling: greedy, temperature, top-k, top-p, with a per-request seed.

Each row is sampled on its own: the random draw for a token comes from a generator
seeded by (request seed, token position), so the same seed gives the same tokens
whatever else shares the batch and however many steps ran before.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch

# The smallest temperature served (as a float32, the wire type, so a client's 0.01 is
# in range). Below it logits / temperature overflows fp32 for ordinary logits (a denormal
# temperature gave inf - inf = NaN in the softmax); vLLM clamps to the same 0.01.
MIN_TEMPERATURE = struct.unpack("f", struct.pack("f", 0.01))[0]
MAX_TEMPERATURE = 100.0


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise ValueError(f"temperature must be 0 (greedy) or in [0.01, {MAX_TEMPERATURE:g}], "
                             f"got {self.temperature!r}")
        # bool is an int subclass: top_k=True would silently mean greedy.
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


GREEDY = SamplingParams()


def _draw_seed(seed: int, position: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_row(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """logits: [V] fp32 for the token at `position` (0-based index in its sequence)."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        probs = _nucleus(probs, params.top_p)
    gen = torch.Generator(device=logits.device).manual_seed(_draw_seed(params.seed, position))
    # Inverse CDF: one uniform draw against the running sum (float64, so 49152 fp32
    # probabilities add up without drift; cumsum(dtype=) converts slower, 136 against
    # 49 us). torch.multinomial draws an exponential per token: 1.0 ms a row at smollm2's
    # 49152-token vocabulary on this host, 5 ms of a 16 ms compiled batch-4 step that
    # calibration (greedy) never timed; this row costs ~0.2 ms.
    cdf = torch.cumsum(probs.double(), dim=-1)
    u = torch.rand((1,), generator=gen, dtype=torch.float64, device=logits.device)
    # The first token whose running sum passes u x total: a zero-probability token never
    # is (its sum equals the one before); u < 1, so only a rounding can pass the end.
    i = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
    return i if i < probs.numel() else int(torch.nonzero(probs).max())


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs [V] cut to the smallest set of most likely tokens whose mass reaches top_p (the
    first token always stays), renormalized. Found among the k most likely (64, then 512,
    then a whole sort) once the k-th is outside the set, instead of sorting all V: a sort
    of smollm2's 49152 probabilities took 3.5 ms a row here (16 ms of a sampled batch-4
    step), a top-64 0.1."""
    n, k = probs.numel(), 64
    while True:
        if k * 8 >= n:  # a flat distribution: a whole sort is cheaper than a top-k this wide
            values, order = torch.sort(probs, descending=True)
        else:
            values, order = torch.topk(probs, k)  # descending
        before = torch.cumsum(values, dim=-1) - values  # each token's mass strictly before it
        if values.numel() == n or before[-1] >= top_p:  # the k-th is cut, so is every token after it
            keep = before < top_p
            out = torch.zeros_like(probs).index_put_((order[keep],), values[keep])
            return out / out.sum()
        k *= 8


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """logits: [B, V] fp32 (rows past len(params) are padding and ignored)."""
    if all(p.greedy for p in params):
        return torch.argmax(logits[: len(params)], dim=-1).tolist()
    return [sample_row(logits[i], p, pos) for i, (p, pos) in enumerate(zip(params, positions))]
