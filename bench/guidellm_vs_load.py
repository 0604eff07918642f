"""GuideLLM (a standard LLM benchmark tool nobody here wrote) against `lockstep load` on the
same running server and load shape: GuideLLM over the OpenAI-compatible HTTP port
(/v1/completions, synthetic prompts), `lockstep load` over gRPC, closed loop at each
concurrency, alternating, in one run. Prints TTFT, ITL and output tokens/s side by side.

GuideLLM pins its own dependencies, so it lives in a virtual environment of its own:

    python3 -m venv /tmp/glv && /tmp/glv/bin/pip install guidellm==0.7.3
    .venv/bin/lockstep serve --model smollm2-135m --pool cpu --no-ray --fixed-pacing --port 50571 --http-port 8011 &
    .venv/bin/python bench/guidellm_vs_load.py --grpc 127.0.0.1:50571 --http 127.0.0.1:8011 \\
        --folder ~/.cache/lockstep/gguf/smollm2-135m-... --guidellm /tmp/glv/bin/guidellm

GuideLLM's synthetic prompts of N tokens arrive as N + 1 (the tokenizer's BOS), so
`lockstep load` sends N + 1 token prompts. `--fixed-pacing` keeps the cadence the same
for both tools (a re-pace between runs would move both TPOTs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def guidellm(args, concurrency: int, requests: int, out: Path) -> dict:
    cmd = [args.guidellm, "run",
           "--backend", f"kind=openai_http,target=http://{args.http},model={args.model},request_format=/v1/completions",
           "--profile", f"kind=concurrent,streams={concurrency}", "--constraint", f"kind=max_requests,count={requests}",
           "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_len},output_tokens={args.output_len}",
           "--tokenizer", f"kind=hf_auto,model={args.folder}", "--output", f"kind=json,path={out}",
           "--disable-console-interactive"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=out.parent)
    b = json.loads(out.read_text())["benchmarks"][0]
    m = lambda k: b["metrics"][k]["successful"]
    return {"ttft_p50": m("time_to_first_token_ms")["median"], "ttft_p99": m("time_to_first_token_ms")["percentiles"]["p99"],
            "itl_p50": m("inter_token_latency_ms")["median"], "itl_p99": m("inter_token_latency_ms")["percentiles"]["p99"],
            "tok_s": b["metrics"]["output_tokens_per_second"]["successful"]["mean"]}


def lockstep_load(args, concurrency: int, requests: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "client.loadgen", "--target", args.grpc, "--prompt-len", str(args.prompt_len + 1),
           "--output-len", str(args.output_len), "--seed", "0", "--warmup", "2", "--concurrency", str(concurrency),
           "--requests", str(requests), "--output", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    s = json.loads((out / "summary.json").read_text())["summary"]
    return {"ttft_p50": s["ttft_s"]["p50"] * 1e3, "ttft_p99": s["ttft_s"]["p99"] * 1e3,
            "itl_p50": s["itl_s"]["p50"] * 1e3, "itl_p99": s["itl_s"]["p99"] * 1e3, "tok_s": s["output_tokens_per_s"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grpc", required=True)
    p.add_argument("--http", required=True)
    p.add_argument("--folder", required=True, help="the model's checkpoint folder (GuideLLM's tokenizer)")
    p.add_argument("--guidellm", default="guidellm", help="the guidellm executable")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for concurrency, requests in ((1, 8), (8, 32)):
            g = guidellm(args, concurrency, requests, Path(tmp) / f"guidellm-{concurrency}.json")
            ours = lockstep_load(args, concurrency, requests, Path(tmp) / f"load-{concurrency}")
            rows += [(f"c={concurrency}", "GuideLLM (HTTP)", g), (f"c={concurrency}", "lockstep load (gRPC)", ours)]
            rows.append((f"c={concurrency}", "GuideLLM / load", {k: g[k] / ours[k] for k in g}))
    keys = ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "tok_s")
    print(f"{args.model}, prompts {args.prompt_len} tokens (+ BOS), outputs {args.output_len}, closed loop")
    print(f"{'load':<5} {'client':<21}" + "".join(f"{k:>10}" for k in keys))
    for load, who, r in rows:
        fmt = "{:>10.2f}" if "/" in who else "{:>10.1f}"
        print(f"{load:<5} {who:<21}" + "".join(fmt.format(r[k]) for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
