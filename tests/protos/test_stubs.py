"""The committed gRPC stubs match the .proto, import by package path, and serve."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc

from protos.lockstep.v1 import lockstep_pb2 as pb
from protos.lockstep.v1 import lockstep_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _generated(root: Path) -> dict[str, bytes]:
    """Generated stub files under root/protos, by repo-relative path."""
    files = sorted(p for p in (root / "protos").rglob("*") if p.name.endswith(GENERATED_SUFFIXES))
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def _regenerate(out: Path) -> dict[str, bytes]:
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "protos" / "generate.py"), "--out", str(out)],
        check=True, capture_output=True, timeout=60,
    )
    return _generated(out)


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    fresh = _regenerate(tmp_path / "a")
    committed = _generated(REPO_ROOT)
    assert "protos/lockstep/v1/lockstep_pb2_grpc.py" in fresh
    assert sorted(committed) == sorted(fresh), "stale or missing stubs: run `make protos`"
    stale = [path for path in fresh if committed[path] != fresh[path]]
    assert not stale, f"stubs differ from the .proto (run `make protos` and commit): {stale}"


def test_generation_is_deterministic(tmp_path):
    assert _regenerate(tmp_path / "a") == _regenerate(tmp_path / "b")


def test_the_published_stubs_live_beside_tritonclients_in_either_order():
    """protos/inference/ is compiled under its published file names, so a process may import
    tritonclient's stubs of the same files too (protos/README.md)."""
    ours = "from protos.inference import grpc_service_pb2 as ours"
    theirs = "from tritonclient.grpc import service_pb2 as theirs"
    for first, second in ((ours, theirs), (theirs, ours)):
        code = f"{first}\n{second}\nassert ours.ModelInferRequest is theirs.ModelInferRequest"
        run = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0, run.stderr[-2000:]


def test_stubs_import_by_package_path():
    source = (REPO_ROOT / "protos/lockstep/v1/lockstep_pb2_grpc.py").read_text()
    assert "from protos.lockstep.v1 import lockstep_pb2" in source


def test_generate_request_round_trips_with_prompt_oneof():
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[1, 2, 3]),
        max_tokens=8,
        sampling=pb.SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=1234),
        stop=["\n\n"],
        stop_token_ids=[2],
        request_id="r-1",
    )
    assert request.WhichOneof("prompt") == "token_ids"
    parsed = pb.GenerateRequest.FromString(request.SerializeToString())
    assert parsed == request
    assert list(parsed.token_ids.ids) == [1, 2, 3] and parsed.sampling.seed == 1234

    parsed.text = "hello"  # setting the other member clears token_ids
    assert parsed.WhichOneof("prompt") == "text" and not parsed.HasField("token_ids")


def test_service_has_four_methods_and_generate_streams():
    service = pb.DESCRIPTOR.services_by_name["Lockstep"]
    assert service.full_name == "lockstep.v1.Lockstep"
    methods = {m.name: m for m in service.methods}
    assert sorted(methods) == ["Generate", "GetModelInfo", "GetServerStatus", "PredictArrival"]
    assert (methods["Generate"].client_streaming, methods["Generate"].server_streaming) == (False, True)
    for name in ("GetModelInfo", "GetServerStatus", "PredictArrival"):
        assert not methods[name].client_streaming and not methods[name].server_streaming
    assert methods["Generate"].output_type.name == "GenerateResponse"


class _Servicer(pb_grpc.LockstepServicer):
    """Just enough of the service to prove a real loopback round trip."""

    async def GetServerStatus(self, request, context):
        return pb.ServerStatus(queue_length=3, max_slots=8, ticks=42, accepting=True, uptime_s=1.5)

    async def Generate(self, request, context):
        for index, token_id in enumerate(request.token_ids.ids):
            yield pb.GenerateResponse(token=pb.Token(id=token_id, index=index, tick=index))
        yield pb.GenerateResponse(finished=pb.Finished(finish_reason="length", request_id=request.request_id))


async def _round_trip():
    server = grpc.aio.server()
    pb_grpc.add_LockstepServicer_to_server(_Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.LockstepStub(channel)
            status = await stub.GetServerStatus(pb.GetServerStatusRequest(), timeout=5)
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[7, 9]), request_id="r-2")
            stream = [r async for r in stub.Generate(request, timeout=5)]
            unimplemented = None  # GetModelInfo falls through to the generated base class
            try:
                await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            except grpc.aio.AioRpcError as err:
                unimplemented = err.code()
    finally:
        await server.stop(grace=None)
    return status, stream, unimplemented


def test_loopback_round_trip():
    status, stream, unimplemented = asyncio.run(asyncio.wait_for(_round_trip(), timeout=20))
    assert (status.queue_length, status.max_slots, status.ticks, status.accepting) == (3, 8, 42, True)
    assert [r.WhichOneof("kind") for r in stream] == ["token", "token", "finished"]
    assert [r.token.id for r in stream[:2]] == [7, 9]
    assert stream[-1].finished.request_id == "r-2"
    assert unimplemented == grpc.StatusCode.UNIMPLEMENTED
