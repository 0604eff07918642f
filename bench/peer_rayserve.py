"""The baseline peer: Lockstep's model and weights served by Ray Serve.

A Ray Serve deployment holds a Hugging Face `LlamaForCausalLM` built from Lockstep's preset
(`scheduler.get_model`) and filled with exactly the weights `lockstep serve` uses
(`server.runtime.weights.init_random(stage, seed)` on a full `StageModel`, copied by name). Requests
come in through Ray Serve's gRPC ingress speaking Lockstep's own API
(protos/lockstep/v1/lockstep.proto), so `lockstep load` drives both servers unchanged.

Batching is Ray Serve's: `@serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)` on a
streaming (async generator) handler. Each batch is left-padded, prefilled once, then
decoded step by step with the HF model's forward and a `DynamicCache`; every step yields
one token to each request of the batch. Batches run one at a time (static batching: a
request that arrives mid-batch waits for the batch to end), which is the behaviour the
baseline is meant to show.

    .venv/bin/python bench/peer_rayserve.py [--model small] [--seed 0] [--port 0] [--duration-s 600]

Prints `peer ready grpc=127.0.0.1:PORT` once it answers, runs until SIGTERM / SIGINT or
--duration-s, then shuts Serve and Ray down. Note: Ray Serve's gRPC proxy binds
`[::]:PORT` (all interfaces; ray/serve/_private/grpc_util.py); the ready line and the
load generator use loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protos.lockstep.v1 import lockstep_pb2 as pb  # noqa: E402

MAX_BATCH = 8
BATCH_WAIT_S = 0.01


def build_hf_model(model_name: str, seed: int, dtype: str = "fp32"):
    """A LlamaForCausalLM with Lockstep's config and exactly Lockstep's seeded weights
    (drawn in fp32, as Lockstep draws them, then cast to `dtype`, as Lockstep casts them)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import scheduler
    from server.runtime.model import StageModel
    from server.runtime.weights import init_random

    spec = scheduler.get_model(model_name)
    config = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position, rope_theta=spec.rope_theta, rms_norm_eps=spec.norm_eps,
        tie_word_embeddings=spec.tie_embeddings, hidden_act="silu", attention_bias=False, mlp_bias=False,
        pad_token_id=0, bos_token_id=None, eos_token_id=None)
    if spec.is_moe or spec.rope_scaling:
        raise SystemExit(f"peer: model {spec.name!r} is not a plain Llama (MoE / rope scaling)")
    stage = StageModel(spec, 0, spec.num_layers + 2, slots=1, max_context=16, dtype=torch.float32)
    init_random(stage, seed)
    weights = {k: v for k, v in stage.state_dict().items() if not k.startswith("cache")}
    del stage
    hf = LlamaForCausalLM(config).to(torch.float32)
    result = hf.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if "rotary" not in k]
    if missing or result.unexpected_keys:
        raise SystemExit(f"peer: weight names differ: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    hf.eval()
    return spec, hf.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])


def _deployment_class():
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    class LockstepPeer:
        def __init__(self, model_name: str, seed: int, threads: int, dtype: str):
            import torch
            torch.set_num_threads(threads)
            self.torch = torch
            self.spec, self.model = build_hf_model(model_name, seed, dtype)
            self.dtype = dtype
            self.started = time.time()
            self.in_flight = 0
            self.batches = 0
            # One warm-up pass so the first measured batch does not pay for lazy init.
            with torch.inference_mode():
                self.model(input_ids=torch.zeros((1, 4), dtype=torch.long), use_cache=False)

        # ---- RPCs (method names match the proto's; Serve's gRPC proxy routes by name) ----

        def GetModelInfo(self, request: pb.GetModelInfoRequest) -> pb.ModelInfo:
            return pb.ModelInfo(model=self.spec.name, pool="cpu", dtype=self.dtype, max_slots=MAX_BATCH,
                                max_context=self.spec.max_position, vocab_size=self.spec.vocab_size,
                                executor="ray-serve+transformers", deterministic=False,
                                max_prompt_tokens=self.spec.max_position - 1,
                                max_tokens_limit=self.spec.max_position - 1)

        def GetServerStatus(self, request: pb.GetServerStatusRequest) -> pb.ServerStatus:
            return pb.ServerStatus(queue_length=0, slots_in_use=min(self.in_flight, MAX_BATCH),
                                   max_slots=MAX_BATCH, running=self.in_flight, ticks=self.batches,
                                   accepting=True, uptime_s=time.time() - self.started)

        async def Generate(self, request: pb.GenerateRequest):
            start = time.time()
            if request.WhichOneof("prompt") != "token_ids" or not request.token_ids.ids:
                raise ValueError("the peer takes token_ids prompts only")
            prompt = [int(i) % self.spec.vocab_size for i in request.token_ids.ids]
            max_tokens = max(1, int(request.max_tokens or 16))
            self.in_flight += 1
            n, first = 0, None
            try:
                async for token_id in self._batched((prompt, max_tokens, request.sampling.temperature,
                                                      int(request.sampling.seed))):
                    now = time.time()
                    first = first if first is not None else now
                    yield pb.GenerateResponse(token=pb.Token(id=token_id, index=n, sent_unix_s=now))
                    n += 1
            finally:
                self.in_flight -= 1
            end = time.time()
            ttft = (first - start) if first is not None else 0.0
            tpot = (end - first) / (n - 1) if n > 1 else 0.0
            yield pb.GenerateResponse(finished=pb.Finished(
                finish_reason="length", prompt_tokens=len(prompt), completion_tokens=n,
                measured_ttft_s=ttft, measured_tpot_s=tpot, request_id=request.request_id,
                e2e_s=end - start))

        # ---- the batch: static, left-padded, one token per request per step ----

        @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
        async def _batched(self, items: list[tuple]):
            torch = self.torch
            from transformers import DynamicCache

            self.batches += 1
            B = len(items)
            lens = [len(p) for p, *_ in items]
            width = max(lens)
            ids = torch.zeros((B, width), dtype=torch.long)  # pad id 0, left padding
            mask = torch.zeros((B, width), dtype=torch.long)
            for b, (p, *_rest) in enumerate(items):
                ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[b, width - len(p):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            limits = [m for _, m, _, _ in items]
            gens = [torch.Generator().manual_seed(s) for *_, s in items]
            temps = [t for _, _, t, _ in items]
            cache = DynamicCache()
            done = [False] * B
            for step in range(max(limits)):
                with torch.inference_mode():
                    out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                     past_key_values=cache, use_cache=True)
                logits = out.logits[:, -1, :].float()
                cache = out.past_key_values
                next_ids = []
                for b in range(B):
                    if temps[b] > 0:
                        probs = torch.softmax(logits[b] / temps[b], -1)
                        next_ids.append(int(torch.multinomial(probs, 1, generator=gens[b])))
                    else:
                        next_ids.append(int(torch.argmax(logits[b])))
                results = []
                for b in range(B):
                    if done[b]:
                        results.append(StopIteration)
                    else:
                        results.append(next_ids[b])
                        done[b] = step + 1 >= limits[b]
                yield results
                await asyncio.sleep(0)  # let the replica send this step's tokens
                if all(done):
                    break
                ids = torch.tensor(next_ids, dtype=torch.long).unsqueeze(1)
                mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.long)], dim=1)
                positions = positions[:, -1:] + 1
            # Returning ends every stream still open (Serve sets StopAsyncIteration).

    return LockstepPeer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="peer_rayserve", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", help="Lockstep preset (default small)")
    p.add_argument("--seed", type=int, default=0, help="weight seed, as init_random (default 0)")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0: pick a free one)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="weights and compute (default fp32)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in the replica (default 2)")
    p.add_argument("--duration-s", type=float, default=600.0, help="exit after this long (0: until a signal)")
    args = p.parse_args(argv)

    # Ray's workers (the gRPC proxy imports the servicer function) must find the repo's packages.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions, HTTPOptions

    port = args.port or free_port()
    stop = threading.Event()
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1", configure_logging=False)
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=free_port()),
                    grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[
                        "protos.lockstep.v1.lockstep_pb2_grpc.add_LockstepServicer_to_server"]))
        serve.run(_deployment_class().bind(args.model, args.seed, args.threads, args.dtype), name="lockstep-peer",
                  blocking=False)
        # Ready once the gRPC ingress answers GetModelInfo.
        import grpc
        from protos.lockstep.v1 import lockstep_pb2_grpc as pb_grpc
        target = f"127.0.0.1:{port}"
        with grpc.insecure_channel(target) as ch:
            stub, deadline = pb_grpc.LockstepStub(ch), time.time() + 120
            while True:
                try:
                    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
                    break
                except grpc.RpcError:
                    if time.time() > deadline or stop.is_set():
                        raise
                    time.sleep(0.5)
        print(f"peer ready grpc={target} model={info.model} executor={info.executor} "
              f"max_batch={MAX_BATCH} batch_wait_s={BATCH_WAIT_S}", flush=True)
        stop.wait(args.duration_s or None)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    print("peer stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
