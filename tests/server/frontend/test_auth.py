"""TLS and bearer-token auth with real clients over loopback: a TLS server refuses
plaintext, a token server answers UNAUTHENTICATED to a missing or wrong token on every
RPC but health, and reflection can be turned off."""

from __future__ import annotations

import datetime as dt
import ipaddress

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.lockstep.v1 import lockstep_pb2 as pb
from protos.lockstep.v1 import lockstep_pb2_grpc as pb_grpc
from tests.server.test_app import Running, request, stream

TOKEN = "s3cret-token_0123456789"


def self_signed(tmp_path) -> tuple[str, str, bytes]:
    """(cert file, key file, cert PEM) for localhost / 127.0.0.1, valid for a day."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"), cert_pem


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    """A TLS server that wants TOKEN, with reflection off; and the CA to trust it."""
    tmp = tmp_path_factory.mktemp("tls")
    cert, key, cert_pem = self_signed(tmp)
    (tmp / "token").write_text(TOKEN + "\n")
    # Running opens a plaintext channel it never uses here; the tests open TLS ones.
    server = Running(max_queue=4, max_tokens=50, deterministic=False, tls_cert=cert, tls_key=key,
                     auth_token_file=str(tmp / "token"), reflection=False)
    yield server, cert_pem
    server.close()


def tls_stub(server, cert_pem):
    channel = grpc.secure_channel(server.info["grpc"], grpc.ssl_channel_credentials(root_certificates=cert_pem))
    return channel, pb_grpc.LockstepStub(channel)


def bearer(token: str):
    return (("authorization", f"Bearer {token}"),)


def test_tls_with_the_right_token_streams(secure):
    server, cert_pem = secure
    channel, stub = tls_stub(server, cert_pem)
    with channel:
        tokens = [m for m in stub.Generate(request([1, 2, 3], 4), timeout=30, metadata=bearer(TOKEN))]
        assert len(tokens) == 5 and tokens[-1].finished.finish_reason == "length"
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=bearer(TOKEN)).model == "tiny"


@pytest.mark.parametrize("metadata", [(), bearer("wrong"), bearer(TOKEN + "x"), (("authorization", TOKEN),),
                                      bearer(TOKEN[:-1])])
def test_a_missing_or_wrong_token_is_unauthenticated_on_every_rpc(secure, metadata):
    server, cert_pem = secure
    channel, stub = tls_stub(server, cert_pem)
    with channel:
        for call in (lambda: list(stub.Generate(request([1, 2], 2), timeout=10, metadata=metadata)),
                     lambda: stub.GetServerStatus(pb.GetServerStatusRequest(), timeout=10, metadata=metadata),
                     lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=metadata)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "bearer" in err.value.details()
        assert stub.GetServerStatus(pb.GetServerStatusRequest(), metadata=bearer(TOKEN)).queue_length == 0


def test_health_needs_no_token_and_reflection_is_off(secure):
    server, cert_pem = secure
    channel, _ = tls_stub(server, cert_pem)
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=10, metadata=bearer(TOKEN)))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_plaintext_to_a_tls_server_fails(secure):
    server, _ = secure
    with pytest.raises(grpc.RpcError) as err:
        stream(server.stub, request([1, 2], 2), timeout=5)  # Running's own channel is plaintext
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
