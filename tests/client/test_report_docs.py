"""The load-test picture in the README is the run printed beside it: `lockstep load` writes
its printed line and config into the PNGs' metadata (client/report.py), and the README's
image carries the same line as the console block above it, so the picture cannot go stale
while the text is refreshed (it showed a run from before mixed steps)."""

from __future__ import annotations

import json
import pathlib
import re

from PIL import Image

from client.report import RequestRecord, write_outputs

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_pngs_carry_the_line_and_config_of_their_run(tmp_path):
    records = [RequestRecord(i, i / 10, "OK", 4, 3, ttft_s=0.1 + i / 100, itl_s=[0.05, 0.06], e2e_s=0.3)
               for i in range(4)]
    write_outputs(tmp_path, {"ok": 4}, records, {"concurrency": 4}, "lockstep load: closed loop: 4/4 OK")
    for name in ("latency_cdf.png", "itl_over_time.png"):
        info = Image.open(tmp_path / name).text
        assert info["Description"] == "lockstep load: closed loop: 4/4 OK"
        assert json.loads(info["Comment"]) == {"concurrency": 4}


def test_the_readme_picture_is_the_run_printed_beside_it():
    readme = (ROOT / "README.md").read_text()
    block, image = re.search(r"```console\n(\$ [^`]*?lockstep load [^`]*?)```\n\n!\[[^]]*\]\(([^)]+)\)", readme).groups()
    printed = [line for line in block.splitlines() if line.startswith("lockstep load: ") and " OK" in line]
    info = Image.open(ROOT / image).text
    assert printed == [info.get("Description")], (printed, info.get("Description"))
    config = json.loads(info["Comment"])
    command = " ".join(block.replace("\\\n", " ").split())
    for flag in ("concurrency", "requests", "warmup"):
        assert f"--{flag.replace('_', '-')} {config[flag]}" in command, flag
