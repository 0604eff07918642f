"""A two-node Ray cluster on loopback (ray.cluster_utils.Cluster): each node declares one
simulated chip, so the program's two stages land on different nodes and still stream the
tokens the in-process executor gives."""

from __future__ import annotations

import pytest
import ray

import scheduler
from server.runtime.executor import LocalExecutor
from server.runtime.stage import plan_from_program
from server.runtime.ray_executor import RayExecutor
from server.runtime.sampling import SamplingParams
from tests.server.helpers import OPTIONS, Live, random_prompt, start_two_nodes
from tests.server.runtime.test_ray_executor import generate


@pytest.fixture(scope="module")
def two_nodes():
    cluster = start_two_nodes({"num_cpus": 1, "resources": {"lpu": 1}}, {"num_cpus": 1, "resources": {"lpu": 1}})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_stages_on_two_nodes_stream_the_local_tokens(two_nodes, tmp_path):
    pool = tmp_path / "pool.toml"  # 2 chips of 6 MB: tiny's layers need both
    pool.write_text('topology = "chain"\n[[devices]]\npreset = "lpu"\ncount = 2\nmemory_bytes = 6e6\n')
    program = scheduler.compile(scheduler.get_model("tiny"), scheduler.parse_pool(str(pool)), OPTIONS)
    plan = plan_from_program(program.view())
    assert len(plan.stages) == 2 and {s.resource for s in plan.stages} == {"lpu"}
    rows = [(0, tuple(random_prompt(30, seed=4))), (1, tuple(random_prompt(12, seed=5)))]
    params = [SamplingParams(temperature=0.9, seed=11), SamplingParams()]
    expected = generate(LocalExecutor(plan), rows, params, steps=12)[0]
    executor = RayExecutor(plan)
    try:
        assert len(set(executor.stage_nodes())) == 2  # one stage per node
        assert generate(executor, rows, params, steps=12)[0] == expected
    finally:
        executor.close()


@pytest.mark.slow
def test_lockstep_serves_over_grpc_from_stages_on_two_nodes(two_nodes, tmp_path):
    """The whole server (engine + gRPC) with `--executor ray` on the two-node cluster."""

    import grpc

    from protos.lockstep.v1 import lockstep_pb2 as pb
    from protos.lockstep.v1 import lockstep_pb2_grpc as pb_grpc

    pool = tmp_path / "pool.toml"
    pool.write_text('topology = "chain"\n[[devices]]\npreset = "lpu"\ncount = 2\nmemory_bytes = 6e6\n')
    program = scheduler.compile(scheduler.get_model("tiny"), scheduler.parse_pool(str(pool)), OPTIONS)
    prompt = random_prompt(25, seed=8)
    expected = generate(LocalExecutor(plan_from_program(program.view())), [(0, tuple(prompt))], [SamplingParams()],
                        steps=9)[0][0]
    live = Live(program, executor="ray", deterministic=False, max_tokens=50, engine_process=False)  # reads the executor
    try:
        assert len(set(live.server.executor.stage_nodes())) == 2
        with grpc.insecure_channel(live.info["grpc"]) as channel:
            stub = pb_grpc.LockstepStub(channel)
            req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_tokens=10)
            tokens = [m.token.id for m in stub.Generate(req, timeout=60) if m.WhichOneof("kind") == "token"]
        assert tokens == expected
    finally:
        live.close()


@pytest.mark.slow
def test_pipelined_stages_on_two_nodes_stream_the_local_tokens(two_nodes, tmp_path):
    """`--pipeline`: a row group per stage, their steps in the two nodes' stage actors
    together. Concurrent streams in both groups get the tokens of the unpipelined
    in-process executor."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from protos.lockstep.v1 import lockstep_pb2 as pb
    from protos.lockstep.v1 import lockstep_pb2_grpc as pb_grpc

    pool = tmp_path / "pool.toml"
    pool.write_text('topology = "chain"\n[[devices]]\npreset = "lpu"\ncount = 2\nmemory_bytes = 6e6\n')
    program = scheduler.compile(scheduler.get_model("tiny"), scheduler.parse_pool(str(pool)), OPTIONS)
    prompts = [random_prompt(5 + 7 * i, seed=20 + i) for i in range(4)]  # one prefill step each
    params = [SamplingParams(), SamplingParams(temperature=0.5, seed=3), SamplingParams(),
              SamplingParams(temperature=1.25, seed=8)]  # exact in the proto's float32
    plan = plan_from_program(program.view())
    expected = [generate(LocalExecutor(plan), [(0, tuple(p))], [sp], steps=11)[0][0] for p, sp in zip(prompts, params)]
    live = Live(program, executor="ray", pipeline=True, max_tokens=50)  # the engine core process joins this Ray
    try:
        assert live.info["mode"] == "deterministic+pipelined" 

        def stream(i):
            with grpc.insecure_channel(live.info["grpc"]) as channel:
                sp = params[i]
                req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompts[i]), max_tokens=12,
                                         sampling=pb.SamplingParams(temperature=sp.temperature, seed=sp.seed))
                return [m.token.id for m in pb_grpc.LockstepStub(channel).Generate(req, timeout=60)
                        if m.WhichOneof("kind") == "token"]

        with ThreadPoolExecutor(4) as pool_:
            got = list(pool_.map(stream, range(4)))
        assert got == expected
    finally:
        live.close()
