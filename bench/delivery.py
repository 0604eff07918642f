"""When tokens leave the server and when they reach the client, side by side.

Runs `--streams` concurrent streams (each `--rounds` requests of a 32-token prompt and 32
tokens) against a running server with the async client, and prints the gaps between a
stream's tokens as the server stamped them (`Token.sent_unix_s`) and as the client
received them, and how late each token arrived (received - sent, same host clock). A
received gap spread wider than the sent one is delivery (the client and the server's
event loop waiting for a core), not the tick.

    .venv/bin/lockstep serve --model small --pool cpu --no-ray --port 50551 &
    .venv/bin/python bench/delivery.py --target 127.0.0.1:50551 [--streams 8] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import numpy as np

from client.aio import AsyncLockstepClient


async def run(target: str, streams: int, rounds: int) -> list[tuple[list[float], list[float]]]:
    rows = []
    async with AsyncLockstepClient(target) as client:
        await client.wait_ready(30)

        async def one(i: int) -> None:
            for k in range(rounds):
                sent, recv = [], []
                async for ev in client.stream([(7 * i + j + k) % 500 for j in range(32)], 32, seed=i):
                    if hasattr(ev, "sent_unix_s"):
                        recv.append(time.time())
                        sent.append(ev.sent_unix_s)
                rows.append((sent, recv))

        await asyncio.gather(*(one(i) for i in range(streams)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="delivery", description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    rows = asyncio.run(run(args.target, args.streams, args.rounds))
    # From the second token on: the first gap includes the prompt's last slice.
    gaps = {"sent gaps": np.concatenate([np.diff(s[1:]) for s, _ in rows]),
            "received gaps": np.concatenate([np.diff(r[1:]) for _, r in rows])}
    for name, x in gaps.items():
        p50, p99 = np.percentile(x, 50), np.percentile(x, 99)
        print(f"{name:<14} p50 {p50 * 1e3:6.1f} ms  p99 {p99 * 1e3:6.1f} ms  p99/p50 {p99 / p50:.3f}")
    late = np.concatenate([np.array(r) - np.array(s) for s, r in rows])
    print(f"received - sent p50 {np.percentile(late, 50) * 1e3:.2f} ms  p99 {np.percentile(late, 99) * 1e3:.2f} ms  "
          f"max {late.max() * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
