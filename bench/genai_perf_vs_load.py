"""GenAI-Perf (NVIDIA's LLM benchmark, driving perf_analyzer: tools nobody here wrote)
against `lockstep load`, on one running server at the same load shape: GenAI-Perf through
the KServe v2 / Triton door (`--endpoint-type kserve --backend vllm`, decoupled streaming,
synthetic prompts cut to N tokens by the model's own tokenizer), `lockstep load` through
the native gRPC door (N-token prompts); closed loop at each concurrency, alternating, in
one run. Prints TTFT, per-request inter-token latency and output tokens/s side by side.

The tools need a setup of their own (bench/genai_perf_setup.sh: perf_analyzer 2.51 with
two libraries, GenAI-Perf 0.0.16), then:

    bash bench/genai_perf_setup.sh /work/.genai-perf
    .venv/bin/python bench/genai_perf_vs_load.py --tools /work/.genai-perf

Started here: `lockstep serve --model smollm2-135m --no-ray` (defaults: deterministic, the
host's fastest dtype), HTTP off. GenAI-Perf's ITL is per request ((latency - TTFT) /
(tokens - 1)), so `lockstep load`'s column is its TPOT, the same quantity; GenAI-Perf counts
output tokens by re-tokenizing the text (62-65 for 64 here), `lockstep load` by message.
Both clients run on the server's host: on 2 cores perf_analyzer's own threads take CPU the
engine would use, which is part of what this measures.
"""

from __future__ import annotations

import argparse
import glob
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from peer_vllm import MODEL, settle, start_lockstep, stop  # noqa: E402

KEYS = ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "tok_s")


def genai_perf(args, target: str, concurrency: int, requests: int, out: Path) -> dict:
    cmd = ["genai-perf", "profile", "-m", MODEL, "--endpoint-type", "kserve",
           "--backend", "vllm", "-u", target, "--streaming", "--concurrency", str(concurrency),
           "--request-count", str(requests), "--warmup-request-count", "0",
           "--synthetic-input-tokens-mean", str(args.prompt_len), "--synthetic-input-tokens-stddev", "0",
           "--output-tokens-mean", str(args.output_len), "--output-tokens-mean-deterministic",
           "--tokenizer", args.folder, "--artifact-dir", str(out)]
    # env.sh: perf_analyzer's libraries, both tools on PATH, the hub offline.
    shell = f". {shlex.quote(str(args.tools / 'env.sh'))} && exec {shlex.join(cmd)}"
    subprocess.run(["bash", "-c", shell], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    (found,) = glob.glob(str(out / "*" / "profile_export_genai_perf.json"))
    d = json.loads(Path(found).read_text())
    return {"ttft_p50": d["time_to_first_token"]["p50"], "ttft_p99": d["time_to_first_token"]["p99"],
            "itl_p50": d["inter_token_latency"]["p50"], "itl_p99": d["inter_token_latency"]["p99"],
            "tok_s": d["output_token_throughput"]["avg"]}


def lockstep_load(args, target: str, concurrency: int, requests: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "client.loadgen", "--target", target, "--prompt-len", str(args.prompt_len),
           "--output-len", str(args.output_len), "--seed", "0", "--warmup", "0", "--concurrency", str(concurrency),
           "--requests", str(requests), "--output", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, timeout=900)
    s = json.loads((out / "summary.json").read_text())["summary"]
    return {"ttft_p50": s["ttft_s"]["p50"] * 1e3, "ttft_p99": s["ttft_s"]["p99"] * 1e3,
            "itl_p50": s["tpot_s"]["p50"] * 1e3, "itl_p99": s["tpot_s"]["p99"] * 1e3, "tok_s": s["output_tokens_per_s"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tools", type=Path, default=Path("/work/.genai-perf"), help="bench/genai_perf_setup.sh's DIR")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--lockstep-flags", default="", help="more `lockstep serve` flags")
    args = p.parse_args()
    if not (args.tools / "env.sh").exists():
        p.exit(2, f"{p.prog}: error: no {args.tools}/env.sh: run bash bench/genai_perf_setup.sh {args.tools}\n")
    from server.runtime.gguf import resolve

    args.folder = resolve(MODEL, "")[1]  # the packaged model's folder: GenAI-Perf's tokenizer
    loads = ((1, 8), (8, 32))
    results: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        proc, _, _ = start_lockstep(["--http-port", "-1", *args.lockstep_flags.split()], Path(tmp) / "lockstep.log")
        try:
            for r in range(args.rounds):
                for concurrency, requests in loads:
                    tools = [("GenAI-Perf (KServe)", genai_perf), ("lockstep load (gRPC)", lockstep_load)]
                    for who, run in tools if r % 2 == 0 else reversed(tools):
                        settle()
                        out = Path(tmp) / f"{who.split()[0]}-{concurrency}-{r}"
                        results.setdefault((concurrency, who), []).append(
                            run(args, proc.grpc_target, concurrency, requests, out))
        finally:
            stop(proc)
    print(f"{MODEL}, prompts {args.prompt_len} tokens, outputs {args.output_len}, closed loop, "
          f"{args.rounds} rounds (means of the rounds' figures); ITL per request (ms)")
    print(f"{'load':<5} {'client':<22}" + "".join(f"{k:>10}" for k in KEYS))
    for concurrency, _ in loads:
        rows = {}
        for who in ("GenAI-Perf (KServe)", "lockstep load (gRPC)"):
            runs = results[(concurrency, who)]
            rows[who] = {k: sum(x[k] for x in runs) / len(runs) for k in KEYS}
            print(f"c={concurrency:<3} {who:<22}" + "".join(f"{rows[who][k]:>10.1f}" for k in KEYS))
        g, ours = rows["GenAI-Perf (KServe)"], rows["lockstep load (gRPC)"]
        print(f"c={concurrency:<3} {'GenAI-Perf / load':<22}" + "".join(f"{g[k] / ours[k]:>10.2f}" for k in KEYS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
