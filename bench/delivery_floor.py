"""The floor under `bench/peer_vllm.py`'s "within bound" figures: how close to a promised
time can a token reach a client on this host at all?

Starts an HTTP server in its own process (asyncio, as `lockstep serve`'s front end is) that
does no model work: each streamed completion is promised a first token at --ttft-ms and
then one every --tpot-ms (the same `lockstep-predicted-*` headers Lockstep's door sends,
counted from the request's first bytes, as Lockstep counts them), and each token goes out
at exactly its promised time by the event loop's timer. `bench/peer_vllm.py`'s own client
drives it at its loads, and its own `summarize` measures the misses: the client's clock
against send + promise, bound max(10% of the TPOT, 5 ms). With --burn, a second process
runs bf16 matmuls on as many threads as the host has cores the whole time, as the engine
core's steps do (at c=8 they run nearly back to back).

Whatever this gets, a server that computes its tokens cannot beat: the client, the
loopback, the event loop and the cores are the same.

    .venv/bin/python bench/delivery_floor.py [--ttft-ms 100] [--tpot-ms 40] [--burn]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import time

import peer_vllm  # bench/peer_vllm.py: a script's own folder is on sys.path

TOKENS = peer_vllm.OUTPUT_TOKENS


def _serve(port_queue, ttft_s: float, tpot_s: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            arrival = time.perf_counter()  # the first bytes were in the buffer by now: Lockstep stamps as it reads
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
                         b"lockstep-predicted-ttft-s: %.6f\r\nlockstep-predicted-e2e-s: %.6f\r\n\r\n"
                         % (ttft_s, ttft_s + (TOKENS - 1) * tpot_s))
            for k in range(TOKENS):
                await asyncio.sleep(max(0.0, arrival + ttft_s + k * tpot_s - time.perf_counter()))
                chunk = {"choices": [{"index": 0, "text": " x", "finish_reason": None}]}
                writer.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            writer.write(b'data: {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}\n\n'
                         b"data: [DONE]\n\n")
            await writer.drain()
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port_queue.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


def _burn(stop) -> None:
    """Matmuls on every core until `stop` is set: the engine core's steps, roughly."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    a, b = torch.randn(8, 1536, dtype=torch.bfloat16), torch.randn(1536, 4096, dtype=torch.bfloat16)
    while not stop.is_set():
        for _ in range(50):
            a @ b


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ttft-ms", type=float, default=100.0)
    p.add_argument("--tpot-ms", type=float, default=40.0)
    p.add_argument("--burn", action="store_true", help="also keep every core busy with matmuls in another process")
    args = p.parse_args()
    ctx = multiprocessing.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(ports, args.ttft_ms / 1e3, args.tpot_ms / 1e3), daemon=True)
    server.start()
    burner = ctx.Process(target=_burn, args=(stop,), daemon=True) if args.burn else None
    try:
        base = f"http://127.0.0.1:{ports.get(timeout=30)}"
        peer_vllm.closed(base, 1, 2)  # connected once, warm
        if burner:
            burner.start()
            time.sleep(2.0)  # torch imported, its threads busy
        print(f"a server that only keeps its promises: TTFT {args.ttft_ms:g} ms, TPOT {args.tpot_ms:g} ms, "
              f"{TOKENS} tokens; cores {'busy with matmuls' if burner else 'otherwise idle'}")
        print(f"{'load':11} {'TTFT p50':>9} {'ITL p50':>8} {'ITL p99':>8} {'|miss| p99':>11} {'late p99':>9} "
              f"{'within bound':>13}")
        for name, load in peer_vllm.LOADS:
            if not burner:
                peer_vllm.settle()
            t0 = time.perf_counter()
            r = peer_vllm.summarize(load(base), time.perf_counter() - t0)
            print(f"{name:11} {r['ttft_p50']:9.1f} {r['itl_p50']:8.1f} {r['itl_p99']:8.1f} {r['miss_p99_ms']:11.2f} "
                  f"{r['late_p99_ms']:9.2f} {r['within']:13.1%}", flush=True)
    finally:
        stop.set()
        for proc in (server, burner):
            if proc is not None and proc.is_alive():
                proc.terminate()
                proc.join(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
