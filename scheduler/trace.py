"""Chrome trace-event export of a program's schedules (open in https://ui.perfetto.dev).

One process per schedule (decode bucket or prefill), one thread per stage, and one
thread for the links; times in microseconds as the format requires. Format reference:
"Trace Event Format" (Google, catapult), complete events (ph = "X") and metadata (ph = "M").
"""

from __future__ import annotations

import json

from scheduler.program import Program

US_PER_S = 1e6


def trace_events(program: Program) -> list[dict]:
    events = []
    stages = {s["index"]: s for s in program.data["stages"]}
    for pid, sched in enumerate(program.data["schedules"], start=1):
        label = f"{sched['phase']} batch={sched['batch']} tokens={sched['new_tokens']} ctx={sched['context']}"
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": label}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
        for st in sched["stages"]:
            info = stages[st["stage"]]
            lo, hi = info["devices"]
            name = f"stage {st['stage']}: {info['device']} {lo}..{hi - 1} (tp={info['tp']})"
            tid = st["stage"] + 1
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
            for op in st["ops"]:
                args = {k: v for k, v in op.items() if k not in ("start_s", "end_s")}
                events.append(_span(f"{op['op']} {op['layer']}", pid, tid, op["start_s"], op["end_s"], args))
        link_tid = len(sched["stages"]) + 1
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": link_tid, "args": {"name": "links"}})
        for tr in sched["transfers"]:
            name = f"send stage {tr['from_stage']} -> {tr['to_stage']}"
            args = {k: v for k, v in tr.items() if k not in ("start_s", "end_s")}
            events.append(_span(name, pid, link_tid, tr["start_s"], tr["end_s"], args))
    return events


def _span(name, pid, tid, start_s, end_s, args) -> dict:
    return {"ph": "X", "name": name, "cat": "lockstep", "pid": pid, "tid": tid,
            "ts": start_s * US_PER_S, "dur": (end_s - start_s) * US_PER_S, "args": args}


def write_trace(program: Program, path) -> None:
    doc = {"traceEvents": trace_events(program), "displayTimeUnit": "ns",
           "otherData": {"plan_hash": program.plan_hash, "model": program.data["model"]["name"],
                         "pool": program.data["pool"]["description"]}}
    with open(path, "w") as f:
        json.dump(doc, f, sort_keys=True)
