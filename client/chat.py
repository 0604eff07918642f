"""Asks a served chat model questions over gRPC: each question goes through the model's
own chat template (from its checkpoint folder, read with transformers), is sent as token
ids, and the streamed answer is printed as text with its finish reason, token count and
time. Greedy unless --temperature. A secured server takes `--tls-ca`, `--tls-server-name` and
`--auth-token-file`, as `lockstep load` does.

    .venv/bin/python -m client.chat --target 127.0.0.1:50571 --folder ~/.cache/lockstep/gguf/smollm2-135m-... \\
        "What is the capital of France?" ["another question" ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc

from client.client import temperature_arg
from client.connect import add_security_args, security_from_args
from protos.lockstep.v1 import lockstep_pb2 as pb
from protos.lockstep.v1 import lockstep_pb2_grpc as pb_grpc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="chat", description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="host:port of `lockstep serve`")
    p.add_argument("--folder", required=True, type=Path, help="the model's checkpoint folder (tokenizer, chat template)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--temperature", type=temperature_arg, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("questions", nargs="+")
    add_security_args(p)
    args = p.parse_args(argv)
    try:
        security = security_from_args(args)
    except ValueError as exc:
        p.error(str(exc))
    if not (args.folder / "tokenizer.json").is_file():
        p.error(f"--folder {str(args.folder)!r} has no tokenizer.json")
    from server.frontend.tokenizer import ChatTemplate  # after the arguments: a usage error should not wait for transformers

    try:
        template = ChatTemplate(args.folder)
    except ValueError:
        p.error(f"--folder {str(args.folder)!r} has no chat template")
    with security.channel(args.target) as channel:
        stub = pb_grpc.LockstepStub(channel)
        for q in args.questions:
            ids = template.question(q)
            req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), max_tokens=args.max_tokens,
                                     sampling=pb.SamplingParams(temperature=args.temperature, seed=args.seed))
            start, text, n = time.perf_counter(), "", 0
            try:
                for m in stub.Generate(req, metadata=security.metadata):
                    if m.HasField("token"):
                        text, n = text + m.token.text, n + 1
                    else:
                        print(f"{q!r} -> {text!r} | {m.finished.finish_reason} {n} tokens "
                              f"{time.perf_counter() - start:.2f} s", flush=True)
            except grpc.RpcError as exc:
                print(f"chat: {q!r}: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
