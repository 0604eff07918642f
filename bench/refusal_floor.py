"""The floor under bench/soak.py's refusal figures: how fast can a gRPC server on this host
refuse at all?

Starts a gRPC server (grpc.aio, in its own process, as `lockstep serve`'s front end is)
whose `Generate` does nothing but refuse with RESOURCE_EXHAUSTED, and drives it with
bench/soak.py's own client code (`run_stream`, one channel): a burst of --burst calls at
once (soak's is 10x a server's capacity: 720), then --probes single calls one after
another. Whatever these take, a server that does any work to refuse cannot beat: the
client's 720 calls and their answers, the event loops and the cores are the same.

    .venv/bin/python bench/refusal_floor.py [--burst 720] [--probes 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
import grpc

import soak  # bench/soak.py: a script's own folder is on sys.path
from client.client import build_request
from protos.lockstep.v1 import lockstep_pb2_grpc as pb_grpc


class Refuser(pb_grpc.LockstepServicer):
    async def Generate(self, request, context):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        yield  # a server-streaming method: this makes it an async generator


def _serve(port_queue) -> None:
    async def main():
        server = grpc.aio.server()
        pb_grpc.add_LockstepServicer_to_server(Refuser(), server)
        port_queue.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3


async def drive(target: str, burst: int, probes: int) -> tuple[list[float], list[float], float]:
    channel = grpc.aio.insecure_channel(target)
    stub = pb_grpc.LockstepStub(channel)
    await soak.run_stream(target, stub, build_request([1, 2, 3], 4), soak.Stream())  # connected, warm
    streams = [soak.Stream() for _ in range(burst)]
    t0 = time.perf_counter()
    await asyncio.gather(*(soak.run_stream(target, stub, build_request(list(range(16)), 128, request_id=f"b{i}"), s)
                           for i, s in enumerate(streams)))
    wall = time.perf_counter() - t0
    singles = []
    for _ in range(probes):
        s = soak.Stream()
        await soak.run_stream(target, stub, build_request([1, 2, 3], 4), s)
        singles.append(s)
    await channel.close()
    for s in streams + singles:
        if s.ends != ["error:RESOURCE_EXHAUSTED"]:
            raise RuntimeError(f"a call ended {s.ends}, not refused")
    return [s.error_s for s in streams], [s.error_s for s in singles], wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--burst", type=int, default=720, help="calls at once (bench/soak.py: 10x capacity, 720)")
    p.add_argument("--probes", type=int, default=50, help="single calls after the burst")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    ports = multiprocessing.Queue()
    server = multiprocessing.Process(target=_serve, args=(ports,), daemon=True)
    server.start()
    target = f"127.0.0.1:{ports.get(timeout=30)}"
    try:
        print(f"a gRPC server that only refuses, bench/soak.py's client; {args.burst} calls at once, then "
              f"{args.probes} one at a time")
        print(f"{'round':>5} {'burst wall ms':>14} {'burst p50 ms':>13} {'burst p99 ms':>13} {'single p50 ms':>14} "
              f"{'single p99 ms':>14}")
        for i in range(args.rounds):
            burst, singles, wall = asyncio.run(drive(target, args.burst, args.probes))
            print(f"{i + 1:>5} {wall * 1e3:>14.1f} {pct(burst, 0.5):>13.1f} {pct(burst, 0.99):>13.1f} "
                  f"{pct(singles, 0.5):>14.2f} {pct(singles, 0.99):>14.2f}", flush=True)
    finally:
        server.terminate()
        server.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
