"""`lockstep plan`: its answer meets the SLO as a whole fleet, one replica fewer does
not, a tighter SLO never costs less, the same question gives the same answer, and bad
questions get one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import scheduler
from client.plan import Trial, build_parser, plan

BASE = ["--model", "llama-2-7b", "--device", "lpu", "--dtype", "int8", "--rate", "40", "--prompt-len", "256",
        "--output-len", "64", "--requests", "80", "--growth", "2", "--max-chips", "512", "--max-context", "1024"]


def ask(*extra: str):
    args = build_parser().parse_args([*BASE, *extra])
    return args, *plan(args)


@pytest.fixture(scope="module")
def answer():
    return ask("--slo", "ttft=300ms,itl=30ms")


def test_the_plan_meets_the_slo_as_a_fleet_and_one_replica_fewer_does_not(answer):
    args, points, best = answer
    assert best is not None and best.meets and best.replicas >= 2
    assert best.fleet_ttft_s <= 0.3 and best.fleet_itl_s <= 0.03
    # The cheapest of the pools searched that met it.
    assert best.total_chips == min(p.total_chips for p in points if p.meets)
    options = scheduler.CompileOptions(dtype="int8", max_slots=8, max_context=1024, prefill_chunk=256, prompt_len=128)
    pool = scheduler.parse_pool(f"lpu:{best.chips}")
    trial = Trial(args, scheduler.compile(scheduler.get_model(args.model), pool, options).view())
    assert trial.meets(*trial.fleet(args.rate, best.replicas))
    assert not trial.meets(*trial.fleet(args.rate, best.replicas - 1))


def test_a_tighter_slo_never_costs_less_and_the_answer_is_deterministic(answer):
    _, points, best = answer
    _, points_again, best_again = ask("--slo", "ttft=300ms,itl=30ms")
    assert points_again == points and best_again == best
    _, _, tighter = ask("--slo", "ttft=150ms,itl=30ms")
    assert tighter is None or tighter.total_chips >= best.total_chips


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client.plan", *argv], capture_output=True, text=True, timeout=120)


def test_the_cli_writes_the_curve_and_the_plot(tmp_path):
    out = run(*BASE, "--slo", "ttft=300ms,itl=30ms", "--output", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "<- plan" in out.stdout and "lockstep plan:" in out.stdout
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["plan"]["meets"] and len(doc["points"]) >= 2
    assert (tmp_path / "plan.png").stat().st_size > 1000


def test_an_slo_no_pool_meets_exits_1_and_says_so():
    out = run(*BASE, "--slo", "ttft=1us")
    assert out.returncode == 1 and "meets the SLO" in out.stdout


@pytest.mark.parametrize("argv, message", [
    (["--slo", "ttft=fast"], "SLO items are ttft|itl"),
    (["--slo", "ttft=0ms"], "SLO items are ttft|itl"),
    (["--slo", "tpot=20ms"], "SLO items are ttft|itl"),
    (["--slo", "ttft=1s", "--rate", "0"], "--rate and --burstiness must be finite and > 0"),
    (["--slo", "ttft=1s", "--rate", "nan"], "--rate and --burstiness must be finite and > 0"),
    (["--slo", "ttft=1s", "--rate", "inf"], "--rate and --burstiness must be finite and > 0"),
    (["--slo", "ttft=1s", "--device", "tpu9"], "unknown device 'tpu9'"),
    (["--slo", "ttft=1s", "--max-chips", "4"], "fits on no pool of up to 4 x lpu"),
    (["--slo", "ttft=1s", "--growth", "1"], "--growth > 1"),
])
def test_bad_questions_exit_2_with_one_line(argv, message):
    # Later flags override BASE's.
    out = run(*BASE, *argv)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
