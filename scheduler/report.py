"""Human-readable summary of a Program, and the machine-readable one `--json` prints."""

from __future__ import annotations

from scheduler.program import Program


def summary_json(program: Program) -> dict:
    d = program.data
    return {"plan_hash": d["plan_hash"], "model": d["model"]["name"], "pool": d["pool"]["description"],
            "dtype": d["model"]["weight_dtype"], "objective": d["objective"]["name"],
            "devices_used": d["devices_used"], "num_devices": d["pool"]["num_devices"],
            "stages": d["stages"], "memory_plan": d["memory_plan"], "predictions": d["predictions"],
            "ttft_by_prompt_len": d["ttft_by_prompt_len"],
            "tick_target_s": d["tick_target_s"], "slices": d["slices"], "steps": d["steps"],
            "cadence": _cadence(program)}


def _cadence(program: Program) -> list[dict]:
    """The TPOT a request is promised at each key bucket (unpaced): `alone_s` arriving at an
    idle server (its own decode step), `tick_s` in company (`ProgramView.company_cadence_s`);
    docs/architecture.md, "Promises per request"."""
    view = program.view()
    return [{"keys": k, "tick_s": view.company_cadence_s(k), "alone_s": view.lone_cadence_s(k)}
            for k in view.key_buckets]


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def summary_text(program: Program, max_stage_rows: int = 12) -> str:
    d = program.data
    m = d["model"]
    lines = [
        f"model     {m['name']}  {m['num_params'] / 1e9:.2f}B params  weights {m['weight_dtype']}, "
        f"activations/KV {m['act_dtype']}",
        f"pool      {d['pool']['description']}  ({d['pool']['num_devices']} devices, {d['devices_used']} used)",
        f"objective {d['objective']['name']}: {_time(d['objective']['value_s'])} at batch "
        f"{d['objective']['reference_step']['batch']}, context {d['objective']['reference_step']['context']}",
        f"plan      {d['plan_hash'][:16]}  buckets {d['buckets']}  prefill chunk {d['prefill_chunk']}",
        "",
        "stages (memory is per device: each device of a stage holds an equal share)",
        f"{'stage':>5}  {'layers':<22} {'devices':<18} {'tp':>4}  {'weights':>9} {'kv':>9} {'act':>9}  "
        f"{'used':>6}",
    ]
    rows = list(zip(d["stages"], d["memory_plan"]))
    shown = rows if len(rows) <= max_stage_rows else rows[: max_stage_rows // 2] + [None] + rows[-max_stage_rows // 2:]
    for row in shown:
        if row is None:
            lines.append(f"{'...':>5}  ({len(rows) - max_stage_rows} more stages)")
            continue
        st, mem = row
        lo, hi = st["devices"]
        layers = f"{st['first_layer']}..{st['last_layer']}"
        devices = f"{st['device']}[{lo}:{hi}]"
        lines.append(f"{st['index']:>5}  {layers:<22} {devices:<18} {st['tp']:>4}  {_bytes(mem['weights_bytes']):>9} "
                     f"{_bytes(mem['kv_bytes']):>9} {_bytes(mem['activation_bytes']):>9}  "
                     f"{mem['total_bytes'] / mem['usable_bytes']:>6.0%}")
    lines += ["", "predictions (TTFT on an idle server; TPOT: the deterministic tick at the prompt's key bucket)",
              f"{'batch':>5} {'prompt':>6} {'TTFT':>10} {'TPOT':>10} {'tok/s':>10} {'tok/s/user':>10} "
              f"{'pipelined tok/s':>15}"]
    for p in d["predictions"]:
        lines.append(f"{p['batch']:>5} {p['prompt_len']:>6} {_time(p['ttft_s']):>10} {_time(p['tpot_s']):>10} "
                     f"{p['tokens_per_s']:>10.1f} {p['tokens_per_s_per_user']:>10.1f} "
                     f"{p['pipelined_tokens_per_s']:>15.1f}")
    keys = d["key_buckets"]
    lines += ["", f"steps by attended keys (a tick is paced for the keys its longest row attends; mixed: the bucket's "
                  f"decode rows + the largest prompt slice that fits the {_time(d['tick_target_s'])} tick)",
              f"{'phase':<8} {'batch':>5} {'tokens':>6} " + " ".join(f"{k:>10}" for k in keys)]
    table: dict[tuple, dict] = {}
    for x in d["steps"]:
        table.setdefault((x["phase"] != "decode", x["phase"], x["batch"], x["tokens"]), {})[x["keys"]] = x["step_s"]
    for (_, phase, batch, tokens), row in sorted(table.items()):
        lines.append(f"{phase:<8} {batch:>5} {tokens:>6} " + " ".join(f"{_time(row[k]) if k in row else '-':>10}"
                                                                         for k in keys))
    cadences = _cadence(program)
    lines.append(f"{'promised TPOT, alone':<21} " + " ".join(f"{_time(c['alone_s']):>10}" for c in cadences))
    lines.append(f"{'promised TPOT, company':<21} " + " ".join(f"{_time(c['tick_s']):>10}" for c in cadences))
    return "\n".join(lines)
