"""bench/compare.py's table and bench/peer_rayserve.py's weight copy (no servers started)."""

import pytest
import torch

from tests.bench import load_bench


def _summary(tok_s, ttft, itl50, itl99, good):
    return {"ok": 4, "requests": 4, "output_tokens_per_s": tok_s, "goodput_requests_per_s": good,
            "ttft_s": {"p50": ttft, "p99": 2 * ttft}, "itl_s": {"p50": itl50, "p99": itl99}}


def test_table_has_rows_and_ratios():
    compare = load_bench("compare")
    results = {"lockstep": {"c=1": _summary(20.0, 0.1, 0.05, 0.055, 1.0)},
               "peer": {"c=1": _summary(10.0, 0.2, 0.05, 0.1, 0.5)}}
    text = compare.table(results, ["c=1"])
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["server", "load"]
    ratio = next(line for line in lines if line.startswith("Lockstep/baseline"))
    assert "2.00x" in ratio and "0.50x" in ratio and "0.55x" in ratio  # tok/s, TTFT, ITL p99/p50 1.1/2.0
    assert lines[0].split()[-1] == "overruns/ticks" and lines[2].split()[-1] == "-"  # not scraped here
    results["lockstep"]["c=1"].update(server_ticks=400.0, server_overruns=3.0)
    assert compare.table(results, ["c=1"]).splitlines()[2].split()[-1] == "3/400"


def test_table_without_peer_has_no_ratio_row():
    compare = load_bench("compare")
    text = compare.table({"lockstep": {"c=8": _summary(5.0, 0.1, 0.05, 0.05, 1.0)}}, ["c=8"])
    assert "Lockstep/baseline" not in text and "Lockstep" in text


def test_peer_model_matches_lockstep_weights():
    pytest.importorskip("transformers")
    peer = load_bench("peer_rayserve")
    import scheduler
    from server.runtime.model import StageModel
    from server.runtime.weights import init_random

    spec, hf = peer.build_hf_model("tiny", 0)
    stage = StageModel(spec, 0, spec.num_layers + 2, slots=1, max_context=16, dtype=torch.float32)
    init_random(stage, 0)
    ours = {k: v for k, v in stage.state_dict().items() if not k.startswith("cache")}
    theirs = hf.state_dict()
    assert ours.keys() <= theirs.keys()
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k
    assert spec is scheduler.get_model("tiny")
