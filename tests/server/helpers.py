"""Shared test helpers: drive an executor step by step as the engine will, and build small
Hugging Face checkpoints with `transformers` itself (random init, save_pretrained): a
reference nobody here wrote."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import pytest
import ray
import torch

import scheduler
from server.app import LockstepServer
from server.config import ServeConfig
from server.runtime.executor import LocalExecutor
from server.runtime.stage import plan_from_program
from server.runtime.sampling import GREEDY, SamplingParams, sample
from server.runtime.step import StepBatch, tensorize

OPTIONS = scheduler.CompileOptions(dtype="fp32", max_slots=8, max_context=256, prefill_chunk=32, prompt_len=16)
HF_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512,
                initializer_range=0.1)  # wider than the default 0.02, so greedy text is not one repeated token
HF_MODELS = {  # name -> (class name, config class name, extra config)
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(num_hidden_layers=3)),
    "llama-tied": ("LlamaForCausalLM", "LlamaConfig", dict(num_hidden_layers=2, tie_word_embeddings=True)),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig",
                dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)),
}


def step_logits(executor: LocalExecutor, batch: StepBatch) -> tuple[torch.Tensor, list[int]]:
    """LocalExecutor.step, keeping the logits: ([rows, V] fp32, sampled ids)."""
    meta = tensorize(batch, executor.runners[0].scratch_slot, executor.plan.max_context)
    x = meta.tokens
    for runner in executor.runners:
        x, _ = runner.run(x, meta)
    return x, sample(x, list(batch.sampling), batch.sample_positions())


@dataclass
class Seq:
    """One sequence: its slot, prompt, sampling, and what it has produced so far."""

    slot: int
    prompt: list[int]
    params: SamplingParams = GREEDY
    done: int = 0  # prompt tokens already prefilled
    out: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # one [V] row per sampled token

    @property
    def position(self) -> int:  # of the next token fed in
        return self.done if self.done < len(self.prompt) else len(self.prompt) + len(self.out) - 1

    def next_tokens(self, chunk: int) -> tuple[int, ...]:
        if self.done < len(self.prompt):
            return tuple(self.prompt[self.done:self.done + chunk])
        return (self.out[-1],)


def run_step(executor: LocalExecutor, seqs: list[Seq], bucket: int, chunk: int) -> None:
    """One step for `seqs` (all prefilling with `chunk`, or all decoding with chunk 1), in row order."""
    phase = "decode" if chunk == 1 else "prefill"
    toks = [s.next_tokens(chunk) for s in seqs]
    batch = StepBatch(phase, bucket, chunk, tuple(s.slot for s in seqs), tuple(toks),
                      tuple(s.position for s in seqs), tuple(s.params for s in seqs))
    logits, ids = step_logits(executor, batch)
    for row, (s, t) in enumerate(zip(seqs, toks)):
        prefilling = s.done < len(s.prompt)
        s.done += len(t) if prefilling else 0
        if s.done == len(s.prompt):  # a finished prompt or a decode step samples a token
            s.out.append(ids[row])
            s.logits.append(logits[row].clone())


def generate(executor: LocalExecutor, slot: int, prompt: list[int], n: int, params: SamplingParams = GREEDY,
             chunk: int = 32) -> Seq:
    """The sequence alone (bucket 1): prefill in chunks, then n - 1 decode steps."""
    seq = Seq(slot, list(prompt), params)
    while seq.done < len(seq.prompt):
        run_step(executor, [seq], 1, chunk)
    while len(seq.out) < n:
        run_step(executor, [seq], 1, 1)
    return seq


def start_ray(attempts: int = 3, **init_kw) -> None:
    """`ray.init(**init_kw)`, tried again when the local node does not come up.

    On a loaded 2-core host Ray's start-up sometimes misses its own fixed waits: "Timed out
    waiting for file .../gcs_server_port_..." (RuntimeError) or "The current node timed out
    during startup" (a bare Exception after its 30 s raylet wait; this failed a CI run).
    Both passed at once when started again, so a test module starts its cluster here."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**init_kw)
            return
        except Exception as exc:  # Ray raises both kinds above; anything else fails again below
            ray.shutdown()
            if attempt == attempts:
                raise
            print(f"ray.init failed ({exc}); attempt {attempt + 1} of {attempts}", file=sys.stderr)


def start_two_nodes(head: dict, other: dict, attempts: int = 3):
    """A two-node `ray.cluster_utils.Cluster` on loopback with the driver connected to it,
    started again as `start_ray` is when a node misses Ray's start-up waits."""
    from ray.cluster_utils import Cluster
    for attempt in range(1, attempts + 1):
        cluster = None
        try:
            cluster = Cluster(initialize_head=True, head_node_args=head)
            cluster.add_node(**other)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            return cluster
        except Exception as exc:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
            if attempt == attempts:
                raise
            print(f"two-node cluster failed ({exc}); attempt {attempt + 1} of {attempts}", file=sys.stderr)


def random_prompt(n: int, seed: int, vocab: int = 512) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def save_hf_model(name: str, folder):
    """Builds, saves and returns (in eval mode) a random-init transformers model."""
    transformers = pytest.importorskip("transformers")
    model_cls, config_cls, extra = HF_MODELS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**HF_SHAPE, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    model.save_pretrained(folder)  # as written: from_hf_config must read rope_parameters
    return model


def hf_plan(folder, **plan_kw):
    """The checkpoint's spec compiled for cpu:1 at fp32, as a runtime plan loading the checkpoint."""
    program = scheduler.compile(scheduler.from_hf_config(folder), scheduler.parse_pool("cpu:1"), OPTIONS)
    return plan_from_program(program.view(), checkpoint=str(folder), **plan_kw)


class Live:
    """A LockstepServer with HTTP on a free port, on an event loop in a background thread.
    `router` (with its `router_bundle`): serve that RoutedAdmission's replicas instead of
    an engine here."""

    def __init__(self, program, router=None, router_bundle=None, **config):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.config = ServeConfig(program.to_json(), http_port=0, **config)
        if router is not None:
            router = router(self.config)
        self.router = router
        self.server = LockstepServer(self.config, router=router, router_bundle=router_bundle)
        self.info = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(180)
        self.base = f"http://{self.info['http']}/v1"

    def call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def post(self, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
        req = urllib.request.Request(self.base + path, data=body, headers={"content-type": "application/json",
                                                                          **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, dict(resp.headers), json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), json.loads(exc.read())

    def close(self):
        asyncio.run_coroutine_threadsafe(self.server.stop(grace_s=2.0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
