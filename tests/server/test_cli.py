"""`lockstep compile` as a user runs it: a subprocess, its stdout, stderr, files and exit code."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler import Program

ENTRY = Path(sys.executable).parent / "lockstep"
COMMAND = [str(ENTRY)] if ENTRY.exists() else [sys.executable, "-m", "server.cli"]


def lockstep(*args, cwd=None):
    return subprocess.run(COMMAND + list(args), capture_output=True, text=True, timeout=120, cwd=cwd)


def test_compile_json_summary():
    out = lockstep("compile", "--model", "tiny", "--pool", "cpu:1", "--json")
    assert out.returncode == 0, out.stderr
    # Nothing on stderr but the one-time notice of a host's first calibration (a fresh cache).
    assert [x for x in out.stderr.splitlines() if not x.startswith("lockstep: calibrating tiny")] == []
    lines = out.stdout.splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert isinstance(summary["plan_hash"], str) and len(summary["plan_hash"]) == 64
    assert summary["devices_used"] == 1
    assert summary["model"] == "tiny" and summary["pool"] == "cpu:1@full"
    assert [s["index"] for s in summary["stages"]] == [0]
    assert [p["batch"] for p in summary["predictions"]] == [1, 2, 4, 8]
    for p in summary["predictions"]:
        assert {"batch", "prompt_len", "ttft_s", "tpot_s", "tokens_per_s"} <= set(p)
        assert p["prompt_len"] == 128
        assert p["tokens_per_s"] == pytest.approx(p["batch"] / p["tpot_s"])


def test_compile_flags_reach_the_compiler():
    out = lockstep("compile", "--model", "tiny", "--pool", "lpu:4@chain", "--dtype", "int8", "--max-slots", "3",
                   "--max-context", "256", "--prompt-len", "64", "--prefill-chunk", "32",
                   "--objective", "throughput", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["dtype"], summary["objective"], summary["pool"]) == ("int8", "throughput", "lpu:4@chain")
    assert [p["batch"] for p in summary["predictions"]] == [1, 2, 3]
    assert {p["prompt_len"] for p in summary["predictions"]} == {64}


def test_compile_writes_program_and_trace(tmp_path):
    program_path, trace_path = tmp_path / "out" / "plan.json", tmp_path / "out" / "sub" / "trace.json"
    out = lockstep("compile", "--model", "tiny", "--pool", "cpu:1", "-o", str(program_path),
                   "--trace", str(trace_path), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    program = Program.from_json(program_path.read_text())  # hash checks out
    assert program.plan_hash == summary["plan_hash"]
    trace = json.loads(trace_path.read_text())
    assert trace["otherData"]["plan_hash"] == summary["plan_hash"]
    assert any(e["ph"] == "X" for e in trace["traceEvents"])


def test_compile_is_deterministic_across_runs(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for path in (a, b):
        assert lockstep("compile", "--model", "tiny", "--pool", "lpu:2", "-o", str(path)).returncode == 0
    assert a.read_bytes() == b.read_bytes()


def test_compile_text_summary_names_output_files(tmp_path):
    path = tmp_path / "plan.json"
    out = lockstep("compile", "--model", "tiny", "--pool", "cpu:1", "-o", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("model     tiny")
    assert f"program   {path}" in out.stdout
    assert path.exists()


def test_compile_reads_hf_config_and_pool_file(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}))
    (tmp_path / "pool.toml").write_text('topology = "chain"\n[[devices]]\npreset = "lpu"\ncount = 2\n')
    out = lockstep("compile", "--model", str(tmp_path / "m"), "--pool", str(tmp_path / "pool.toml"),
                   "--max-context", "512", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["model"] == "m" and summary["pool"] == "lpu:2@chain"


def write_calibration(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"device": "cpu", "entries": [
        {"layer": "block", "phase": "decode", "batch": 1, "tokens": 2048, "seconds": 0.25}]}))
    return str(path)


def test_compile_with_calibration(tmp_path):
    base = lockstep("compile", "--model", "tiny", "--pool", "cpu:1", "--json")
    calibrated = lockstep("compile", "--model", "tiny", "--pool", "cpu:1", "--calibration",
                          write_calibration(tmp_path), "--json")
    assert calibrated.returncode == 0, calibrated.stderr
    tpot = json.loads(calibrated.stdout)["predictions"][0]["tpot_s"]
    assert tpot == pytest.approx(json.loads(base.stdout)["predictions"][0]["tpot_s"] + 4 * 0.25, rel=0.01)


BAD_INPUTS = {
    "unknown model": (["--model", "llama-9", "--pool", "cpu:1"], "unknown model 'llama-9'"),
    "malformed pool": (["--model", "tiny", "--pool", "lpu:x"], "malformed pool 'lpu:x'"),
    "unknown device": (["--model", "tiny", "--pool", "tpu:4"], "unknown device 'tpu'"),
    "bad topology": (["--model", "tiny", "--pool", "lpu:4@star"], "unknown topology 'star'"),
    "zero slots": (["--model", "tiny", "--pool", "cpu:1", "--max-slots", "0"], "max-slots must be a positive"),
    "non-integer slots": (["--model", "tiny", "--pool", "cpu:1", "--max-slots", "abc"], "invalid int value: 'abc'"),
    "prompt too long": (["--model", "tiny", "--pool", "cpu:1", "--prompt-len", "2048"], "must be below max-context"),
    "context too long": (["--model", "tiny", "--pool", "cpu:1", "--max-context", "4096"], "exceeds tiny's"),
    "bad dtype": (["--model", "tiny", "--pool", "cpu:1", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    "bad objective": (["--model", "tiny", "--pool", "cpu:1", "--objective", "fast"], "unknown objective 'fast'"),
    "does not fit": (["--model", "llama-2-70b", "--dtype", "fp16", "--pool", "lpu:8"], "the pool has 8"),
    "missing calibration": (["--model", "tiny", "--pool", "cpu:1", "--calibration", "/nonexistent/cal.json"],
                            "does not exist"),
    "missing pool file": (["--model", "tiny", "--pool", "/nonexistent/pool.toml"], "does not exist"),
    "missing --model": (["--pool", "cpu:1"], "required: --model"),
    "unknown flag": (["--model", "tiny", "--pool", "cpu:1", "--fast"], "unrecognized arguments: --fast"),
}


def assert_one_line_error(out, expected):
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("lockstep")
    assert expected in lines[0]
    assert out.stdout == ""


@pytest.fixture(scope="module")
def bad_input_runs():
    """Every BAD_INPUTS case, run as concurrent subprocesses (each is mostly interpreter start-up)."""
    procs = {case: subprocess.Popen(COMMAND + ["compile", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for case, (args, _) in BAD_INPUTS.items()}
    runs = {}
    for case, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        runs[case] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return runs


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(bad_input_runs, case):
    assert_one_line_error(bad_input_runs[case], BAD_INPUTS[case][1])


def test_unwritable_output_is_one_line_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = lockstep("compile", "--model", "tiny", "--pool", "cpu:1", "-o", str(blocker / "plan.json"))
    assert_one_line_error(out, str(blocker))


def test_missing_subcommand():
    out = lockstep()
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1


@pytest.mark.parametrize("case", ["unicode pool count", "non-numeric rope_theta", "flops_per_s not a table",
                                  "nan hop latency"])
def test_bad_values_do_not_crash_the_cli(tmp_path, case):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "rope_theta": "big"}))
    (tmp_path / "flops.toml").write_text('[[devices]]\npreset = "lpu"\nflops_per_s = 5\n')
    (tmp_path / "nan.toml").write_text('hop_latency_us = nan\n[[devices]]\npreset = "lpu"\ncount = 2\n')
    args = {
        "unicode pool count": ["--model", "tiny", "--pool", "lpu:²"],
        "non-numeric rope_theta": ["--model", str(tmp_path / "m"), "--pool", "cpu:1"],
        "flops_per_s not a table": ["--model", "tiny", "--pool", str(tmp_path / "flops.toml")],
        "nan hop latency": ["--model", "tiny", "--pool", str(tmp_path / "nan.toml")],
    }[case]
    out = lockstep("compile", *args)
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1
