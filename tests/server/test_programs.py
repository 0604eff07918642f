"""server/programs.py: the flags a program is compiled from, with serve's defaults."""

import json
import os
import subprocess
import sys

import pytest
import torch.cpu

import scheduler
from server import programs


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, "bf16"), (False, True, "bf16"),
                                                         (False, False, "fp32")])
def test_auto_dtype_on_a_cpu_pool_is_bf16_only_where_the_cpu_has_bf16_dot_products(monkeypatch, avx512_bf16, amx,
                                                                                    expected):
    # Other hosts' CPUs, as torch reports them (this host's is one of the three).
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert programs.resolve_dtype("auto", scheduler.parse_pool("cpu")) == expected
    assert programs.resolve_dtype("auto", scheduler.parse_pool("cpu:1+a100:2")) == expected  # the slowest link
    assert programs.resolve_dtype("auto", scheduler.parse_pool("a100:2")) == "bf16"
    for given in ("fp32", "bf16", "fp16", "int8"):
        assert programs.resolve_dtype(given, scheduler.parse_pool("cpu")) == given


def test_a_torch_without_the_cpu_checks_gets_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert programs.resolve_dtype("auto", scheduler.parse_pool("cpu")) == "fp32"


def test_compile_serve_and_calibrate_default_to_this_hosts_dtype(tmp_path):
    host = "bf16" if programs.host_runs_bf16() else "fp32"
    run = subprocess.run([sys.executable, "-m", "server.cli", "compile", "--model", "tiny", "--calibration", "none",
                          "-o", str(tmp_path / "p.json")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "p.json").read_text())["model"]["weight_dtype"] == host
    run = subprocess.run([sys.executable, "-m", "server.cli", "calibrate", "--model", "tiny", "--repeats", "1",
                          "--max-context", "64", "--prefill-chunk", "16", "-o", str(tmp_path / "c.json")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"{host} matmul" in run.stdout


def test_auto_compiled_steps_are_on_for_a_dense_model_on_this_hosts_cpu_only():
    tiny, moe = scheduler.get_model("tiny"), scheduler.get_model("mixtral-8x7b")
    assert programs.resolve_compiled("auto", tiny, scheduler.parse_pool("cpu")) == "on"
    assert programs.resolve_compiled("auto", moe, scheduler.parse_pool("cpu")) == "off"  # MoE routing: eager
    for simulated_or_gpu in ("lpu:4", "a100:2", "cpu:1+a100:2"):
        assert programs.resolve_compiled("auto", tiny, scheduler.parse_pool(simulated_or_gpu)) == "off"
    for given in ("on", "off"):
        assert programs.resolve_compiled(given, moe, scheduler.parse_pool("lpu:4")) == given
    with pytest.raises(scheduler.SpecError, match="LOCKSTEP_COMPILED_STEPS must be one of auto, on, off, not 'yes'"):
        programs.resolve_compiled("yes", tiny, scheduler.parse_pool("cpu"))


def test_the_compiled_steps_default_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("LOCKSTEP_COMPILED_STEPS", raising=False)
    assert programs.compiled_default() == "auto"
    monkeypatch.setenv("LOCKSTEP_COMPILED_STEPS", "off")  # as tests/conftest.py sets it
    assert programs.compiled_default() == "off"


@pytest.mark.parametrize("value", ["yes", "", "ON", "on\n", "\udcff"])
def test_a_bad_compiled_steps_environment_is_one_line_and_exit_2(value):
    env = {**os.environ, "LOCKSTEP_COMPILED_STEPS": value}
    run = subprocess.run([sys.executable, "-m", "server.cli", "compile", "--model", "tiny", "--calibration", "none"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "LOCKSTEP_COMPILED_STEPS must be one of auto, on, off" in run.stderr


def _calibration_args(*flags):
    import argparse

    p = argparse.ArgumentParser()
    programs.add_program_args(p)
    return p.parse_args(["--model", "tiny", "--max-context", "64", "--prefill-chunk", "16", *flags])


def _children() -> set[int]:
    return {int(c) for t in os.listdir("/proc/self/task")
            for c in open(f"/proc/self/task/{t}/children").read().split()}


def test_serve_starts_ray_meanwhile_while_a_calibration_is_measured(tmp_path, monkeypatch):
    """compile_program's `meanwhile(pool)` runs while the calibration's own process measures
    (serve starts Ray there), and the calibration is then read as usual."""
    monkeypatch.setattr(programs, "CACHE_DIR", tmp_path)
    args = _calibration_args()
    seen = []

    def meanwhile(pool):
        seen.append((pool.groups[0].device.name, list(tmp_path.glob("calib-*.json")), len(_children())))

    program, model, pool = programs.compile_program(args, meanwhile=meanwhile)
    assert len(seen) == 1 and seen[0][0] == "cpu" and seen[0][1] == [] and seen[0][2] >= 1, seen  # the measurement's process was running
    assert len(list(tmp_path.glob("calib-*.json"))) == 1
    programs.compile_program(args, meanwhile=meanwhile)  # cached now: nothing to overlap
    assert len(seen) == 1


def test_a_failure_meanwhile_stops_the_calibration_and_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(programs, "CACHE_DIR", tmp_path)
    before = _children()

    def meanwhile(pool):
        raise RuntimeError("ray.init failed")

    with pytest.raises(RuntimeError, match="ray.init failed"):
        programs.compile_program(_calibration_args(), meanwhile=meanwhile)
    assert not list(tmp_path.glob("calib-*.json")) and _children() == before
