"""Clients against a server that wants TLS and a bearer token, over 127.0.0.1: the sync and
asyncio clients, `lockstep load` and `lockstep demo` get through with the CA and the token
file; without the CA they get UNAVAILABLE, without the token UNAUTHENTICATED; bad files are
a one-line error with exit code 2."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from client import demo, loadgen
from client.aio import AsyncLockstepClient
from client.client import LockstepClient, NotReady, Unauthenticated
from client.connect import Security
from tests.server.frontend.test_auth import TOKEN, self_signed
from tests.server.test_app import Running

PROMPT = [5, 17, 99, 3]


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A server with TLS (a self-signed certificate for localhost / 127.0.0.1) and a token."""
    tmp = tmp_path_factory.mktemp("secured")
    cert, key, cert_pem = self_signed(tmp)
    (tmp / "token").write_text(TOKEN + "\n")
    server = Running(max_queue=8, max_tokens=32, deterministic=False, tls_cert=cert, tls_key=key,
                     auth_token_file=str(tmp / "token"))
    yield SimpleNamespace(target=server.info["grpc"], cert=cert, key=key, cert_pem=cert_pem,
                          token_file=str(tmp / "token"), dir=tmp)
    server.close()


def sync_generate(target, security, wait_s=10.0):
    with LockstepClient(target, security) as client:
        client.wait_ready(wait_s)
        return client.generate(PROMPT, 6, timeout=30, seed=1)


def aio_generate(target, security, wait_s=10.0):
    async def run():
        async with AsyncLockstepClient(target, security) as client:
            await client.wait_ready(wait_s)
            return await client.generate(PROMPT, 6, timeout=30, seed=1)

    return asyncio.run(run())


@pytest.mark.parametrize("generate", [sync_generate, aio_generate], ids=["sync", "asyncio"])
def test_the_clients_generate_over_tls_with_the_token(secured, generate):
    security = Security.from_files(secured.cert, "", secured.token_file)
    gen = generate(secured.target, security)
    assert len(gen.tokens) == 6 and gen.finished.finish_reason == "length"
    assert gen.predicted_ttft_s > 0


@pytest.mark.parametrize("generate", [sync_generate, aio_generate], ids=["sync", "asyncio"])
def test_without_the_ca_the_clients_are_unavailable_and_without_the_token_unauthenticated(secured, generate):
    with pytest.raises(NotReady, match="UNAVAILABLE: no server ready at 127.0.0.1"):  # plaintext to a TLS port
        generate(secured.target, Security(token=TOKEN), wait_s=1.0)
    with pytest.raises(Unauthenticated, match="UNAUTHENTICATED: .*bearer token"):
        generate(secured.target, Security(secured.cert_pem))


def test_the_server_name_override_is_the_name_the_certificate_must_carry(secured):
    # The certificate names localhost and 127.0.0.1: the target's host alone would pass.
    assert len(sync_generate(secured.target, Security(secured.cert_pem, "localhost", TOKEN)).tokens) == 6
    with pytest.raises(NotReady, match="UNAVAILABLE: .*Hostname Verification"):
        sync_generate(secured.target, Security(secured.cert_pem, "other.example", TOKEN), wait_s=1.0)


def test_a_token_over_plaintext_loopback_goes_as_call_metadata(tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    server = Running(max_queue=4, max_tokens=16, deterministic=False, auth_token_file=str(tmp_path / "token"))
    try:
        security = Security.from_files(auth_token_file=str(tmp_path / "token"))
        assert not security.tls and "token" not in repr(security)  # the secret stays out of reprs
        assert len(sync_generate(server.info["grpc"], security).tokens) == 6
        assert len(aio_generate(server.info["grpc"], security).tokens) == 6
    finally:
        server.close()


def load(secured, out, *flags):
    return loadgen.main(["--target", secured.target, "--output", str(out), "--requests", "4", "--concurrency", "2",
                         "--prompt-len", "8", "--output-len", "4", "--seed", "1", "--connect-timeout-s", "2", *flags])


def test_load_runs_over_tls_with_the_token(secured, tmp_path):
    assert load(secured, tmp_path, "--tls-ca", secured.cert, "--auth-token-file", secured.token_file) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())["summary"]
    assert summary["requests"] == summary["ok"] == 4 and summary["errors"] == {}


@pytest.mark.parametrize("which, named", [("ca", "UNAVAILABLE: no server ready at 127.0.0.1"),
                                          ("token", "answered UNAUTHENTICATED: authorization")])
def test_load_without_the_ca_or_the_token_stops_with_the_status(secured, tmp_path, capsys, which, named):
    flags = {"ca": ["--tls-ca", secured.cert], "token": ["--auth-token-file", secured.token_file]}
    with pytest.raises(SystemExit) as exit_:
        load(secured, tmp_path, *(f for key, fs in flags.items() if key != which for f in fs))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err[-1].startswith("lockstep load: error: ") and named in err[-1]
    assert not (tmp_path / "summary.json").exists()


BAD = [  # (flags, what the one line says); the files are made in secured.dir
    (["--tls-ca", "{dir}/absent.pem"], "--tls-ca '{dir}/absent.pem' is not a readable file"),
    (["--tls-ca", "{dir}/garbage.pem"], "--tls-ca '{dir}/garbage.pem' holds no PEM certificate"),
    (["--tls-ca", "{dir}/empty"], "--tls-ca '{dir}/empty' is empty"),
    (["--auth-token-file", "{dir}/empty"], "--auth-token-file '{dir}/empty' must hold one token"),
    (["--auth-token-file", "{dir}/two-words"], "--auth-token-file '{dir}/two-words' must hold one token"),
    (["--auth-token-file", "{dir}/absent"], "--auth-token-file '{dir}/absent' is not a readable file"),
    (["--tls-server-name", "localhost"], "--tls-server-name needs --tls-ca"),
]


@pytest.mark.parametrize("flags, message", BAD)
def test_bad_tls_and_token_files_are_one_line_with_exit_2(secured, tmp_path, capsys, flags, message):
    d = secured.dir
    (d / "garbage.pem").write_text("not a certificate\n")
    (d / "empty").write_text("")
    (d / "two-words").write_text("two words\n")
    with pytest.raises(SystemExit) as exit_:
        load(secured, tmp_path, *(f.format(dir=d) for f in flags))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith("lockstep load: error: ") and message.format(dir=d) in err


def test_demo_keeps_its_client_flags_and_reads_serves(secured):
    server_args, security = demo._security(["--model", "tiny", "--tls-cert", secured.cert, "--tls-key", secured.key,
                                            "--auth-token-file", secured.token_file,
                                            "--tls-server-name", "localhost"])
    assert server_args == ["--model", "tiny", "--tls-cert", secured.cert, "--tls-key", secured.key,
                           "--auth-token-file", secured.token_file]  # the server name is the demo's own
    assert security == Security(secured.cert_pem, "localhost", TOKEN)  # --tls-cert is the CA: self-signed
    assert demo.main(["--model", "tiny", "--tls-ca", str(secured.dir / "absent.pem")]) == 2


@pytest.mark.slow
def test_demo_runs_against_the_secured_server_it_starts(secured, capsys):
    code = demo.main(["--model", "tiny", "--pool", "cpu", "--calibration", "none", "--max-context", "256",
                      "--prefill-chunk", "32", "--no-ray", "--time-scale", "20", "--tls-cert", secured.cert,
                      "--tls-key", secured.key, "--auth-token-file", secured.token_file])
    out = capsys.readouterr().out
    assert code == 0 and "tls=on auth=on" in out and "same prompt and seed, same tokens: True" in out
