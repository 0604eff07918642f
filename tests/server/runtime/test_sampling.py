"""Sampling: greedy, seeded temperature / top-k / top-p draws, parameter validation."""

from __future__ import annotations

import pytest
import torch

from server.runtime.sampling import GREEDY, MIN_TEMPERATURE, SamplingParams, sample, sample_row

V = 50


def logits(seed: int, rows: int = 1) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 2


def draws(row: torch.Tensor, params: SamplingParams, n: int = 200) -> list[int]:
    return [sample_row(row, params, position) for position in range(n)]


def test_greedy_is_argmax():
    x = logits(0, rows=8)
    assert sample(x, [GREEDY] * 8, list(range(8))) == torch.argmax(x, dim=-1).tolist()
    assert all(sample_row(x[i], GREEDY, 0) == int(torch.argmax(x[i])) for i in range(8))


def test_top_k_one_is_greedy_at_any_temperature():
    x = logits(1)[0]
    assert set(draws(x, SamplingParams(temperature=5.0, top_k=1, seed=3))) == {int(torch.argmax(x))}


def test_same_seed_same_tokens_and_seeds_differ():
    x = logits(2)[0]
    params = SamplingParams(temperature=1.0, seed=11)
    assert draws(x, params) == draws(x, params)
    other = draws(x, SamplingParams(temperature=1.0, seed=12))
    assert sum(a != b for a, b in zip(draws(x, params), other)) > 100  # of 200 draws


def test_a_row_samples_the_same_alone_or_in_a_batch():
    x = logits(3, rows=4)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=5), GREEDY,
              SamplingParams(temperature=1.3, top_k=7, seed=6), SamplingParams(temperature=1.0, seed=5)]
    batched = sample(x, params, [10, 11, 12, 13])
    assert batched == [sample_row(x[i], p, 10 + i) for i, p in enumerate(params)]
    assert sample(torch.cat([x, logits(4, rows=4)]), params, [10, 11, 12, 13]) == batched  # padding rows ignored


def test_top_k_stays_within_the_k_best():
    x = logits(5)[0]
    best = set(torch.topk(x, 5).indices.tolist())
    seen = set(draws(x, SamplingParams(temperature=3.0, top_k=5, seed=1), n=400))
    assert seen <= best and len(seen) > 1


def test_top_p_keeps_only_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    x = torch.log(probs)  # the nucleus for top_p 0.7 is {1, 3}: 0.5 < 0.7 <= 0.5 + 0.3
    seen = draws(x, SamplingParams(temperature=1.0, top_p=0.7, seed=2), n=400)
    assert set(seen) == {1, 3}
    assert set(draws(x, SamplingParams(temperature=1.0, top_p=0.4, seed=2))) == {1}  # the top token always stays


def test_low_temperature_approaches_greedy():
    x = logits(6)[0]
    assert set(draws(x, SamplingParams(temperature=0.01, seed=9))) == {int(torch.argmax(x))}


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e30])
def test_the_smallest_temperature_samples_finite_probabilities(scale):
    """At MIN_TEMPERATURE even huge logits give a valid draw (a denormal temperature gave
    NaN probabilities and killed the engine)."""
    x = logits(6)[0] * scale
    assert draws(x, SamplingParams(temperature=MIN_TEMPERATURE, seed=1), n=5) == [int(torch.argmax(x))] * 5


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", 1e-45), ("temperature", 5e-3),
    ("temperature", float("inf")), ("temperature", 100.5), ("top_k", -1), ("top_k", 2.5), ("top_k", True),
    ("top_p", 0.0), ("top_p", 1.5), ("seed", -1), ("seed", 2**63),
])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


# Draws against the exact distribution: softmax(logits / T), cut to the top_k best tokens
# (renormalised), then to the nucleus: the fewest most-likely tokens whose mass reaches
# top_p (the first always stays), renormalised. The logits have no ties and no nucleus
# boundary within 0.03 of a top_p used here, so float32 rounding cannot move a token in or out.
FIXED = torch.tensor([1.2, 2.0, -0.3, 0.7, 1.6, -1.0, 0.1, 0.4])
DRAWS = 10_000  # per case: well under a second each
P_PASS, P_FAIL = 1e-6, 1e-12  # chi-square p-values: the right distribution is above the one, wrong ones below the other


def exact(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
          top_p_first: bool = False, crossing_kept: bool = True) -> torch.Tensor:
    """The distribution in float64, written apart from sampling.py. `top_p_first` and
    `crossing_kept=False` give wrong variants (nucleus before top-k; the nucleus without
    the token that crosses top_p) for the test to reject."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)

    def keep_top_k(p):
        if not top_k:
            return p
        cut = torch.zeros_like(p)
        best = torch.topk(p, top_k).indices
        cut[best] = p[best]
        return cut / cut.sum()

    def keep_nucleus(p):
        if top_p >= 1.0:
            return p
        sorted_p, order = torch.sort(p, descending=True)
        cum, kept = 0.0, torch.zeros_like(p)
        for q, i in zip(sorted_p.tolist(), order.tolist()):
            if cum >= top_p or (not crossing_kept and cum + q > top_p and cum > 0):
                break
            kept[i], cum = q, cum + q
        return kept / kept.sum()

    return keep_top_k(keep_nucleus(probs)) if top_p_first else keep_nucleus(keep_top_k(probs))


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """The p-value of `counts` under `probs` (0 if a token of probability 0 was drawn)."""
    if counts[probs == 0].sum() > 0:
        return 0.0
    support = probs > 0
    expected = probs[support] * counts.sum()
    x2 = ((counts[support] - expected) ** 2 / expected).sum()
    df = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), x2 / 2))


SHAPES = {  # params -> (the exact distribution's arguments, those of wrong ones)
    "cool": (SamplingParams(temperature=0.7, seed=101), dict(temperature=0.7),
             [dict(temperature=1.0)]),
    "hot": (SamplingParams(temperature=1.6, seed=102), dict(temperature=1.6),
            [dict(temperature=1.0), dict(temperature=1.3)]),
    "top_k": (SamplingParams(temperature=1.0, top_k=4, seed=103), dict(temperature=1.0, top_k=4),
              [dict(temperature=1.0), dict(temperature=1.0, top_k=5), dict(temperature=1.3, top_k=4)]),
    "top_p": (SamplingParams(temperature=1.0, top_p=0.8, seed=104), dict(temperature=1.0, top_p=0.8),
              [dict(temperature=1.0), dict(temperature=1.0, top_p=0.8, crossing_kept=False),
               dict(temperature=1.0, top_p=0.9)]),
    "all three": (SamplingParams(temperature=1.6, top_k=5, top_p=0.7, seed=105),
                  dict(temperature=1.6, top_k=5, top_p=0.7),
                  [dict(temperature=1.6, top_k=5, top_p=0.7, top_p_first=True), dict(temperature=1.0, top_k=5, top_p=0.7),
                   dict(temperature=1.6, top_k=5), dict(temperature=1.6, top_p=0.7)]),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_draws_follow_the_exact_distribution(shape):
    params, right, wrongs = SHAPES[shape]
    counts = torch.bincount(torch.tensor(draws(FIXED, params, n=DRAWS)), minlength=len(FIXED)).double()
    assert chi_square_p(counts, exact(FIXED, **right)) > P_PASS, (counts, exact(FIXED, **right) * DRAWS)
    for wrong in wrongs:  # the bound has the power to reject a near miss
        assert chi_square_p(counts, exact(FIXED, **wrong)) < P_FAIL, wrong
