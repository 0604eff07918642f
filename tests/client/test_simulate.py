"""`lockstep simulate`: the load-test outputs from the tick scheduler over a compiled program."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from client.simulate import main
from scheduler.simulate import WINDOW_GRACE_S

ARGS = ["--model", "tiny", "--pool", "cpu:1", "--dtype", "fp32", "--max-context", "256", "--prefill-chunk", "32",
        "--requests", "40", "--prompt-len", "40", "--output-len", "8", "--guard-band-pct", "0", "--guard-band-ms", "0"]


@pytest.mark.parametrize("alone", ["company", "own"])
def test_a_closed_loop_of_one_matches_the_program(tmp_path, alone):
    assert main([*ARGS, "--concurrency", "1", "--alone-tpot", alone, "--output", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "summary.json").read_text())
    compiled = json.loads(subprocess.run([sys.executable, "-m", "server.cli", "compile", "--model", "tiny", "--pool",
                                          "cpu:1", "--dtype", "fp32", "--max-context", "256", "--prefill-chunk", "32",
                                          "--json"], capture_output=True, text=True, check=True).stdout)
    steps = {(x["phase"], x["batch"], x["keys"], x["tokens"]): x["step_s"] for x in compiled["steps"]}
    s = doc["summary"]
    assert s["ok"] == 40 and s["errors"] == {}
    # Alone: two prefill ticks (a 32-token chunk at 32 keys, then the last 8 tokens in an
    # 8-token slice ending at 40: 64 keys, as a prefill step's keys start at 32), then one
    # token per promised TPOT at 128 keys (40 + 8 tokens attend <= 128): the longest tick,
    # as in company (the default), or its own decode step (`own`).
    # Its window closes on that first token after the engine's grace (WINDOW_GRACE_S).
    assert s["ttft_s"]["p50"] == pytest.approx(steps[("prefill", 1, 32, 32)] + steps[("prefill", 1, 64, 8)]
                                               + WINDOW_GRACE_S)
    cadence = compiled["cadence"][0]
    assert s["itl_s"]["p50"] == pytest.approx(cadence["alone_s"] if alone == "own" else cadence["tick_s"])
    assert cadence["alone_s"] == steps[("decode", 1, 128, 1)] and cadence["keys"] == 128
    assert {p.name for p in tmp_path.iterdir()} >= {"summary.json", "requests.csv", "latency_cdf.png"}


def test_a_sweep_writes_a_capacity_curve(tmp_path):
    assert main([*ARGS, "--sweep", "1,4,1000000", "--max-queue", "2", "--output", str(tmp_path)]) == 0
    points = json.loads((tmp_path / "sweep.json").read_text())
    assert [p["rate"] for p in points] == [1, 4, 1000000]
    assert points[0]["errors"] == {} and points[-1]["errors"].get("RESOURCE_EXHAUSTED", 0) > 0  # overload refuses
    assert (tmp_path / "sweep.png").stat().st_size > 0


@pytest.mark.parametrize("extra, message", [
    (["--rate", "nan"], "rates and --burstiness must be finite"),
    (["--model", "nope"], "unknown model"),
    (["--requests", "0"], "--requests must be >= 1"),
    (["--pace", "decode=0"], "pace factors must be finite and > 0"),
    (["--pace", "verify=1.1"], "pace factors must be finite and > 0"),
    (["--pace", "fast"], "pace must be F or PHASE=F"),
    *[([f"--{flag}={v}"], f"--{flag} must be in 0..1000") for flag in ("admission-window-ms", "window-grace-ms")
      for v in ("-1", "nan", "inf")],
    *[([f"--join-share={v}"], "--join-share must be in 0..1") for v in ("-0.1", "1.5", "nan")],
    *[([f"--start-lead-quantile={v}"], "--start-lead-quantile must be in 0..1") for v in ("-0.1", "1.5", "nan")],
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, extra, message):
    out = subprocess.run([sys.executable, "-m", "server.cli", "simulate", *ARGS, *extra, "--output", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1


def test_pace_factors_stretch_the_ticks(tmp_path):
    base, slow = tmp_path / "base", tmp_path / "slow"
    assert main([*ARGS, "--concurrency", "1", "--output", str(base)]) == 0
    assert main([*ARGS, "--concurrency", "1", "--pace", "2", "--output", str(slow)]) == 0
    itl = [json.loads((d / "summary.json").read_text())["summary"]["itl_s"]["p50"] for d in (base, slow)]
    assert itl[1] == pytest.approx(2 * itl[0])  # guard bands are 0 in ARGS: the tick is step x factor
