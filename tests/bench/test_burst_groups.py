"""bench/burst_groups.py's reading of a tick log (no server started)."""

from tests.bench import load_bench


def _request(i, arrival, ttft, made):
    return {"request": i, "id": f"req-{i}", "arrival_ms": arrival, "ttft_ms": ttft, "made_ms": [made, made + 30]}


def _tick(phase, end):
    return {"tick": 0, "phase": phase, "end_ms": end}


def test_a_burst_that_made_its_window_goes_in_by_prefill_ticks_and_one_that_trickled_by_mixed_ones():
    groups = load_bench("burst_groups")
    grouped = [_request(i, 1000 + i * 0.5, 200 - i * 0.5, 40 + 30 * (i // 2)) for i in range(8)]
    trickled = [_request(8, 3000, 80, 40)] + [_request(8 + i, 3005, 440, 390) for i in range(1, 8)]
    log = [*grouped, *trickled,
           *(_tick("prefill", 1000 + t) for t in (40, 70, 100, 130)), _tick("decode", 1160),
           _tick("prefill", 3040), _tick("prefill", 3070), *(_tick("mixed", 3100 + 30 * k) for k in range(10)),
           _tick("decode", 3420)]
    first, second = groups.bursts(log, 2)
    assert first == {"spread_ms": 3.5, "promised_ms": 200.0, "prefill": 4, "mixed": 0}
    assert second["spread_ms"] == 5 and second["promised_ms"] == 445 and second["mixed"] == 10
