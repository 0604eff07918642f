"""bench/pace_replay.py on hand-built tick logs: a stream is late exactly when its steps,
as they ran, spend more than the lead its promise's cadence gave it."""

import json

from tests.bench import load_bench


def _tick(phase, rows, measured, program=10.0, batch=1):
    return {"tick": 0, "phase": phase, "key": [phase, batch, 128, 1], "rows": rows, "measured_ms": measured,
            "program_ms": program, "cold": False}


def _log(slow_at: int | None):
    """Four lone streams of 10 decode steps at 1.0x their program time, after 64 steps of
    history at 1.0x (one at 2.0x): the last stream's step `slow_at` runs at 3.0x."""
    ticks = [_tick("decode", [0], 20.0 if i == 0 else 10.0) for i in range(64)]
    for s in range(4):
        ticks.append(_tick("prefill", [s], 10.0))
        ticks += [_tick("decode", [s], 30.0 if s == 3 and i == slow_at else 10.0) for i in range(10)]
    ticks.append(_tick("prefill", [0, 1], 10.0))  # two prompts: not a lone stream
    ticks += [_tick("decode", [0, 1], 10.0, batch=2) for _ in range(10)]
    return ticks


def test_a_stream_is_late_when_its_steps_spend_more_than_its_lead():
    replay = load_bench("pace_replay")
    assert len(replay.streams(_log(None))) == 4
    on_time = replay.replay(_log(None), lambda h: 1.0, lead=0.2, window=128)
    assert on_time["streams"] == 4 and on_time["tokens"] == 40 and on_time["late"] == 0.0
    # A 3x step at the stream's first decode step: 0.2 + 1.1 - 3.0 < 0, late until the
    # 0.1-a-step margin wins the 1.7 steps back (17 steps: to the stream's end).
    late = replay.replay(_log(0), lambda h: 1.1, lead=0.2, window=128)
    assert late["late"] == 10 / 40 and late["late_p99_ms"] > 0
    # The same step late in the stream, after 8 steps of 0.1 won: 0.2 + 0.8 + 1.1 - 3.0 < 0 for two tokens.
    assert replay.replay(_log(8), lambda h: 1.1, lead=0.2, window=128)["late"] == 2 / 40
    # The served rule reads the history: its 95th percentile (1.0; the one 2.0 is in the top 5%) + 10%.
    assert replay.RULES["p95 +10% (served)"]([1.0] * 63 + [2.0]) == 1.1


def test_the_cli_prints_every_rule_for_every_log_and_refuses_what_is_not_one(tmp_path, capsys, monkeypatch):
    replay = load_bench("pace_replay")
    path, bad = tmp_path / "ticks.jsonl", tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(t) for t in [{"start": {}}, *_log(0)]))
    bad.write_text("not json\n")
    monkeypatch.setattr("sys.argv", ["pace_replay.py", str(path)])
    assert replay.main() == 0
    out = capsys.readouterr().out
    assert all(name in out for name in replay.RULES) and "ticks.jsonl" in out
    monkeypatch.setattr("sys.argv", ["pace_replay.py", str(bad)])
    assert replay.main() == 2
    assert capsys.readouterr().err.startswith("pace_replay: ")
