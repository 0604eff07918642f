"""How a client reaches a server started with `--tls-cert`/`--tls-key` or `--auth-token-file`.

One `Security` serves the sync and asyncio clients, `lockstep load`, `lockstep demo` and
`client.chat`, from the same flags: `--tls-ca FILE` (PEM roots to trust: the channel is
TLS), `--tls-server-name NAME` (the name the certificate must carry, when it is not the
target's host) and `--auth-token-file FILE` (sent as `authorization: Bearer <token>`).
The token comes from a file, never the command line, where `ps` would show it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

import grpc

from server.frontend.auth import MAX_TOKEN_BYTES, read_secret  # the server's own token rule


def _check_pem(pem: bytes, what: str) -> bytes:
    """The PEM itself, if it parses as CA certificates; grpc would only find out at the
    handshake, as an UNAVAILABLE on every call."""
    try:
        ssl.create_default_context(cadata=pem.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError, ValueError) as exc:
        raise ValueError(f"{what} holds no PEM certificate ({exc})") from None
    return pem


@dataclass(frozen=True)
class Security:
    root_certificates: bytes = b""  # PEM CA certificates to trust; empty: a plaintext channel
    server_name: str = ""  # verify the server's certificate against this name instead of the target's host
    token: str = field(default="", repr=False)  # bearer token; empty: none (kept out of reprs and tracebacks)

    def __post_init__(self):
        if self.server_name and not self.root_certificates:
            raise ValueError("--tls-server-name needs --tls-ca (it names the certificate a TLS server shows)")
        if self.root_certificates:
            _check_pem(self.root_certificates, "--tls-ca")
        t = self.token
        if t and (len(t) > MAX_TOKEN_BYTES or not all(0x21 <= ord(c) <= 0x7E for c in t)):
            raise ValueError(f"the token must be 1..{MAX_TOKEN_BYTES} printable ASCII characters without spaces")

    @classmethod
    def from_files(cls, tls_ca: str = "", tls_server_name: str = "", auth_token_file: str = "",
                   ca_flag: str = "--tls-ca") -> "Security":
        """Reads the files; ValueError naming the flag (`ca_flag` for `tls_ca`) when one is
        missing, empty or malformed."""
        roots = _check_pem(read_secret(tls_ca, ca_flag), f"{ca_flag} {tls_ca!r}") if tls_ca else b""
        token = read_secret(auth_token_file, "--auth-token-file").decode("ascii") if auth_token_file else ""
        return cls(roots, tls_server_name, token)

    @property
    def tls(self) -> bool:
        return bool(self.root_certificates)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the token on a plaintext channel (gRPC allows call credentials on
        TLS channels only; on a TLS channel the token rides the channel's credentials)."""
        return (("authorization", f"Bearer {self.token}"),) if self.token and not self.tls else ()

    def _credentials(self) -> tuple[grpc.ChannelCredentials, list]:
        creds = grpc.ssl_channel_credentials(root_certificates=self.root_certificates)
        if self.token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(self.token))
        options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return creds, options

    def channel(self, target: str) -> grpc.Channel:
        if not self.tls:
            return grpc.insecure_channel(target)
        creds, options = self._credentials()
        return grpc.secure_channel(target, creds, options=options)

    def aio_channel(self, target: str) -> grpc.aio.Channel:
        if not self.tls:
            return grpc.aio.insecure_channel(target)
        creds, options = self._credentials()
        return grpc.aio.secure_channel(target, creds, options=options)


def add_security_args(p, token_file: bool = True) -> None:
    """The flags `security_from_args` reads. `token_file=False` where the parser has serve's
    own `--auth-token-file` (`lockstep simulate`, which accepts both command lines)."""
    p.add_argument("--tls-ca", default="", help="PEM CA certificate(s) to trust: connect over TLS "
                                                "(for a self-signed server, its --tls-cert file)")
    p.add_argument("--tls-server-name", default="",
                   help="with --tls-ca: the name the server's certificate carries, when not the target's host")
    if token_file:
        p.add_argument("--auth-token-file", default="",
                       help="file holding the server's token, sent as 'authorization: Bearer <token>' "
                            "(in the clear without --tls-ca: use that over loopback only)")


def security_from_args(args) -> Security:
    return Security.from_files(args.tls_ca, args.tls_server_name, args.auth_token_file)
