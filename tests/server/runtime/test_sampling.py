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
