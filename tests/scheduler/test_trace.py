"""Chrome trace export: valid JSON whose spans are the program's ops, in microseconds."""

import json

import pytest


def load(program, tmp_path):
    from scheduler.trace import write_trace

    path = tmp_path / "trace.json"
    write_trace(program, path)
    return json.loads(path.read_text())


def test_trace_spans_match_program_ops(program, tmp_path):
    doc = load(program, tmp_path)
    assert doc["otherData"]["plan_hash"] == program.plan_hash
    events = doc["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["ph"] for e in events} == {"X", "M"}
    expected = []
    for pid, sched in enumerate(program.data["schedules"], start=1):
        for st in sched["stages"]:
            expected += [(pid, st["stage"] + 1, op["start_s"], op["end_s"], op["layer"]) for op in st["ops"]]
        link_tid = len(sched["stages"]) + 1
        expected += [(pid, link_tid, t["start_s"], t["end_s"], None) for t in sched["transfers"]]
    assert len(spans) == len(expected)
    for event, (pid, tid, start_s, end_s, layer) in zip(spans, expected):
        assert (event["pid"], event["tid"]) == (pid, tid)
        assert event["ts"] == pytest.approx(start_s * 1e6, rel=1e-12, abs=1e-9)
        assert event["dur"] == pytest.approx((end_s - start_s) * 1e6, rel=1e-9, abs=1e-9)
        assert event["dur"] >= 0
        if layer is not None:
            assert event["name"].endswith(" " + layer)


def test_trace_names_processes_and_threads(staged_program, tmp_path):
    events = load(staged_program, tmp_path)["traceEvents"]
    meta = [e for e in events if e["ph"] == "M"]
    schedules = staged_program.data["schedules"]
    processes = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    assert sorted(processes) == list(range(1, len(schedules) + 1))
    assert processes[1].startswith("decode batch=1 ")
    prefill = next(i for i, s in enumerate(schedules, start=1) if s["phase"] == "prefill")
    assert processes[prefill].startswith("prefill batch=1 tokens=16")
    assert processes[len(schedules)].startswith("mixed batch=")
    num_stages = len(staged_program.data["stages"])
    for pid in processes:
        threads = {e["tid"]: e["args"]["name"] for e in meta if e["name"] == "thread_name" and e["pid"] == pid}
        assert sorted(threads) == list(range(1, num_stages + 2))
        assert threads[1].startswith("stage 0: lpu 0..")
        assert threads[num_stages + 1] == "links"
