"""server/programs.py: the flags a program is compiled from, with serve's defaults."""

import json
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
