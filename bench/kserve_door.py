"""The KServe v2 / Triton door against the native gRPC door: the same load, on one server,
measured side by side in one run. The goal: the door adds no measurable cost (TTFT and
ITL within 5% of the native door's).

One `lockstep serve --no-ray` (the packaged SmolLM2-135M-Instruct, default settings:
deterministic mode, the host's fastest dtype). Each load runs through both doors in turn,
round after round, the order alternating (ABBA...), so both doors see the host within
seconds of each other. Native: `lockstep.v1.Lockstep/Generate` with grpc.aio, as
`lockstep load` drives it. KServe: `tritonclient.grpc.aio` (the client Triton's users
run), `ModelStreamInfer` with the vLLM backend's tensors, one stream per request. Both
clients in one asyncio loop in this process, one channel each; a token's time is when
the client's loop received it.

Loads: concurrency 1 (12 requests a round) and concurrency 8 (32 a round); the same
19-word story opening, 32 output tokens, greedy. Prints TTFT and ITL p50/p99 per door and the
KServe/native ratios.

    .venv/bin/python bench/kserve_door.py [--rounds 3] [--out out/kserve-door]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from peer_vllm import MODEL, OUTPUT_TOKENS, settle, start_lockstep, stop  # noqa: E402
from protos.lockstep.v1 import lockstep_pb2 as pb  # noqa: E402
from protos.lockstep.v1 import lockstep_pb2_grpc as pb_grpc  # noqa: E402

LOADS = {"c=1": (1, 12), "c=8": (8, 32)}  # name -> (concurrency, requests a round)
# A story to continue: greedy, it runs past 32 tokens without end-of-sequence (neither door
# has vLLM's ignore_eos on the native side; peer_vllm.py's instruction ends at once
# without the chat template).
PROMPT = "Once upon a time, in a small village by the sea, there lived an old lighthouse keeper named"


async def native(stub, prompt: str, n: int) -> list[float]:
    """Token receipt times (perf_counter seconds) of one Generate, the send time first."""
    times = [time.perf_counter()]
    async for m in stub.Generate(pb.GenerateRequest(text=prompt, max_tokens=n), timeout=120):
        if m.HasField("token"):
            times.append(time.perf_counter())
    return times


def kserve_inputs(tc, prompt: str, n: int) -> list:
    text = tc.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt], dtype=object))
    stream = tc.InferInput("stream", [1], "BOOL")
    stream.set_data_from_numpy(np.array([True]))
    params = tc.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([json.dumps({"max_tokens": n, "temperature": 0})], dtype=object))
    return [text, stream, params]


async def kserve(client, tc, prompt: str, n: int) -> list[float]:
    """Token receipt times of one request on a ModelStreamInfer stream of its own, the send time first."""
    async def one():
        yield {"model_name": MODEL, "inputs": kserve_inputs(tc, prompt, n), "enable_empty_final_response": True}

    times = [time.perf_counter()]
    async for result, error in client.stream_infer(one(), stream_timeout=120):
        if error is not None:
            raise RuntimeError(f"KServe door: {error}")
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
        times.append(time.perf_counter())
    return times


async def load(call, concurrency: int, n: int) -> list[list[float]]:
    left = list(range(n))

    async def worker():
        out = []
        while left:
            left.pop()
            out.append(await call())
        return out

    return [t for w in await asyncio.gather(*(worker() for _ in range(concurrency))) for t in w]


def stats(runs: list[list[float]]) -> dict:
    ttft = [t[1] - t[0] for t in runs]
    itl = [b - a for t in runs for a, b in zip(t[1:], t[2:])]
    q = lambda xs, p: float(np.percentile(xs, p))  # noqa: E731
    return {"requests": len(runs), "tokens": sum(len(t) - 1 for t in runs),
            "ttft_p50_s": q(ttft, 50), "ttft_p99_s": q(ttft, 99), "itl_p50_s": q(itl, 50), "itl_p99_s": q(itl, 99)}


async def measure(target: str, rounds: int) -> dict:
    import tritonclient.grpc.aio as tc

    channel = grpc.aio.insecure_channel(target)
    stub = pb_grpc.LockstepStub(channel)
    client = tc.InferenceServerClient(target)
    doors = {"native": lambda: native(stub, PROMPT, OUTPUT_TOKENS),
             "kserve": lambda: kserve(client, tc, PROMPT, OUTPUT_TOKENS)}
    for name, door in doors.items():  # warm both paths (and check each answers the whole length)
        got = len(await door()) - 1
        if got != OUTPUT_TOKENS:
            raise SystemExit(f"{name} door: {got} tokens, not {OUTPUT_TOKENS} (the prompt reached end-of-sequence?)")
    runs = {load_name: {d: [] for d in doors} for load_name in LOADS}
    for r in range(rounds):
        order = list(doors) if r % 2 == 0 else list(reversed(doors))
        for load_name, (concurrency, n) in LOADS.items():
            for d in order:
                settle()
                runs[load_name][d] += await load(doors[d], concurrency, n)
    await client.close()
    await channel.close()
    return {load_name: {d: stats(rs) for d, rs in by_door.items()} for load_name, by_door in runs.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "out" / "kserve-door")
    p.add_argument("--lockstep-flags", default="", help="more `lockstep serve` flags")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    proc, _, _ = start_lockstep(args.lockstep_flags.split(), args.out / "lockstep.log")
    try:
        figures = asyncio.run(measure(proc.grpc_target, args.rounds))
    finally:
        stop(proc)
    (args.out / "summary.json").write_text(json.dumps(figures, indent=2))
    ms = lambda x: f"{x * 1e3:8.2f}"  # noqa: E731
    print(f"\n{MODEL}, 19-word prompt, {OUTPUT_TOKENS} tokens, {args.rounds} rounds (requests per door: "
          + ", ".join(f"{k} {v['native']['requests']}" for k, v in figures.items()) + ")")
    print(f"{'load':<5} {'door':<7} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>9} {'ITL p99':>9}   (ms)")
    for load_name, by_door in figures.items():
        for d, s in by_door.items():
            print(f"{load_name:<5} {d:<7} {ms(s['ttft_p50_s'])} {ms(s['ttft_p99_s'])} {ms(s['itl_p50_s'])} "
                  f"{ms(s['itl_p99_s'])}")
        k, n = by_door["kserve"], by_door["native"]
        ratios = {key: k[key] / n[key] for key in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s")}
        worst = max(abs(v - 1) for v in ratios.values())
        print(f"{load_name:<5} kserve/native: " + ", ".join(f"{key[:-2]} {v:.3f}" for key, v in ratios.items())
              + f"   (worst {worst * 100:.1f}% off; goal within 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
