"""bench/promise_misses.py's reading of a tick log and client records (no server started)."""

from tests.bench import load_bench


def test_a_token_released_while_a_step_ran_is_told_apart_from_one_released_between_steps():
    misses = load_bench("promise_misses")
    peer_vllm = misses.peer_vllm
    t0 = 100.0  # perf_counter s of the log's start
    log = [{"start": {"perf_counter_s": t0}},
           {"tick": 1, "end_ms": 50.0, "measured_ms": 20.0},   # a step from 30 to 50 ms
           {"tick": 2, "end_ms": 90.0, "measured_ms": 20.0},   # and from 70 to 90 ms
           {"request": 0, "id": "req-0", "arrival_ms": 10.0, "ttft_ms": 30.0, "tpot_ms": 30.0,
            "made_ms": [25.0, 40.0, 58.0]}]
    # Released at 10 + max(promised, made): 40 (inside the first step), 70 (the second's
    # start: inside), 100 (after both); received 1, 7 and 2 ms later.
    rec = peer_vllm.Rec(send_s=t0 + 0.009, tokens_s=[t0 + 0.041, t0 + 0.077, t0 + 0.102], request_id="req-0")
    s = misses.split(log, [rec])
    assert list(s["inside"]) == [1.0, 1.0, 0.0]
    assert [round(x, 6) for x in s["way"]] == [1.0, 7.0, 2.0]
    assert [round(x, 6) for x in s["made"]] == [-5.0, -20.0, -32.0]
